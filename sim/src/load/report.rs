//! The result of a load run, and how outcomes are tallied into it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Code;

/// Highest latency the histogram tells apart, in microseconds. Longer latencies are recorded as
/// this value. One hour is far beyond any per-call deadline a benchmark uses, and bounding the
/// histogram keeps its memory fixed (about 200 KiB at 3 significant digits).
pub(crate) const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Significant decimal digits the latency histogram keeps: 0.1% relative error, the usual
/// precision of latency reports, at a modest memory cost.
pub(crate) const SIGNIFICANT_DIGITS: u8 = 3;

/// Latency percentiles of the successful calls, in microseconds, measured from each call's
/// scheduled start (not from when it was actually sent), so that a generator or a system that
/// falls behind shows up as latency instead of being hidden (no coordinated omission); in a
/// closed loop, which has no schedule, from each call's send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest latency seen.
    pub max_us: u64,
}

/// What a load run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// The address that was loaded.
    pub target: String,
    /// The model called.
    pub model: String,
    /// The configured request rate (calls per second); 0 in a closed-loop run.
    pub target_rps: f64,
    /// The callers of a closed-loop run (each sending its next call when its previous one has
    /// ended); absent in an open-loop run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_loop: Option<usize>,
    /// The configured duration, in seconds.
    pub duration_s: f64,
    /// When the schedule started (the due time of a call at offset 0), in microseconds since
    /// the Unix epoch: what timeline offsets are relative to, for lining them up with events
    /// outside the generator.
    pub started_unix_us: u64,
    /// Calls sent. Every one of them is counted either in `ok` or in `errors`.
    pub sent: u64,
    /// Calls answered successfully with the input echoed back.
    pub ok: u64,
    /// Failed calls by gRPC status code name (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, ...), plus
    /// `DATA_MISMATCH` for a successful answer that did not echo the request.
    pub errors: BTreeMap<String, u64>,
    /// The first message seen for each failed call's code (what the target said), to tell
    /// apart failures that share a code.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_samples: BTreeMap<String, String>,
    /// Calls not sent because `max_in_flight` calls were already outstanding (the generator,
    /// not the target, was overloaded).
    pub dropped: u64,
    /// Calls sent per second, over the time it took to send them.
    pub achieved_rps: f64,
    /// Latency of the successful calls.
    pub latency: LatencySummary,
    /// Latency of the failed calls, from the same start: how fast failures come back (a router
    /// shedding load answers in microseconds, a call that waited in vain takes its wait, a
    /// timeout its deadline). All zero when none failed.
    pub error_latency: LatencySummary,
    /// The latency histogram itself, as `[latency_us, calls]` pairs (each bucket's highest
    /// equivalent value, ascending; empty buckets left out), so that the reports of several
    /// generators can be merged into exact percentiles of all their calls. Left out of the JSON
    /// when empty; `fulcrum load` fills it only when asked (`--histogram`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_histogram: Vec<[u64; 2]>,
    /// How late the generator sent calls relative to their schedule, over all sent calls. This
    /// delay is included in `latency`; when it is not small against `latency`, the generator
    /// (or the machine it runs on) is a bottleneck.
    pub send_lag: LatencySummary,
    /// Successful calls per node that answered (`x-fulcrum-node`, else `x-fulcrum-sim-node`,
    /// else `direct`).
    pub nodes: BTreeMap<String, u64>,
    /// Successful calls per region (`x-fulcrum-region`, else `unknown`).
    pub regions: BTreeMap<String, u64>,
    /// Successful calls that took more than one attempt (`x-fulcrum-attempts`, else Envoy's
    /// `x-envoy-attempt-count`, above 1): retried or hedged by a proxy.
    pub retried: u64,
    /// Outcomes by the time calls were due, in buckets of the configured width (empty unless a
    /// timeline was asked for). Calls that never got an answer before the run ended are not in
    /// it (they are in `errors` as `DEADLINE_EXCEEDED`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineBucket>,
}

/// The calls due within one bucket of a timeline, by how they ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TimelineBucket {
    /// Start of the bucket, in milliseconds from the start of the run.
    pub t_ms: u64,
    /// Successful calls per node that served them (named as in `nodes`).
    pub ok: BTreeMap<String, u64>,
    /// Failed calls.
    pub failed: u64,
    /// Successful calls that took more than one attempt.
    pub retried: u64,
    /// Median latency of the successful calls, in microseconds (0 when none).
    pub p50_us: u64,
    /// 99th percentile latency of the successful calls, in microseconds (0 when none).
    pub p99_us: u64,
    /// Largest latency of the successful calls, in microseconds (0 when none).
    pub max_us: u64,
}

