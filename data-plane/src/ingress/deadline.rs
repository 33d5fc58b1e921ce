//! The gRPC deadline a caller sends in the `grpc-timeout` header.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// Taken off the caller's deadline so the router answers DEADLINE_EXCEEDED itself, a little
/// before tonic's own server timer (which starts when the request arrives, and would answer
/// CANCELLED) and before the caller gives up: five milliseconds cover the time between arrival
/// and the handler, tokio's millisecond timer rounding up, and the trip back.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// The time budget of a call: the caller's `grpc-timeout` (less [`DEADLINE_MARGIN`]) if it sent
/// a valid one, else `default`.
pub fn budget(metadata: &MetadataMap, default: Duration) -> Duration {
    fulcrum_grpc_h2::timeout::of(metadata.as_ref())
        .map_or(default, |d| d.saturating_sub(DEADLINE_MARGIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_the_callers_deadline_less_the_margin_else_the_default() {
        let default = Duration::from_secs(30);
        let mut metadata = MetadataMap::new();
        assert_eq!(budget(&metadata, default), default);
        metadata.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(budget(&metadata, default), Duration::from_millis(245));
        metadata.insert("grpc-timeout", "2m".parse().unwrap());
        assert_eq!(budget(&metadata, default), Duration::ZERO);
        metadata.insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(budget(&metadata, default), default);
    }
}
