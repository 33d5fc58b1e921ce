//! The mass-failure guard ("fail open"): when the probes would take more than a share of the
//! routable fleet out of the routing table at once, and the nodes' own signals do not confirm
//! it, the likelier cause is the observer (a prober starved of CPU, its network path to the
//! nodes broken), not the fleet: the control plane then holds those nodes' last state instead
//! of publishing them unhealthy, and keeps probing. Envoy's panic threshold and Kubernetes'
//! node-lifecycle controller (which stops evicting when most of every zone goes NotReady at
//! once) guard against the same failure.
//!
//! [`decide`] is the whole decision, pure: given each node's previous (published) state, the
//! probes' verdict and the nodes' own signals, which nodes to hold. The control loop feeds it
//! and publishes what it decides.
//!
//! What counts, per region:
//! - *at stake*: nodes the routers can use (published healthy or degraded, held ones included),
//!   and those the probes took out within the last [`window`] (a fleet's probes do not all fail
//!   in the same pass: their phases are spread over an interval);
//! - *suspects*: nodes at stake whose probes failed without an answer (timeouts, connections
//!   that hang or break). A node that answered "not ready", or whose host refused the
//!   connection, spoke for itself; so did one the routers' calls all fail on. Those are
//!   published at once, whatever else fails with them.
//!
//! A region is *disrupted* when its suspects are more than the threshold's share of its nodes
//! at stake. Then:
//! - every region (that has nodes at stake) disrupted: the one thing they share is the
//!   observer. Every suspect is held.
//! - some regions disrupted, others fine: the observer demonstrably reaches the fine ones, so
//!   the disrupted ones are taken as what they look like, a data center (or the path to it)
//!   going dark, which must reach the routers as fast as any failure: their suspects are
//!   published unhealthy, except those that show life on their own (a self-report received
//!   after their probes began to fail, and recent): then it is the observer's path to them
//!   that broke.
//! - no region disrupted: the probes are trusted, as without the guard.
//!
//! Fewer than [`MIN_SUSPECTS`] suspects never trip it. A held node stays at stake and suspect
//! (it is still published routable) while its probes fail, so the guard holds as long as the
//! cause lasts. A held node whose probes pass again but have not yet made it healthy
//! (*recovering*) stays held. When the cause clears, the fleet's probes do not all pass in the
//! same instant: nodes still held stay held for a grace of one [`window`] after the guard last
//! tripped (those not back by then are published with their probes' verdict). A held node
//! whose failure gets confirmed is let go at once.
//!
//! The routers' calls are read as confirmation only (errors and no success confirm a failure),
//! not as life: a replica's sum of its routers' reports can carry calls up to a few seconds
//! old (`load`'s report TTLs), which would hold a data center that just went dark for that
//! long. A self-report says when it was received, so it can be told apart from the failure.
//!
//! A single-region fleet that truly goes dark all at once, with no router calling it, is held:
//! there is nothing left to route to either way, and the routers' own failure handling
//! (ejection, retries) applies to what they are given.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::prober::ProbeConfig;
use crate::load::NodeLoadSummary;

/// The default threshold: more than half of a region's routable nodes failing their probes at
/// once. Envoy's panic threshold is 50 % too, and Kubernetes calls a zone disrupted at 55 %
/// NotReady. Independent node failures rarely take half a fleet in one probe interval, while
/// an observer's failure takes all of it; below half, the routers still have most of the fleet
/// to spread over, so publishing a large but partial failure costs less than holding it.
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// Fewest suspects that trip the guard. One or two nodes failing together is ordinary
/// (Kubernetes also asks for more than two NotReady nodes before it calls a zone disrupted); a
/// one- or two-node fleet is guarded by the prober's lateness check instead.
pub const MIN_SUSPECTS: usize = 3;

/// A node's own report at most this old shows it alive: nodes report every half second and
/// replicas pass the reports on every second, so a live node's report reaches the leader well
/// within three seconds, and one that stopped reporting is stale after it.
pub const ALIVE_REPORT_AGE: Duration = Duration::from_secs(3);