/// One bucket while outcomes arrive.
#[derive(Debug, Default)]
struct OpenBucket {
    ok: BTreeMap<String, u64>,
    failed: u64,
    retried: u64,
    /// Latencies of the successful calls (a bucket holds milliseconds of calls, so a sort at
    /// the end is cheaper than a histogram per bucket).
    latencies_us: Vec<u64>,
}

/// Outcomes by due time.
#[derive(Debug)]
struct Timeline {
    width_us: u64,
    buckets: Vec<OpenBucket>,
}

impl Timeline {
    fn bucket(&mut self, at_us: u64) -> &mut OpenBucket {
        let i = usize::try_from(at_us / self.width_us).unwrap_or(usize::MAX);
        if i >= self.buckets.len() {
            // Bounded: `LoadConfig::validate` limits the number of buckets a run can reach.
            self.buckets
                .resize_with(i.saturating_add(1), OpenBucket::default);
        }
        &mut self.buckets[i]
    }

    fn finish(self) -> Vec<TimelineBucket> {
        let width_us = self.width_us;
        self.buckets
            .into_iter()
            .enumerate()
            .map(|(i, mut b)| {
                b.latencies_us.sort_unstable();
                let at = |q: f64| {
                    if b.latencies_us.is_empty() {
                        return 0;
                    }
                    let rank = ((b.latencies_us.len() as f64 * q).ceil() as usize)
                        .clamp(1, b.latencies_us.len());
                    b.latencies_us[rank - 1]
                };
                TimelineBucket {
                    t_ms: i as u64 * width_us / 1000,
                    p50_us: at(0.5),
                    p99_us: at(0.99),
                    max_us: b.latencies_us.last().copied().unwrap_or(0),
                    ok: b.ok,
                    failed: b.failed,
                    retried: b.retried,
                }
            })
            .collect()
    }
}

impl LoadReport {
    /// Failed calls, all codes together.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// How one call ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Answered and echoed; latency in microseconds from the scheduled start.
    Ok {
        latency_us: u64,
        /// When the call was due, in microseconds from the start of the run.
        at_us: u64,
        /// Attempts the router made (1 when not told).
        attempts: u32,
        node: String,
        region: String,
    },
    /// Failed, with the code's name.
    Failed {
        code: &'static str,
        /// Microseconds from the scheduled start to the failure.
        latency_us: u64,
        /// The status message, if the target sent one.
        message: Option<String>,
        /// When the call was due, in microseconds from the start of the run.
        at_us: u64,
    },
}

/// Tallies outcomes.
#[derive(Debug)]
pub(crate) struct Tally {
    pub(crate) received: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    error_latency: Histogram<u64>,
    nodes: BTreeMap<String, u64>,
    regions: BTreeMap<String, u64>,
    retried: u64,
    error_samples: BTreeMap<String, String>,
    timeline: Option<Timeline>,
}

