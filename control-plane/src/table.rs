//! The routing table: node specs, their health, live load and operator overrides combined into
//! the list of endpoints the routers receive.
//!
//! Health here is the probes' verdict, lowered by passive signals (a node failing many calls,
//! or much slower than its peers, is degraded) and by operator state (drained, cordoned).
//! Weights come from [`crate::weights`], damped against the previous table, and a weight is only
//! republished when it moved by more than [`WEIGHT_HYSTERESIS`], so steady load does not turn
//! into a stream of table versions.

use std::collections::HashMap;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::{Endpoint, HealthState, Model, NodeSpec};

use crate::health::NodeHealth;
use crate::load::{LoadView, NodeLoadSummary};
use crate::overrides::Overrides;
use crate::weights::{self, Signals};

/// A weight is republished only when it differs from the published one by more than this
/// share: 5 % is below what changes routing noticeably, and above the jitter of load reports.
pub const WEIGHT_HYSTERESIS: f64 = 0.05;

/// A node failing more than this share of its calls (with enough calls to tell) is degraded.
/// A fifth is far above any healthy error rate and well below "everything fails", which the
/// probes and the routers' ejection handle.
const DEGRADED_ERROR_RATIO: f64 = 0.2;

/// Fewest calls per second for the error ratio to count: a couple of failures of a quiet node
/// are not a signal.
const MIN_CALLS_FOR_ERRORS: f64 = 5.0;

/// A node this many times slower than the median of its peers is degraded.
const DEGRADED_LATENCY_RATIO: f64 = 3.0;

/// What the table is built from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Registered nodes.
    pub specs: &'a [NodeSpec],
    /// Probe results.
    pub health: &'a HashMap<String, NodeHealth>,
    /// Operator overrides.
    pub overrides: &'a Overrides,
    /// Live load, summed over routers.
    pub load: &'a LoadView,
    /// Weights of the previous table, by node id, for damping.
    pub previous: &'a HashMap<String, f64>,
    /// Time since the previous table was computed.
    pub elapsed: Duration,
}

/// The id of an endpoint's node ("" for an endpoint without a spec, which is never built).
pub fn node_id(e: &Endpoint) -> &str {
    e.spec.as_ref().map_or("", |s| s.id.as_str())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// The models a node serves: those it was registered with, or else those its server listed.
fn model_names<'a>(spec: &'a NodeSpec, h: Option<&'a NodeHealth>) -> impl Iterator<Item = &'a str> {
    let declared = spec.models.iter().map(|m| m.name.as_str());
    let discovered = h
        .filter(|_| spec.models.is_empty())
        .into_iter()
        .flat_map(|h| h.discovered.iter().map(String::as_str));
    declared.chain(discovered)
}

/// The node's spec as the routers get it: a node registered without models carries those its
/// server listed (routers know a node's models from its spec only).
fn with_discovered_models(spec: &NodeSpec, h: Option<&NodeHealth>) -> NodeSpec {
    let mut spec = spec.clone();
    if spec.models.is_empty()
        && let Some(h) = h
    {
        spec.models = h
            .discovered
            .iter()
            .map(|name| Model {
                name: name.clone(),
                versions: vec![],
            })
            .collect();
    }
    spec
}

/// Median latency of the nodes serving each model, by model name: a node's peers are those
/// sharing a model with it. (Nodes registered without models count toward no median: their
/// models are known only from probes.)
pub fn peer_medians<'a>(
    specs: impl IntoIterator<Item = &'a NodeSpec>,
    load: &LoadView,
) -> HashMap<String, f64> {
    let mut latencies: HashMap<&str, Vec<f64>> = HashMap::new();
    for spec in specs {
        if let Some(l) = load.get(&spec.id).and_then(|l| l.latency_ms) {
            for m in &spec.models {
                latencies.entry(m.name.as_str()).or_default().push(l);
            }
        }
    }
    latencies
        .into_iter()
        .filter_map(|(m, v)| Some((m.to_owned(), median(v)?)))
        .collect()
}

/// What of a node's load its entry depends on ([`endpoint`] reads nothing else of it): two
/// loads with the same signals give the same entry, so a change elsewhere (the call rate of a
/// node without errors, the time of its own report) needs no new computation. At 10,000 nodes
/// under 1,000 routers, every load sum moves a little every second (each router's call rate is
/// counted over the time between its reports); passes recomputed thousands of nodes for that
/// (30 to 45 ms each on the benchmark's machine), and a weight change waited behind them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSignals {
    /// What the utilization is made of (to an eighth of a call, see `load`).
    mean_in_flight: f64,
    latency_ms: Option<f64>,
    /// The error ratio when the call rate is high enough for it to count, else 0.
    error_ratio: f64,
    /// The node's own utilization, in flight and whether it queues.
    reported: Option<(f64, u32, bool)>,
}