/// How long a node's own report may take to reach the leader: the node's report interval
/// (half a second), the replica's publish interval (a second) and half a second of margin. The
/// guard's [`window`] is at least this, so that a node published unhealthy before its report
/// showed it alive is still held (restored) when the report arrives.
const SIGNAL_DELAY: Duration = Duration::from_secs(2);

/// How long a node's move to unhealthy still counts as part of one mass event: a fleet's probe
/// phases are spread over one interval, and a probe fails a timeout after it starts; twice the
/// interval plus the timeout covers that with an interval to spare for a loaded scheduler, and
/// it is at least [`SIGNAL_DELAY`]. With the default probes (1 s, 1 s) it is 3 s.
pub fn window(probe: &ProbeConfig) -> Duration {
    (probe.interval * 2 + probe.timeout).max(SIGNAL_DELAY)
}

/// Whether a threshold turns the guard on: 0 and 1 (and anything outside) turn it off.
pub fn enabled(threshold: f64) -> bool {
    threshold > 0.0 && threshold < 1.0
}

/// What the routers had for a node before this decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// Routable: published healthy or degraded (or held so).
    Routable,
    /// Published unhealthy by its probes within the last [`window`].
    RecentlyMoved,
    /// Anything else (unhealthy for longer, drained, cordoned): not at stake.
    Other,
}

/// What the probes say of a node now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not unhealthy (or not probed yet).
    Up,
    /// Unhealthy, and the node answered (not ready, not serving, connection refused).
    DownAnswered,
    /// Unhealthy, and the node did not answer.
    DownUnanswered,
    /// Unhealthy, but its last probe passed: on its way back.
    Recovering,
}

/// What a node says of itself, and what the routers' calls to it say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Passive {
    /// Alive: it reported itself since its probes began to fail, recently.
    pub alive: bool,
    /// The routers' calls to it fail, none succeeding: the failure is confirmed.
    pub calls_failing: bool,
}

impl Passive {
    /// The signals in a node's load, as the leader merged it at `now_unix_ms`, for a node
    /// whose probes began to fail at `failing_since_unix_ms` (the leader's clock against the
    /// receiving replica's: replicas' clocks are assumed kept within a fraction of a second).
    pub fn of(
        load: Option<&NodeLoadSummary>,
        now_unix_ms: u64,
        failing_since_unix_ms: u64,
    ) -> Self {
        let Some(l) = load else {
            return Self::default();
        };
        let succeeded = l.calls_per_sec - l.errors_per_sec;
        let alive = l.reported.as_ref().is_some_and(|r| {
            r.at_unix_ms > failing_since_unix_ms
                && now_unix_ms.saturating_sub(r.at_unix_ms) <= ALIVE_REPORT_AGE.as_millis() as u64
        });
        Self {
            alive,
            calls_failing: l.errors_per_sec > 0.0 && succeeded <= 0.0,
        }
    }
}

/// One node, as the guard sees it.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    /// Its region.
    pub region: &'a str,
    /// What the routers had.
    pub previous: Previous,
    /// What the probes say now.
    pub verdict: Verdict,
    /// What it and the routers say.
    pub passive: Passive,
    /// Held by the last decision.
    pub held: bool,
}

impl NodeView<'_> {
    fn at_stake(&self) -> bool {
        self.previous != Previous::Other
    }

    fn suspect(&self) -> bool {
        self.at_stake() && self.verdict == Verdict::DownUnanswered && !self.passive.calls_failing
    }

    /// Held before, and still to be: back on its way (or, in the grace after the guard last
    /// tripped, still failing without an answer), unconfirmed.
    fn stays_held(&self, grace: bool) -> bool {
        self.held
            && !self.passive.calls_failing
            && (self.verdict == Verdict::Recovering
                || (grace && self.verdict == Verdict::DownUnanswered))
    }
}

/// Why the guard holds nodes, or does not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Trip {
    /// Nothing out of the ordinary: the probes' verdicts are published.
    #[default]
    Clear,
    /// Every region with routable nodes lost more than the threshold at once: the observer is
    /// the likelier cause; every suspect is held.
    Everywhere,
    /// These regions lost more than the threshold while others are fine: a data-center
    /// failure, published, but for the nodes that show life on their own.
    Regions(Vec<String>),
}

