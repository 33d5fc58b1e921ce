//! How long the simulated node takes to serve one call, and the tiny text syntax used to choose
//! it on a command line: `const:5ms`, `exp:5ms`, `lognormal:5ms,0.5`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use rand_distr::{Distribution, Exp, LogNormal};

/// Longest service time a sample may take. A distribution's tail can, in principle, produce any
/// value; a sample beyond an hour is a configuration mistake rather than a latency, and clamping
/// keeps every sleep finite (`Duration::from_secs_f64` would panic on an infinite value).
const MAX_SAMPLE: Duration = Duration::from_secs(3600);

/// The distribution of the time one call holds a slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServiceTime {
    /// Every call takes exactly this long (`const:5ms`).
    Constant(Duration),
    /// Exponentially distributed with this mean (`exp:5ms`): memoryless, many short calls and a
    /// long tail, the classic M/M/c service model.
    Exponential {
        /// Mean service time.
        mean: Duration,
    },
    /// Log-normally distributed (`lognormal:5ms,0.5`): the usual shape of real inference
    /// latencies, a hump near the median and a heavier right tail as `sigma` grows.
    LogNormal {
        /// Median service time (`exp(mu)` of the underlying normal).
        median: Duration,
        /// Standard deviation of the underlying normal; 0 makes it constant.
        sigma: f64,
    },
}

impl Default for ServiceTime {
    /// One millisecond, constant: small enough that a benchmark measures the system under test
    /// rather than the simulator, large enough to be a non-trivial amount of work to schedule.
    fn default() -> Self {
        ServiceTime::Constant(Duration::from_millis(1))
    }
}

impl ServiceTime {
    /// Draws one service time. Always finite, at most an hour.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let secs = match *self {
            ServiceTime::Constant(d) => return d.min(MAX_SAMPLE),
            ServiceTime::Exponential { mean } => {
                let mean = mean.as_secs_f64();
                if mean <= 0.0 {
                    return Duration::ZERO;
                }
                match Exp::new(1.0 / mean) {
                    Ok(exp) => exp.sample(rng),
                    Err(_) => mean,
                }
            }
            ServiceTime::LogNormal { median, sigma } => {
                let median = median.as_secs_f64();
                if median <= 0.0 {
                    return Duration::ZERO;
                }
                match LogNormal::new(median.ln(), sigma) {
                    Ok(dist) => dist.sample(rng),
                    // Only an invalid sigma gets here, which `validate` rejects up front.
                    Err(_) => median,
                }
            }
        };
        Duration::try_from_secs_f64(secs).map_or(MAX_SAMPLE, |d| d.min(MAX_SAMPLE))
    }

    /// Checks the parameters: a log-normal `sigma` must be finite and non-negative.
    pub fn validate(&self) -> Result<(), ParseServiceTimeError> {
        match *self {
            ServiceTime::LogNormal { sigma, .. } if !(sigma.is_finite() && sigma >= 0.0) => {
                Err(ParseServiceTimeError::Sigma(sigma.to_string()))
            }
            _ => Ok(()),
        }
    }
}

/// Why a service-time specification could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseServiceTimeError {
    /// The text is not `kind:parameters`, or the kind is unknown.
    #[error(
        "invalid service time {0:?}: expected const:<duration>, exp:<mean> or lognormal:<median>,<sigma>"
    )]
    Syntax(String),
    /// A duration is malformed.
    #[error("invalid duration {0:?}: expected a non-negative number followed by ns, us, ms or s")]
    Duration(String),
    /// The log-normal sigma is not a finite non-negative number.
    #[error("invalid lognormal sigma {0:?}: expected a finite number >= 0")]
    Sigma(String),
}

impl FromStr for ServiceTime {
    type Err = ParseServiceTimeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ParseServiceTimeError::Syntax(s.to_string());
        let (kind, params) = s.trim().split_once(':').ok_or_else(syntax)?;
        let parsed = match kind.trim() {
            "const" | "constant" => ServiceTime::Constant(parse_duration(params)?),
            "exp" | "exponential" => ServiceTime::Exponential {
                mean: parse_duration(params)?,
            },
            "lognormal" => {
                let (median, sigma) = params.split_once(',').ok_or_else(syntax)?;
                let sigma_text = sigma.trim();
                let sigma: f64 = sigma_text
                    .parse()
                    .map_err(|_| ParseServiceTimeError::Sigma(sigma_text.to_string()))?;
                ServiceTime::LogNormal {
                    median: parse_duration(median)?,
                    sigma,
                }
            }
            _ => return Err(syntax()),
        };
        parsed.validate()?;
        Ok(parsed)
    }
}

impl fmt::Display for ServiceTime {
    /// Prints the syntax [`FromStr`] accepts, so that a value round-trips.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceTime::Constant(d) => write!(f, "const:{}", DisplayDuration(*d)),
            ServiceTime::Exponential { mean } => write!(f, "exp:{}", DisplayDuration(*mean)),
            ServiceTime::LogNormal { median, sigma } => {
                write!(f, "lognormal:{},{sigma}", DisplayDuration(*median))
            }
        }
    }
}