impl LoadSignals {
    /// The signals of a node's load, if it has any.
    pub fn of(load: Option<&NodeLoadSummary>) -> Option<Self> {
        load.map(|l| Self {
            mean_in_flight: l.mean_in_flight,
            latency_ms: l.latency_ms,
            error_ratio: errors_that_count(l),
            reported: l
                .reported
                .as_ref()
                .map(|r| (r.utilization, r.in_flight, r.queue_depth > 0)),
        })
    }
}

/// The error ratio the weights use: none below [`MIN_CALLS_FOR_ERRORS`] calls a second.
fn errors_that_count(l: &NodeLoadSummary) -> f64 {
    if l.calls_per_sec >= MIN_CALLS_FOR_ERRORS {
        l.error_ratio()
    } else {
        0.0
    }
}

/// Everything one node's entry depends on.
#[derive(Debug, Clone, Copy)]
pub struct NodeInputs<'a> {
    /// The node.
    pub spec: &'a NodeSpec,
    /// Its probe results, if probed.
    pub health: Option<&'a NodeHealth>,
    /// Operator overrides.
    pub overrides: &'a Overrides,
    /// Its live load, if reported.
    pub load: Option<&'a NodeLoadSummary>,
    /// Median latency per model ([`peer_medians`]).
    pub medians: &'a HashMap<String, f64>,
    /// Its weight in the previous table, if it was in it.
    pub previous: Option<f64>,
    /// Time since that weight was set.
    pub elapsed: Duration,
}

/// One node's entry, and whether it is settled: whether computing it again later with the same
/// inputs gives the same entry. An unsettled weight is still moving toward its target (damping)
/// and must be computed again.
pub fn endpoint(i: &NodeInputs<'_>) -> (Endpoint, bool) {
    let spec = i.spec;
    let h = i.health;
    let load = i.load;
    let peer_latency = model_names(spec, h)
        .filter_map(|m| i.medians.get(m).copied())
        .reduce(f64::min);
    let latency_ratio = match (load.and_then(|l| l.latency_ms), peer_latency) {
        (Some(l), Some(p)) if p > 0.0 => Some(l / p),
        _ => None,
    };
    let error_ratio = load.map_or(0.0, errors_that_count);
    let mut state = h.map_or(HealthState::Unspecified, |h| h.state);
    if state == HealthState::Healthy
        && (error_ratio > DEGRADED_ERROR_RATIO
            || latency_ratio.is_some_and(|r| r > DEGRADED_LATENCY_RATIO))
    {
        state = HealthState::Degraded;
    }
    if i.overrides.cordoned.contains(&spec.id) {
        state = HealthState::Cordoned;
    }
    if i.overrides.drained.contains(&spec.id) {
        state = HealthState::Draining;
    }
    let capacity = spec.capacity.max(0) as f64;
    let signals = Signals {
        capacity,
        state,
        utilization: load.map(|l| l.utilization(capacity)),
        latency_ratio,
        error_ratio,
        override_weight: i.overrides.weights.get(&spec.id).copied(),
    };
    let target = if i.overrides.evacuated.contains(&spec.region) {
        0.0
    } else {
        weights::target(&signals)
    };
    let previous = i.previous;
    // An operator's weight is a decision, not a signal: it applies at once, exactly.
    // Damping guards against the fleet chasing its own load, which an override is not.
    let overridden = signals.override_weight.is_some();
    let mut weight = if overridden {
        target
    } else {
        weights::damp(previous, target, i.elapsed)
    };
    if let Some(p) = previous
        && !overridden
        && weight > 0.0
        && (weight - p).abs() <= WEIGHT_HYSTERESIS * p
    {
        weight = p;
    }
    // Settled: at the target, or within the hysteresis of it (where it stays however long
    // it waits).
    let settled =
        weight == target || (weight > 0.0 && (target - weight).abs() <= WEIGHT_HYSTERESIS * weight);
    let endpoint = Endpoint {
        spec: Some(with_discovered_models(spec, h)),
        health: state as i32,
        weight,
        ready_models: h.map(|h| h.ready_models.clone()).unwrap_or_default(),
    };
    (endpoint, settled)
}