/// What the guard decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Nodes whose previous state is to be published instead of their probes' verdict.
    pub hold: BTreeSet<String>,
    /// Why.
    pub trip: Trip,
    /// Suspects (nodes at stake failing without an answer, unconfirmed), over all regions.
    pub suspects: usize,
    /// Nodes at stake, over all regions.
    pub at_stake: usize,
}

impl Decision {
    /// Whether the guard tripped: it holds nodes because of this decision's failures, not only
    /// those of earlier ones.
    pub fn tripped(&self) -> bool {
        match &self.trip {
            Trip::Clear => false,
            Trip::Everywhere => true,
            Trip::Regions(_) => !self.hold.is_empty(),
        }
    }
}

/// Decides which nodes to hold, from every node at stake and every node held before (others
/// may be given too: they are ignored), the threshold (a share of a region's nodes at stake;
/// see [`enabled`]), and whether the guard tripped within the last [`window`] (`grace`).
pub fn decide<'a>(
    nodes: impl IntoIterator<Item = (&'a str, NodeView<'a>)>,
    threshold: f64,
    grace: bool,
) -> Decision {
    #[derive(Default)]
    struct Region<'a> {
        at_stake: usize,
        suspects: Vec<(&'a str, Passive)>,
    }
    let mut regions: BTreeMap<&str, Region<'_>> = BTreeMap::new();
    let mut kept: Vec<(&str, bool)> = Vec::new();
    for (id, n) in nodes {
        if n.held {
            kept.push((id, n.stays_held(grace)));
        }
        if !n.at_stake() {
            continue;
        }
        let r = regions.entry(n.region).or_default();
        r.at_stake += 1;
        if n.suspect() {
            r.suspects.push((id, n.passive));
        }
    }
    let suspects: usize = regions.values().map(|r| r.suspects.len()).sum();
    let at_stake: usize = regions.values().map(|r| r.at_stake).sum();
    let mut d = Decision {
        suspects,
        at_stake,
        ..Decision::default()
    };
    if !enabled(threshold) {
        return d;
    }
    let disrupted: Vec<&str> = regions
        .iter()
        .filter(|(_, r)| r.suspects.len() as f64 > threshold * r.at_stake as f64)
        .map(|(name, _)| *name)
        .collect();
    if suspects < MIN_SUSPECTS || disrupted.is_empty() {
        // Those held before and still to be, in the grace after the guard last tripped.
        d.hold = kept
            .iter()
            .filter(|(_, stays)| *stays)
            .map(|(id, _)| (*id).to_owned())
            .collect();
        return d;
    }
    if disrupted.len() == regions.len() {
        d.trip = Trip::Everywhere;
        d.hold = regions
            .values()
            .flat_map(|r| &r.suspects)
            .map(|(id, _)| (*id).to_owned())
            .collect();
    } else {
        d.trip = Trip::Regions(disrupted.iter().map(|r| (*r).to_owned()).collect());
        d.hold = disrupted
            .iter()
            .flat_map(|name| &regions[name].suspects)
            .filter(|(_, p)| p.alive)
            .map(|(id, _)| (*id).to_owned())
            .collect();
    }
    // Nodes held before that are on their way back stay held while the guard holds.
    let recovering = kept.iter().filter(|(_, stays)| *stays);
    d.hold.extend(recovering.map(|(id, _)| (*id).to_owned()));
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UP: Verdict = Verdict::Up;
    const NO_ANSWER: Verdict = Verdict::DownUnanswered;
    const ALIVE: Passive = Passive {
        alive: true,
        calls_failing: false,
    };
    const SILENT: Passive = Passive {
        alive: false,
        calls_failing: false,
    };

    /// A fleet: `(region, nodes, failing without an answer, of which alive)`, every node
    /// routable before. Node ids are `<region>-<i>`, failing ones first.
    fn fleet(spec: &[(&'static str, usize, usize, usize)]) -> Vec<(String, NodeView<'static>)> {
        let mut v = Vec::new();
        for &(region, n, failing, alive) in spec {
            for i in 0..n {
                v.push((
                    format!("{region}-{i}"),
                    NodeView {
                        region,
                        previous: Previous::Routable,
                        verdict: if i < failing { NO_ANSWER } else { UP },
                        passive: if i < alive { ALIVE } else { SILENT },
                        held: false,
                    },
                ));
            }
        }
        v
    }

    fn run(nodes: &[(String, NodeView<'static>)], threshold: f64) -> Decision {
        decide(
            nodes.iter().map(|(id, n)| (id.as_str(), *n)),
            threshold,
            false,
        )
    }

    /// The next decision after `d`, `held` set from it.
    fn next(nodes: &mut [(String, NodeView<'static>)], d: &Decision, grace: bool) -> Decision {
        for (id, n) in nodes.iter_mut() {
            n.held = d.hold.contains(id);
            if n.held {
                n.previous = Previous::Routable;
            }
        }
        decide(
            nodes.iter().map(|(id, n)| (id.as_str(), *n)),
            DEFAULT_THRESHOLD,
            grace,
        )
    }

    #[test]
    fn most_of_a_fleet_failing_at_once_is_held() {
        let nodes = fleet(&[("a", 10, 8, 0)]);
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!(d.trip, Trip::Everywhere);
        assert_eq!(d.hold.len(), 8);
        assert_eq!((d.suspects, d.at_stake), (8, 10));
        // Spread over two regions alike: the observer again.
        let nodes = fleet(&[("a", 10, 8, 0), ("b", 10, 9, 0)]);
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!(d.trip, Trip::Everywhere);
        assert_eq!(d.hold.len(), 17);
    }

    #[test]
    fn a_small_share_failing_is_published() {
        let nodes = fleet(&[("a", 10, 1, 0)]);
        assert_eq!(
            run(&nodes, DEFAULT_THRESHOLD),
            Decision {
                suspects: 1,
                at_stake: 10,
                ..Decision::default()
            }
        );
        // Even with most of a smaller region: 3 of 10 and 3 of 10.
        let nodes = fleet(&[("a", 10, 3, 3), ("b", 10, 3, 3)]);
        assert!(run(&nodes, DEFAULT_THRESHOLD).hold.is_empty());
        // Exactly the threshold is not more than it.
        let nodes = fleet(&[("a", 10, 5, 0)]);
        assert!(run(&nodes, DEFAULT_THRESHOLD).hold.is_empty());
    }

    #[test]
    fn a_whole_region_going_dark_while_the_other_is_fine_is_published() {
        let nodes = fleet(&[("a", 10, 10, 0), ("b", 10, 0, 0)]);
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!(d.trip, Trip::Regions(vec!["a".into()]));
        assert!(d.hold.is_empty(), "a data-center failure is published");
    }

    #[test]
    fn a_region_cut_off_from_the_observer_only_is_held_where_its_nodes_show_life() {
        // Region a's probes all fail, but 7 of its nodes still report themselves or serve
        // the routers' calls: the observer's path to them broke, not they.
        let nodes = fleet(&[("a", 10, 10, 7), ("b", 10, 0, 0)]);
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!(d.trip, Trip::Regions(vec!["a".into()]));
        let expected: BTreeSet<String> = (0..7).map(|i| format!("a-{i}")).collect();
        assert_eq!(d.hold, expected);
    }

    #[test]
    fn answered_and_confirmed_failures_are_never_held_and_do_not_count() {
        let mut nodes = fleet(&[("a", 10, 8, 0)]);
        // Four of the eight answered "not ready", two are confirmed by the routers' calls.
        for (_, n) in &mut nodes[..4] {
            n.verdict = Verdict::DownAnswered;
        }
        for (_, n) in &mut nodes[4..6] {
            n.passive.calls_failing = true;
        }
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!(d.suspects, 2);
        assert!(d.hold.is_empty(), "2 of 10 unconfirmed: published");
        // Seven unanswered and one answered: the seven are held, the one is not.
        let mut nodes = fleet(&[("a", 10, 8, 0)]);
        nodes[0].1.verdict = Verdict::DownAnswered;
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!(d.hold.len(), 7);
        assert!(!d.hold.contains("a-0"));
    }

    #[test]
    fn failures_published_within_the_window_count_and_long_dead_nodes_do_not() {
        // Ten nodes: four already published unhealthy by this event (within the window), two
        // more failing now; four long dead do not count at all.
        let mut nodes = fleet(&[("a", 10, 6, 0)]);
        for (_, n) in &mut nodes[..4] {
            n.previous = Previous::RecentlyMoved;
        }
        nodes.extend((0..4).map(|i| {
            (
                format!("dead-{i}"),
                NodeView {
                    region: "a",
                    previous: Previous::Other,
                    verdict: NO_ANSWER,
                    passive: SILENT,
                    held: false,
                },
            )
        }));
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!((d.suspects, d.at_stake), (6, 10));
        assert_eq!(d.hold.len(), 6, "the recent ones are held (restored) too");
        assert!(d.hold.iter().all(|id| !id.starts_with("dead")));
    }

    #[test]
    fn held_nodes_coming_back_stay_held_until_healthy_and_the_rest_until_the_grace_ends() {
        let mut nodes = fleet(&[("a", 6, 6, 0)]);
        let d = run(&nodes, DEFAULT_THRESHOLD);
        assert_eq!(d.hold.len(), 6);
        // The path is back: four nodes' probes pass once (not healthy yet), two have not been
        // probed since. The guard no longer trips, but nobody is let go in the grace.
        for (_, n) in &mut nodes[..4] {
            n.verdict = Verdict::Recovering;
        }
        let d = next(&mut nodes, &d, true);
        assert!(!d.tripped());
        assert_eq!(d.hold.len(), 6);
        // Two are healthy: not held any more (their probes say healthy, which is their
        // last state anyway); one is confirmed dead by the routers' calls: let go at once.
        nodes[0].1.verdict = UP;
        nodes[1].1.verdict = UP;
        nodes[5].1.passive.calls_failing = true;
        let d = next(&mut nodes, &d, true);
        let held: Vec<&str> = d.hold.iter().map(String::as_str).collect();
        assert_eq!(held, ["a-2", "a-3", "a-4"]);
        // After the grace, a node still failing is published; one recovering stays held.
        let d = next(&mut nodes, &d, false);
        let held: Vec<&str> = d.hold.iter().map(String::as_str).collect();
        assert_eq!(held, ["a-2", "a-3"]);
    }

    #[test]
    fn tiny_fleets_and_disabled_thresholds_never_hold() {
        let nodes = fleet(&[("a", 2, 2, 0)]);
        assert!(run(&nodes, DEFAULT_THRESHOLD).hold.is_empty());
        let nodes = fleet(&[("a", 10, 10, 0)]);
        for off in [0.0, 1.0, -1.0, 2.0, f64::NAN] {
            assert!(run(&nodes, off).hold.is_empty(), "{off}");
        }
        assert_eq!(run(&nodes, 0.99).hold.len(), 10);
    }

    #[test]
    fn passive_signals_read_from_the_load() {
        let now = 1_000_000;
        let load = |calls: f64, errors: f64, report_age_ms: Option<u64>| NodeLoadSummary {
            calls_per_sec: calls,
            errors_per_sec: errors,
            reported: report_age_ms.map(|age| crate::load::SelfLoad {
                at_unix_ms: now - age,
                ..Default::default()
            }),
            ..Default::default()
        };
        // Probes failing for a second.
        let since = now - 1000;
        assert_eq!(Passive::of(None, now, since), SILENT);
        // A report since the probes began to fail: alive.
        assert_eq!(
            Passive::of(Some(&load(0.0, 0.0, Some(500))), now, since),
            ALIVE
        );
        // One from before: it says nothing of now (a data center that just went dark).
        assert_eq!(
            Passive::of(Some(&load(0.0, 0.0, Some(1500))), now, since),
            SILENT
        );
        // Nor does an old one, whenever the probes began to fail.
        let stale = ALIVE_REPORT_AGE.as_millis() as u64 + 1;
        assert_eq!(
            Passive::of(Some(&load(0.0, 0.0, Some(stale))), now, 0),
            SILENT
        );
        // Routers' successful calls are not taken as life (they may be seconds old).
        assert_eq!(
            Passive::of(Some(&load(10.0, 2.0, None)), now, since),
            SILENT
        );
        assert_eq!(
            Passive::of(Some(&load(4.0, 4.0, None)), now, since),
            Passive {
                alive: false,
                calls_failing: true,
            }
        );
        // Failing calls confirm even with a fresh report: the process lives, it does not serve.
        assert_eq!(
            Passive::of(Some(&load(4.0, 4.0, Some(100))), now, since),
            Passive {
                alive: true,
                calls_failing: true,
            }
        );
    }

    fn arb_node() -> impl Strategy<Value = (u8, Previous, Verdict, Passive, bool)> {
        (
            0u8..3,
            prop_oneof![
                Just(Previous::Routable),
                Just(Previous::RecentlyMoved),
                Just(Previous::Other)
            ],
            prop_oneof![
                Just(Verdict::Up),
                Just(Verdict::DownAnswered),
                Just(Verdict::DownUnanswered),
                Just(Verdict::Recovering)
            ],
            (any::<bool>(), any::<bool>()).prop_map(|(alive, calls_failing)| Passive {
                alive,
                calls_failing,
            }),
            any::<bool>(),
        )
    }

    proptest! {
        /// Whatever the fleet: only unconfirmed, unanswered failures of nodes at stake are
        /// ever held, and nodes held before that are unconfirmed and coming back (or, in the
        /// grace, still failing); new holds only past the threshold's share in their region;
        /// and with every region over it, every suspect is held.
        #[test]
        fn holds_only_suspects_and_only_past_the_threshold(
            nodes in proptest::collection::vec(arb_node(), 0..60),
            threshold in 0.05f64..0.95,
            grace in any::<bool>(),
        ) {
            const REGIONS: [&str; 3] = ["a", "b", "c"];
            let views: Vec<(String, NodeView<'static>)> = nodes
                .iter()
                .enumerate()
                .map(|(i, &(r, previous, verdict, passive, held))| {
                    (format!("n{i}"), NodeView { region: REGIONS[r as usize], previous, verdict, passive, held })
                })
                .collect();
            let d = decide(views.iter().map(|(id, n)| (id.as_str(), *n)), threshold, grace);
            let by_id: BTreeMap<&str, &NodeView<'_>> =
                views.iter().map(|(id, n)| (id.as_str(), n)).collect();
            for id in &d.hold {
                let n = by_id[id.as_str()];
                prop_assert!(
                    n.suspect() || n.stays_held(grace),
                    "{id} held but neither a suspect nor held before: {n:?}"
                );
                prop_assert!(!n.passive.calls_failing, "{id} held though confirmed");
            }
            let new_holds: Vec<&String> =
                d.hold.iter().filter(|id| !by_id[id.as_str()].held).collect();
            let share = |region: &str| {
                let at_stake = views.iter().filter(|(_, n)| n.region == region && n.at_stake()).count();
                let suspects = views.iter().filter(|(_, n)| n.region == region && n.suspect()).count();
                (suspects, at_stake)
            };
            let over = |region: &str| {
                let (s, a) = share(region);
                a > 0 && s as f64 > threshold * a as f64
            };
            for id in &new_holds {
                prop_assert!(over(by_id[id.as_str()].region), "{id} held in a region under the threshold");
            }
            prop_assert!(new_holds.is_empty() || d.suspects >= MIN_SUSPECTS);
            let voting: Vec<&str> = REGIONS.iter().copied().filter(|r| share(r).1 > 0).collect();
            if d.suspects >= MIN_SUSPECTS && !voting.is_empty() && voting.iter().all(|r| over(r)) {
                prop_assert_eq!(&d.trip, &Trip::Everywhere);
                let suspects = views.iter().filter(|(id, n)| n.suspect() && d.hold.contains(id)).count();
                prop_assert_eq!(suspects, d.suspects);
            }
            // Newly held in a partial event: only nodes that show life.
            if let Trip::Regions(_) = d.trip {
                for id in &new_holds {
                    prop_assert!(by_id[id.as_str()].passive.alive);
                }
            }
        }
    }
}