/// Parses `<number><unit>` with unit `ns`, `us` (or `µs`), `ms` or `s`; the number may have a
/// fractional part (`1.5ms`). The unit is required, so that `5` is not silently seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, ParseServiceTimeError> {
    let text = text.trim();
    let bad = || ParseServiceTimeError::Duration(text.to_string());
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let unit_nanos: u64 = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let nanos = if number.contains('.') {
        let value: f64 = number.parse().map_err(|_| bad())?;
        // Rounded to the nanosecond, so that `1.5ms` is exactly 1 500 000 ns.
        let nanos = (value * unit_nanos as f64).round();
        if !(nanos.is_finite() && nanos < u64::MAX as f64) {
            return Err(bad());
        }
        nanos as u64
    } else {
        let value: u64 = number.parse().map_err(|_| bad())?;
        value.checked_mul(unit_nanos).ok_or_else(bad)?
    };
    Ok(Duration::from_nanos(nanos))
}

/// Writes a duration in the largest unit that keeps it an integer, so it parses back exactly.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            write!(f, "0ms")
        } else if nanos.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", nanos / 1_000_000_000)
        } else if nanos.is_multiple_of(1_000_000) {
            write!(f, "{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            write!(f, "{}us", nanos / 1_000)
        } else {
            write!(f, "{nanos}ns")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn parses_the_three_kinds() {
        assert_eq!(
            "const:5ms".parse::<ServiceTime>(),
            Ok(ServiceTime::Constant(Duration::from_millis(5)))
        );
        assert_eq!(
            "exp:250us".parse::<ServiceTime>(),
            Ok(ServiceTime::Exponential {
                mean: Duration::from_micros(250)
            })
        );
        assert_eq!(
            "lognormal:5ms,0.5".parse::<ServiceTime>(),
            Ok(ServiceTime::LogNormal {
                median: Duration::from_millis(5),
                sigma: 0.5
            })
        );
        assert_eq!(
            "const:1.5s".parse::<ServiceTime>(),
            Ok(ServiceTime::Constant(Duration::from_millis(1500)))
        );
        assert_eq!(
            "const:0ms".parse::<ServiceTime>(),
            Ok(ServiceTime::Constant(Duration::ZERO))
        );
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "5ms",
            "const:",
            "const:5",
            "const:5min",
            "const:-5ms",
            "const:ms",
            "const:1.2.3ms",
            "uniform:5ms",
            "lognormal:5ms",
            "lognormal:5ms,-1",
            "lognormal:5ms,NaN",
            "lognormal:5ms,inf",
            "lognormal:5ms,x",
        ] {
            assert!(bad.parse::<ServiceTime>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "const:5ms",
            "const:2s",
            "const:1500us",
            "const:7ns",
            "const:0ms",
            "exp:250us",
            "lognormal:5ms,0.5",
        ] {
            let parsed: ServiceTime = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
            assert_eq!(parsed.to_string().parse::<ServiceTime>(), Ok(parsed));
        }
    }

    #[test]
    fn constant_samples_are_constant() {
        let mut rng = SmallRng::seed_from_u64(1);
        let st = ServiceTime::Constant(Duration::from_millis(3));
        for _ in 0..100 {
            assert_eq!(st.sample(&mut rng), Duration::from_millis(3));
        }
    }

    #[test]
    fn exponential_mean_is_close_to_configured() {
        let mut rng = SmallRng::seed_from_u64(42);
        let st = ServiceTime::Exponential {
            mean: Duration::from_millis(5),
        };
        let n = 100_000;
        let total: f64 = (0..n).map(|_| st.sample(&mut rng).as_secs_f64()).sum();
        let mean = total / f64::from(n);
        // The standard error of the mean of 100k exponential samples is 0.3% of the mean.
        assert!((mean - 0.005).abs() < 0.005 * 0.02, "mean {mean}");
    }

    #[test]
    fn lognormal_median_is_close_to_configured() {
        let mut rng = SmallRng::seed_from_u64(7);
        let st = ServiceTime::LogNormal {
            median: Duration::from_millis(5),
            sigma: 0.5,
        };
        let mut samples: Vec<Duration> = (0..20_001).map(|_| st.sample(&mut rng)).collect();
        samples.sort();
        let median = samples[samples.len() / 2].as_secs_f64();
        assert!((median - 0.005).abs() < 0.005 * 0.03, "median {median}");
        assert!(samples.iter().all(|d| *d <= MAX_SAMPLE));
    }

    #[test]
    fn zero_parameters_give_zero() {
        let mut rng = SmallRng::seed_from_u64(0);
        let exp = ServiceTime::Exponential {
            mean: Duration::ZERO,
        };
        let ln = ServiceTime::LogNormal {
            median: Duration::ZERO,
            sigma: 1.0,
        };
        assert_eq!(exp.sample(&mut rng), Duration::ZERO);
        assert_eq!(ln.sample(&mut rng), Duration::ZERO);
    }
}