/// Builds the endpoints (sorted by node id).
pub fn build(i: &Inputs<'_>) -> Vec<Endpoint> {
    let medians = peer_medians(i.specs, i.load);
    let mut endpoints: Vec<Endpoint> = i
        .specs
        .iter()
        .map(|spec| {
            endpoint(&NodeInputs {
                spec,
                health: i.health.get(&spec.id),
                overrides: i.overrides,
                load: i.load.get(&spec.id),
                medians: &medians,
                previous: i.previous.get(&spec.id).copied(),
                elapsed: i.elapsed,
            })
            .0
        })
        .collect();
    endpoints.sort_by(|a, b| node_id(a).cmp(node_id(b)));
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::fulcrum::v1::Model;

    fn spec(id: &str, region: &str) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            region: region.into(),
            capacity: 8,
            models: vec![Model {
                name: "m".into(),
                versions: vec![],
            }],
            ..Default::default()
        }
    }

    fn healthy(ids: &[&str]) -> HashMap<String, NodeHealth> {
        ids.iter()
            .map(|id| {
                (
                    id.to_string(),
                    NodeHealth {
                        state: HealthState::Healthy,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    fn build_with(specs: &[NodeSpec], o: &Overrides, load: &LoadView) -> Vec<Endpoint> {
        let ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        build(&Inputs {
            specs,
            health: &healthy(&ids),
            overrides: o,
            load,
            previous: &HashMap::new(),
            elapsed: Duration::from_secs(1),
        })
    }

    #[test]
    fn a_node_registered_without_models_carries_those_its_server_listed() {
        let mut bare = spec("d", "a");
        bare.models.clear();
        let specs = vec![spec("a1", "a"), bare];
        let mut health = healthy(&["a1", "d"]);
        health.get_mut("d").unwrap().discovered = vec!["m".into(), "x".into()];
        // Declared models win: a node's own list is never replaced.
        health.get_mut("a1").unwrap().discovered = vec!["other".into()];
        let load = LoadView::default();
        let overrides = Overrides::default();
        let previous = HashMap::new();
        let endpoints = build(&Inputs {
            specs: &specs,
            health: &health,
            load: &load,
            overrides: &overrides,
            previous: &previous,
            elapsed: Duration::from_secs(1),
        });
        let models = |id: &str| -> Vec<String> {
            let e = endpoints.iter().find(|e| node_id(e) == id).unwrap();
            e.spec
                .as_ref()
                .unwrap()
                .models
                .iter()
                .map(|m| m.name.clone())
                .collect()
        };
        assert_eq!(models("d"), ["m", "x"]);
        assert_eq!(models("a1"), ["m"]);
    }

    #[test]
    fn operator_state_wins() {
        let specs = [
            spec("d", "a"),
            spec("c", "a"),
            spec("w", "a"),
            spec("e", "b"),
        ];
        let mut o = Overrides::default();
        o.drained.insert("d".into());
        o.cordoned.insert("c".into());
        o.weights.insert("w".into(), 2.5);
        o.evacuated.insert("b".into());
        let t = build_with(&specs, &o, &LoadView::new());
        let by = |id: &str| t.iter().find(|e| node_id(e) == id).unwrap().clone();
        assert_eq!(
            (by("d").health(), by("d").weight),
            (HealthState::Draining, 0.0)
        );
        assert_eq!(
            (by("c").health(), by("c").weight),
            (HealthState::Cordoned, 0.0)
        );
        assert_eq!(by("w").weight, 2.5);
        assert_eq!(by("e").weight, 0.0);
        assert_eq!(
            by("e").health(),
            HealthState::Healthy,
            "evacuation is not a health verdict"
        );
    }

    #[test]
    fn passive_signals_degrade_and_load_lowers_weight() {
        let specs = [
            spec("ok", "a"),
            spec("busy", "a"),
            spec("failing", "a"),
            spec("slow", "a"),
        ];
        let mut load = LoadView::new();
        let l = |in_flight, calls, errors, lat| NodeLoadSummary {
            in_flight,
            mean_in_flight: f64::from(in_flight),
            calls_per_sec: calls,
            errors_per_sec: errors,
            latency_ms: Some(lat),
            reported: None,
        };
        load.insert("ok".into(), l(0, 100.0, 0.0, 10.0));
        load.insert("busy".into(), l(8, 100.0, 0.0, 10.0));
        load.insert("failing".into(), l(0, 100.0, 50.0, 10.0));
        load.insert("slow".into(), l(0, 100.0, 0.0, 50.0));
        let mut self_busy = l(0, 100.0, 0.0, 10.0);
        self_busy.reported = Some(crate::load::SelfLoad {
            utilization: 0.95,
            ..Default::default()
        });
        load.insert("self-busy".into(), self_busy);
        let specs = [specs.as_slice(), &[spec("self-busy", "a")]].concat();
        let t = build_with(&specs, &Overrides::default(), &load);
        let by = |id: &str| t.iter().find(|e| node_id(e) == id).unwrap().clone();
        assert_eq!(by("ok").health(), HealthState::Healthy);
        assert!(by("busy").weight < by("ok").weight);
        assert!(
            by("self-busy").weight < by("ok").weight / 2.0,
            "a node saying it is busy keeps its weight"
        );
        assert_eq!(by("failing").health(), HealthState::Degraded);
        assert_eq!(by("slow").health(), HealthState::Degraded);
        assert!(by("slow").weight < by("ok").weight / 2.0);
    }

    #[test]
    fn an_override_applies_at_once() {
        let specs = [spec("n", "a")];
        let previous = HashMap::from([("n".to_string(), 8.0)]);
        let mut o = Overrides::default();
        o.weights.insert("n".into(), 7.8);
        let t = build(&Inputs {
            specs: &specs,
            health: &healthy(&["n"]),
            overrides: &o,
            load: &LoadView::new(),
            previous: &previous,
            elapsed: Duration::from_millis(10),
        });
        assert_eq!(t[0].weight, 7.8, "damped or held back by the hysteresis");
    }

    #[test]
    fn load_signals_are_what_the_entry_reads() {
        let base = NodeLoadSummary {
            in_flight: 1,
            mean_in_flight: 1.0,
            calls_per_sec: 10.0,
            latency_ms: Some(10.0),
            ..Default::default()
        };
        let sig = |l: &NodeLoadSummary| LoadSignals::of(Some(l));
        let jitter = NodeLoadSummary {
            calls_per_sec: 10.4,
            ..base.clone()
        };
        assert_eq!(
            sig(&base),
            sig(&jitter),
            "the call rate alone, without errors"
        );
        let busier = NodeLoadSummary {
            mean_in_flight: 1.5,
            ..base.clone()
        };
        assert_ne!(sig(&base), sig(&busier));
        let snapshot = NodeLoadSummary {
            in_flight: 3,
            ..base.clone()
        };
        assert_eq!(
            sig(&base),
            sig(&snapshot),
            "the count at one instant: the mean is what counts"
        );
        let failing = NodeLoadSummary {
            errors_per_sec: 5.0,
            ..base.clone()
        };
        assert_ne!(sig(&base), sig(&failing), "errors at a rate that counts");
        let few = NodeLoadSummary {
            calls_per_sec: 1.0,
            errors_per_sec: 1.0,
            ..base.clone()
        };
        let fewer = NodeLoadSummary {
            calls_per_sec: 2.0,
            ..few.clone()
        };
        assert_eq!(sig(&few), sig(&fewer), "too few calls for errors to count");
        assert_ne!(LoadSignals::of(None), sig(&base));
        // Whatever the signals do not hold, the entry does not depend on: equal signals, equal
        // entries.
        let spec = spec("n", "a");
        let entry = |l: &NodeLoadSummary| {
            endpoint(&NodeInputs {
                spec: &spec,
                health: healthy(&["n"]).get("n"),
                overrides: &Overrides::default(),
                load: Some(l),
                medians: &HashMap::from([("m".to_string(), 10.0)]),
                previous: None,
                elapsed: Duration::ZERO,
            })
        };
        assert_eq!(entry(&base), entry(&jitter));
        assert_eq!(entry(&base), entry(&snapshot));
        assert_eq!(entry(&few), entry(&fewer));
    }

    #[test]
    fn small_moves_are_not_republished() {
        let specs = [spec("n", "a")];
        let previous = HashMap::from([("n".to_string(), 8.1)]);
        let t = build(&Inputs {
            specs: &specs,
            health: &healthy(&["n"]),
            overrides: &Overrides::default(),
            load: &LoadView::new(),
            previous: &previous,
            elapsed: Duration::from_secs(1),
        });
        assert_eq!(t[0].weight, 8.1, "a 1 % move changed the published weight");
    }
}