impl Tally {
    /// A tally, with a timeline in buckets of `timeline` if given.
    pub(crate) fn new(timeline: Option<Duration>) -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            retried: 0,
            error_samples: BTreeMap::new(),
            timeline: timeline.map(|w| Timeline {
                width_us: u64::try_from(w.as_micros()).unwrap_or(u64::MAX).max(1),
                buckets: Vec::new(),
            }),
            received: 0,
            ok: 0,
            errors: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)?,
            error_latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)?,
            nodes: BTreeMap::new(),
            regions: BTreeMap::new(),
        })
    }

    pub(crate) fn record(&mut self, outcome: Outcome) {
        self.received += 1;
        match outcome {
            Outcome::Ok {
                latency_us,
                at_us,
                attempts,
                node,
                region,
            } => {
                self.ok += 1;
                self.latency.saturating_record(latency_us);
                let retried = attempts > 1;
                self.retried += u64::from(retried);
                if let Some(t) = &mut self.timeline {
                    let b = t.bucket(at_us);
                    *b.ok.entry(node.clone()).or_default() += 1;
                    b.retried += u64::from(retried);
                    b.latencies_us.push(latency_us);
                }
                *self.nodes.entry(node).or_default() += 1;
                *self.regions.entry(region).or_default() += 1;
            }
            Outcome::Failed {
                code,
                at_us,
                latency_us,
                message,
            } => {
                self.fail(code, 1);
                self.error_latency.saturating_record(latency_us);
                if let Some(m) = message {
                    self.error_samples.entry(code.to_string()).or_insert(m);
                }
                if let Some(t) = &mut self.timeline {
                    t.bucket(at_us).failed += 1;
                }
            }
        }
    }

    pub(crate) fn fail(&mut self, code: &str, n: u64) {
        if n > 0 {
            *self.errors.entry(code.to_string()).or_default() += n;
        }
    }

    pub(crate) fn into_report(self, head: ReportHead) -> LoadReport {
        let latency = summarize(&self.latency);
        let send_secs = head.send_time.as_secs_f64();
        LoadReport {
            target: head.target,
            model: head.model,
            target_rps: head.target_rps,
            closed_loop: head.closed_loop,
            duration_s: head.duration.as_secs_f64(),
            started_unix_us: 0,
            sent: head.sent,
            ok: self.ok,
            errors: self.errors,
            error_samples: self.error_samples,
            dropped: head.dropped,
            achieved_rps: if send_secs > 0.0 {
                head.sent as f64 / send_secs
            } else {
                0.0
            },
            latency,
            error_latency: summarize(&self.error_latency),
            latency_histogram: self
                .latency
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
            send_lag: LatencySummary::default(),
            nodes: self.nodes,
            regions: self.regions,
            retried: self.retried,
            timeline: self.timeline.map(Timeline::finish).unwrap_or_default(),
        }
    }
}

