//! Call priorities: which calls a full router serves first and sheds last.
//!
//! A call names its priority in the `fulcrum-priority` request header (`critical`, `normal` or
//! `sheddable`); one that names none takes its model's default (`ModelPolicy.default_priority`,
//! normal unless set). Priorities matter only once every node a call could use is at its
//! concurrency limit: the wait queue ([`crate::queue`]) then serves critical calls before
//! normal ones and normal before sheddable, oldest first within a priority; a call's expected
//! wait counts only the calls ahead of it, so a sheddable backlog never sheds a critical call;
//! and a full queue gives the place of its newest call of the lowest priority to an arriving
//! call of a higher one. Below the limits every call is routed alike.
//!
//! Three levels, as in the seed article's two (urgent within 500 ms, ordinary within 2 s) plus
//! one for work that may be dropped outright (batch scoring, prefetching); more levels would
//! ask callers to tell apart what operators cannot.

use fulcrum_proto::fulcrum::v1::Priority as ProtoPriority;
use http::HeaderMap;

use crate::error::RouteError;

/// The request header naming a call's priority.
pub const PRIORITY_HEADER: &str = "fulcrum-priority";

/// A call's priority, lowest first (so `Critical` is the greatest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Served after every other waiting call, shed first.
    Sheddable = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Served before every other waiting call, shed last.
    Critical = 2,
}

impl Priority {
    /// Every priority, lowest first; `ALL[p.index()] == p`.
    pub const ALL: [Priority; 3] = [Priority::Sheddable, Priority::Normal, Priority::Critical];

    /// The priority's place in [`Priority::ALL`] (for per-priority counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name, as the header and the metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Sheddable => "sheddable",
            Priority::Normal => "normal",
            Priority::Critical => "critical",
        }
    }

    /// The priority named `name` (`critical`, `normal`, `sheddable`; any case), if it is one.
    pub fn from_name(name: &str) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| name.eq_ignore_ascii_case(p.name()))
    }

    /// The priority a policy sets (unknown values, which the control plane refuses, are normal).
    pub fn from_proto(p: i32) -> Self {
        match ProtoPriority::try_from(p) {
            Ok(ProtoPriority::Critical) => Priority::Critical,
            Ok(ProtoPriority::Sheddable) => Priority::Sheddable,
            Ok(ProtoPriority::Normal | ProtoPriority::Unspecified) | Err(_) => Priority::Normal,
        }
    }

    /// The priority a request names in [`PRIORITY_HEADER`], or `default` when it names none.
    /// A value that is not a priority is refused (INVALID_ARGUMENT) rather than guessed at: a
    /// caller that misspells `critical` must learn it before an overload, not during one.
    pub fn of(headers: &HeaderMap, default: Priority) -> Result<Priority, RouteError> {
        let mut values = headers.get_all(PRIORITY_HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(default);
        };
        if values.next().is_some() {
            return Err(RouteError::InvalidRequest(format!(
                "the {PRIORITY_HEADER} header is given more than once; give it once"
            )));
        }
        Priority::from_name(value.to_str().unwrap_or("").trim()).ok_or_else(|| {
            RouteError::InvalidRequest(format!(
                "{PRIORITY_HEADER} {:?} is not a priority: use critical, normal or sheddable",
                String::from_utf8_lossy(value.as_bytes())
            ))
        })
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(PRIORITY_HEADER, http::HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn a_request_names_its_priority_or_takes_the_default() {
        for d in Priority::ALL {
            assert_eq!(Priority::of(&HeaderMap::new(), d).unwrap(), d);
        }
        for p in Priority::ALL {
            let got = Priority::of(&headers(&[p.name().as_bytes()]), Priority::Sheddable);
            assert_eq!(got.unwrap(), p);
            assert_eq!(Priority::ALL[p.index()], p);
        }
        let got = Priority::of(&headers(&[b" Critical "]), Priority::Normal).unwrap();
        assert_eq!(got, Priority::Critical);
        assert!(Priority::Critical > Priority::Normal && Priority::Normal > Priority::Sheddable);
    }

    #[test]
    fn a_value_that_is_not_a_priority_is_refused_with_what_was_given() {
        for bad in [&b"urgent"[..], b"", b"1", b"\xff"] {
            let e = Priority::of(&headers(&[bad]), Priority::Normal).unwrap_err();
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("critical, normal or sheddable"));
        }
        let e = Priority::of(&headers(&[b"urgent"]), Priority::Normal).unwrap_err();
        assert!(e.to_string().contains("\"urgent\""), "{e}");
        let e = Priority::of(&headers(&[b"critical", b"sheddable"]), Priority::Normal).unwrap_err();
        assert!(e.to_string().contains("more than once"), "{e}");
    }

    #[test]
    fn policies_map_onto_priorities() {
        assert_eq!(Priority::from_proto(0), Priority::Normal);
        assert_eq!(
            Priority::from_proto(ProtoPriority::Critical as i32),
            Priority::Critical
        );
        assert_eq!(
            Priority::from_proto(ProtoPriority::Sheddable as i32),
            Priority::Sheddable
        );
        assert_eq!(
            Priority::from_proto(ProtoPriority::Normal as i32),
            Priority::Normal
        );
        assert_eq!(Priority::from_proto(99), Priority::Normal);
    }
}