/// The percentiles of a histogram of microseconds; all zero if it is empty.
pub(crate) fn summarize(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

/// The parts of a report the tally does not know.
#[derive(Debug)]
pub(crate) struct ReportHead {
    pub(crate) target: String,
    pub(crate) model: String,
    pub(crate) target_rps: f64,
    pub(crate) duration: Duration,
    pub(crate) closed_loop: Option<usize>,
    pub(crate) sent: u64,
    pub(crate) dropped: u64,
    /// From the start to the moment scheduling stopped.
    pub(crate) send_time: Duration,
}

/// The canonical name of a gRPC status code, as in the gRPC specification.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn write_shares(
    f: &mut fmt::Formatter<'_>,
    title: &str,
    shares: &BTreeMap<String, u64>,
    whole: u64,
) -> fmt::Result {
    writeln!(f, "{title}:")?;
    for (name, n) in shares {
        writeln!(f, "  {name:<24} {n:>10}  {:>6.2}%", percent(*n, whole))?;
    }
    Ok(())
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.error_count();
        match self.closed_loop {
            Some(callers) => writeln!(
                f,
                "target {} model {}: closed loop, {callers} caller(s), for {:.3} s",
                self.target, self.model, self.duration_s
            )?,
            None => writeln!(
                f,
                "target {} model {}: {} rps for {:.3} s",
                self.target, self.model, self.target_rps, self.duration_s
            )?,
        }
        writeln!(
            f,
            "sent {} ({:.1}/s), ok {} ({:.2}%), errors {} ({:.2}%), dropped {}",
            self.sent,
            self.achieved_rps,
            self.ok,
            percent(self.ok, self.sent),
            errors,
            percent(errors, self.sent),
            self.dropped
        )?;
        if errors > 0 {
            writeln!(f, "errors by code:")?;
            for (code, n) in &self.errors {
                write!(f, "  {code:<24} {n:>10}  {:>6.2}%", percent(*n, self.sent))?;
                match self.error_samples.get(code) {
                    Some(m) => writeln!(f, "  e.g. {m:?}")?,
                    None => writeln!(f)?,
                }
            }
            let e = &self.error_latency;
            writeln!(
                f,
                "latency of failed calls (ms): p50 {:.3}  p99 {:.3}  max {:.3}",
                ms(e.p50_us),
                ms(e.p99_us),
                ms(e.max_us)
            )?;
        }
        let l = &self.latency;
        let from = if self.closed_loop.is_some() {
            "send"
        } else {
            "scheduled start"
        };
        writeln!(
            f,
            "latency of successful calls (ms, from {from}): p50 {:.3}  p90 {:.3}  \
             p99 {:.3}  p99.9 {:.3}  max {:.3}",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        )?;
        // A closed loop has no schedule to be behind.
        if self.closed_loop.is_none() {
            let g = &self.send_lag;
            writeln!(
                f,
                "send lag (ms, generator behind schedule): p50 {:.3}  p99 {:.3}  max {:.3}",
                ms(g.p50_us),
                ms(g.p99_us),
                ms(g.max_us)
            )?;
        }
        if self.retried > 0 {
            writeln!(
                f,
                "retried or hedged by the router: {} ({:.2}% of successful calls)",
                self.retried,
                percent(self.retried, self.ok)
            )?;
        }
        write_shares(f, "nodes", &self.nodes, self.ok)?;
        let only_unknown = self.regions.keys().all(|r| r == super::UNKNOWN_REGION);
        if !only_unknown {
            write_shares(f, "regions", &self.regions, self.ok)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_canonical_name() {
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn tally_and_display() {
        let mut t = Tally::new(Some(Duration::from_millis(100))).unwrap();
        for (i, node) in ["a", "b", "a", "a"].into_iter().enumerate() {
            t.record(Outcome::Ok {
                latency_us: 1000 * (i as u64 + 1),
                at_us: 30_000 * i as u64,
                attempts: if i == 3 { 2 } else { 1 },
                node: node.to_string(),
                region: "eu".to_string(),
            });
        }
        t.record(Outcome::Failed {
            code: "UNAVAILABLE",
            at_us: 250_000,
            latency_us: 120,
            message: Some("node x is down".into()),
        });
        // Saturates instead of failing.
        t.record(Outcome::Ok {
            latency_us: u64::MAX,
            at_us: 260_000,
            attempts: 1,
            node: "b".to_string(),
            region: "us".to_string(),
        });
        let r = t.into_report(ReportHead {
            target: "x:1".into(),
            model: "echo".into(),
            target_rps: 6.0,
            duration: Duration::from_secs(1),
            closed_loop: None,
            sent: 6,
            dropped: 0,
            send_time: Duration::from_secs(1),
        });
        assert_eq!(r.ok, 5);
        assert_eq!(r.error_count(), 1);
        assert_eq!(r.nodes.values().sum::<u64>(), r.ok);
        assert_eq!(r.nodes["a"], 3);
        assert!(r.latency.max_us >= MAX_LATENCY_US);
        assert!(r.latency.p50_us >= 2990 && r.latency.p50_us <= 3010);
        // The failure's latency is apart from the successes'.
        assert_eq!(r.error_latency.p50_us, 120);
        assert_eq!(r.error_latency.max_us, 120);
        let text = r.to_string();
        assert!(
            text.contains("latency of failed calls (ms): p50 0.120"),
            "{text}"
        );
        assert!(text.contains("UNAVAILABLE"), "{text}");
        assert!(text.contains("regions:"), "{text}");
        assert!(text.contains("60.00%"), "{text}");
        assert_eq!(r.retried, 1);
        assert!(
            text.contains("retried or hedged by the router: 1"),
            "{text}"
        );
        // Calls due at 0, 30, 60 ms; 90 ms (retried); nothing in 100-199 ms; a failure and a
        // success in 200-299 ms.
        assert_eq!(r.timeline.len(), 3);
        assert_eq!(r.timeline[0].t_ms, 0);
        assert_eq!(r.timeline[0].ok["a"], 3);
        assert_eq!(r.timeline[0].ok["b"], 1);
        assert_eq!(r.timeline[0].retried, 1);
        assert_eq!(r.timeline[0].p50_us, 2000);
        assert_eq!(r.timeline[0].max_us, 4000);
        assert_eq!(
            r.timeline[1],
            TimelineBucket {
                t_ms: 100,
                ..TimelineBucket::default()
            }
        );
        assert_eq!(r.timeline[2].t_ms, 200);
        assert_eq!(r.timeline[2].failed, 1);
        assert_eq!(r.timeline[2].ok["b"], 1);
        // The histogram: every successful call once, in ascending buckets, within the
        // histogram's precision of what was recorded.
        let h = &r.latency_histogram;
        assert_eq!(h.iter().map(|[_, n]| n).sum::<u64>(), r.ok);
        assert!(h.windows(2).all(|w| w[0][0] < w[1][0]), "{h:?}");
        assert_eq!(h.len(), 5, "{h:?}");
        assert!((1000..=1001).contains(&h[0][0]), "{h:?}");
        assert!(h[4][0] >= MAX_LATENCY_US, "{h:?}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["latency_histogram"][0][1], 1);
        assert_eq!(json["errors"]["UNAVAILABLE"], 1);
        assert_eq!(json["error_samples"]["UNAVAILABLE"], "node x is down");
        assert_eq!(json["timeline"][2]["failed"], 1);
    }
}
