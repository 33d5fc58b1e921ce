//! The router's Prometheus metrics, served on their own listener (`fulcrum router
//! --metrics-listen`) at `GET /metrics` in the text exposition format.
//!
//! Everything is read from the router's state at each scrape: the call path only bumps atomics
//! (per node: calls and errors; per model: answers by status code, retries, hedges, calls shed,
//! and a latency histogram), so scraping costs the calls nothing.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `fulcrum_router_requests_total` | model, code | calls answered, by gRPC status |
//! | `fulcrum_router_request_duration_seconds` | model | latency of answered calls (histogram) |
//! | `fulcrum_router_retries_total`, `fulcrum_router_hedges_total` | model | extra attempts |
//! | `fulcrum_router_shed_total` | model, priority | calls shed by the router (every node full) |
//! | `fulcrum_router_rate_limited_total` | model | calls refused by the model's rate limit |
//! | `fulcrum_router_cache_hits_total`, `fulcrum_router_cache_misses_total` | model | calls answered from the response cache, and looked up in vain |
//! | `fulcrum_router_cache_coalesced_total` | model | misses answered with an identical call's answer, waited for while it was in flight |
//! | `fulcrum_router_cache_entries`, `fulcrum_router_cache_bytes` | | what the response cache holds |
//! | `fulcrum_router_cache_in_flight` | | misses on their way to a node that identical calls can wait for |
//! | `fulcrum_router_batches_total`, `fulcrum_router_batched_calls_total` | model | node calls that carried a batch, and the calls in them (their ratio: the mean batch) |
//! | `fulcrum_router_cache_shared_hits_total` | model | misses answered from the cache's shared level (Redis) |
//! | `fulcrum_router_cache_shared_lookups_total`, `fulcrum_router_cache_shared_writes_total` | result | the shared level's lookups (`hit`, `miss`, `error`, `skipped`) and writes (`ok`, `error`, `dropped`) |
//! | `fulcrum_router_canary_total` | model, canary | calls of the model its canary took |
//! | `fulcrum_router_fallbacks_total` | model, fallback, reason, result | calls the model could not serve, sent to its fallback (`served` there or `failed`) |
//! | `fulcrum_router_auth_refused_total` | reason | calls refused by the token check (`missing`, `expired`, `bad_signature`, ...) |
//! | `fulcrum_router_auth_key_reloads_total` | result | key files read again: `ok` (keys changed), `failed` (kept the old ones) |
//! | `fulcrum_router_auth_keys` | | keys the token check verifies with |
//! | `fulcrum_router_local_share` | model | share of calls the local region takes now |
//! | `fulcrum_router_node_in_flight`, `fulcrum_router_node_limit` | node, region | calls in flight from this router, and its limit |
//! | `fulcrum_router_node_attempts_total`, `fulcrum_router_node_failures_total` | node, region | attempts sent, and failed (the node's fault) |
//! | `fulcrum_router_node_latency_seconds` | node, region | peak-EWMA latency estimate |
//! | `fulcrum_router_node_weight` | node, region | the control plane's weight |
//! | `fulcrum_router_node_ejected`, `fulcrum_router_node_ejections_total` | node, region | outlier ejection |
//! | `fulcrum_router_queue_waiting` | | calls waiting for a slot |
//! | `fulcrum_router_tasks` | state | background calls held: `running`, `ended` (kept for fetching) |
//! | `fulcrum_router_task_bytes` | | bytes they hold (requests running, answers kept) |
//! | `fulcrum_router_tasks_submitted_total`, `fulcrum_router_tasks_refused_total` | | background calls started, and refused (the router full) |
//! | `fulcrum_router_tasks_ended_total` | state | background calls ended: `succeeded`, `failed`, `cancelled` |
//! | `fulcrum_router_tasks_expired_total` | | ended ones forgotten unfetched (kept `--task-keep`) |
//! | `fulcrum_router_routing_version`, `fulcrum_router_routing_stale`, `fulcrum_router_routable_nodes` | | the table held |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fulcrum_telemetry::family;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::net::TcpListener;

use crate::endpoint::now_ns;
use crate::ingress::fallback::Reason;
use crate::priority::Priority;
use crate::router::RouterState;

/// Upper bounds of the latency histogram's buckets, in seconds: from a millisecond (a cached or
/// tiny model) to ten seconds (twice the default deadline), roughly ×2.5 apart — the spread of
/// inference latencies, with enough resolution around the usual tens to hundreds of ms.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// gRPC status codes 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;

/// A model's call counters. Why not prometheus-client's own `Family<Counter>`/`Histogram`: their
/// label lookups take a lock on every call; these are plain atomics, read at scrape time.
#[derive(Debug)]
pub struct ModelStats {
    by_code: [AtomicU64; CODES],
    retries: AtomicU64,
    hedges: AtomicU64,
    /// Calls shed, by priority ([`Priority::index`]).
    shed: [AtomicU64; 3],
    /// Calls refused by the model's rate limit.
    rate_limited: AtomicU64,
    /// Calls answered from the response cache, and calls looked up there and not found.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    /// Misses answered with the answer of an identical call they waited for.
    cache_coalesced: AtomicU64,
    /// Misses answered from the cache's shared level.
    cache_shared_hits: AtomicU64,
    /// Node calls made for batches of two calls or more, and the calls they carried.
    batches: AtomicU64,
    batched_calls: AtomicU64,
    /// Calls the model's canary took.
    canary: AtomicU64,
    /// Calls sent to the model's fallback, by [`Reason::index`], then served (0) or not (1).
    fallbacks: [[AtomicU64; 2]; 2],
    /// Answered calls per latency bucket (not cumulative; the last one is above every bound).
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
}

impl Default for ModelStats {
    fn default() -> Self {
        Self {
            by_code: std::array::from_fn(|_| AtomicU64::new(0)),
            retries: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            shed: std::array::from_fn(|_| AtomicU64::new(0)),
            rate_limited: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_coalesced: AtomicU64::new(0),
            cache_shared_hits: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            batched_calls: AtomicU64::new(0),
            canary: AtomicU64::new(0),
            fallbacks: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
        }
    }
}

impl ModelStats {
    /// A call ended with `code` after `elapsed`.
    pub fn answered(&self, code: tonic::Code, elapsed: Duration) {
        let i = (code as usize).min(CODES - 1);
        self.by_code[i].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS.partition_point(|&b| b < secs);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// An attempt was retried on another node.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A hedged attempt was started.
    pub fn hedged(&self) {
        self.hedges.fetch_add(1, Ordering::Relaxed);
    }

    /// A call was refused by the model's rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// A call was answered from the response cache (`hit`), or looked up there in vain.
    pub fn cache_lookup(&self, hit: bool) {
        let counter = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A miss was answered with the answer of an identical call it waited for.
    pub fn cache_coalesced(&self) {
        self.cache_coalesced.fetch_add(1, Ordering::Relaxed);
    }

    /// A miss was answered from the cache's shared level.
    pub fn cache_shared_hit(&self) {
        self.cache_shared_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch of `calls` calls went to a node as one call.
    pub fn batched(&self, calls: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batched_calls
            .fetch_add(calls as u64, Ordering::Relaxed);
    }

    /// The model's canary took a call.
    pub fn canary(&self) {
        self.canary.fetch_add(1, Ordering::Relaxed);
    }

    /// A call went to the model's fallback for `reason`, and was `served` there or not.
    pub fn fell_back(&self, reason: Reason, served: bool) {
        self.fallbacks[reason.index()][usize::from(!served)].fetch_add(1, Ordering::Relaxed);
    }

    /// A call of `priority` was shed because every node was full.
    pub fn shed(&self, priority: Priority) {
        self.shed[priority.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// The name Prometheus uses for a gRPC status code.
fn code_name(i: usize) -> &'static str {
    const NAMES: [&str; CODES] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(i).copied().unwrap_or("UNKNOWN")
}

/// Reads a router's state at each scrape.
#[derive(Debug, Clone)]
struct RouterCollector(Arc<RouterState>);

impl Collector for RouterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        let table = state.table.load();
        let now = now_ns();
        let now_ms = now / 1_000_000;
        let e = &mut encoder;
        let gauge = |v: f64| ConstGauge::new(v);
        let counter = |v: u64| ConstCounter::new(v);
        family(
            e,
            "fulcrum_router_routing_version",
            "Version of the routing table the router holds (0: none yet)",
            MetricType::Gauge,
            [(vec![], gauge(table.version as f64))],
        )?;
        family(
            e,
            "fulcrum_router_routing_stale",
            "1 when the control plane said the table may be out of date",
            MetricType::Gauge,
            [(vec![], gauge(f64::from(u8::from(table.stale))))],
        )?;
        family(
            e,
            "fulcrum_router_routable_nodes",
            "Nodes the control plane routes to",
            MetricType::Gauge,
            [(vec![], gauge(table.routable_nodes as f64))],
        )?;
        let (entries, bytes) = state.cache.size();
        family(
            e,
            "fulcrum_router_cache_entries",
            "Answers held in the response cache",
            MetricType::Gauge,
            [(vec![], gauge(entries as f64))],
        )?;
        family(
            e,
            "fulcrum_router_cache_bytes",
            "Bytes of answers held in the response cache",
            MetricType::Gauge,
            [(vec![], gauge(bytes as f64))],
        )?;
        family(
            e,
            "fulcrum_router_cache_in_flight",
            "Misses on their way to a node that identical calls can wait for",
            MetricType::Gauge,
            [(vec![], gauge(state.cache.in_flight() as f64))],
        )?;
        if let Some(shared) = &state.shared_cache {
            let s = shared.stats();
            let n = |c: &AtomicU64| counter(c.load(Ordering::Relaxed));
            family(
                e,
                "fulcrum_router_cache_shared_lookups",
                "Lookups in the cache's shared level (Redis): hit, miss, error (or timeout), skipped (paused after an error)",
                MetricType::Counter,
                [
                    ("hit", &s.hits),
                    ("miss", &s.misses),
                    ("error", &s.lookup_errors),
                    ("skipped", &s.skipped),
                ]
                .map(|(result, c)| (vec![("result", result.to_owned())], n(c))),
            )?;
            family(
                e,
                "fulcrum_router_cache_shared_writes",
                "Answers written to the cache's shared level: ok, error (or timeout), dropped (too many in flight, or paused)",
                MetricType::Counter,
                [
                    ("ok", &s.writes),
                    ("error", &s.write_errors),
                    ("dropped", &s.writes_dropped),
                ]
                .map(|(result, c)| (vec![("result", result.to_owned())], n(c))),
            )?;
        }
        if let Some(auth) = &state.auth {
            family(
                e,
                "fulcrum_router_auth_refused",
                "Calls refused by the token check, by reason",
                MetricType::Counter,
                auth.stats
                    .refused()
                    .map(|(reason, n)| (vec![("reason", reason.to_owned())], counter(n))),
            )?;
            let (changed, failed) = auth.stats.reloads();
            family(
                e,
                "fulcrum_router_auth_key_reloads",
                "Reads of the key files that changed the keys (ok) or could not be used (failed)",
                MetricType::Counter,
                [
                    (vec![("result", "ok".to_owned())], counter(changed)),
                    (vec![("result", "failed".to_owned())], counter(failed)),
                ],
            )?;
            family(
                e,
                "fulcrum_router_auth_keys",
                "Keys the token check verifies with",
                MetricType::Gauge,
                [(vec![], gauge(auth.key_count() as f64))],
            )?;
        }
        family(
            e,
            "fulcrum_router_queue_waiting",
            "Calls waiting for a free slot",
            MetricType::Gauge,
            [(vec![], gauge(state.queue.len() as f64))],
        )?;
        let tasks = &state.tasks;
        let held = tasks.held();
        family(
            e,
            "fulcrum_router_tasks",
            "Background calls held, running or ended (kept for fetching)",
            MetricType::Gauge,
            [
                (
                    vec![("state", "running".to_owned())],
                    gauge(held.running as f64),
                ),
                (
                    vec![("state", "ended".to_owned())],
                    gauge(held.ended as f64),
                ),
            ],
        )?;
        family(
            e,
            "fulcrum_router_task_bytes",
            "Bytes the background calls hold (requests running, answers kept)",
            MetricType::Gauge,
            [(vec![], gauge(held.bytes as f64))],
        )?;
        family(
            e,
            "fulcrum_router_tasks_submitted",
            "Background calls started",
            MetricType::Counter,
            [(vec![], counter(tasks.stats.submitted()))],
        )?;
        family(
            e,
            "fulcrum_router_tasks_refused",
            "Background calls refused because the router held as many as it may",
            MetricType::Counter,
            [(vec![], counter(tasks.stats.refused()))],
        )?;
        family(
            e,
            "fulcrum_router_tasks_ended",
            "Background calls ended, by how (succeeded, failed, cancelled)",
            MetricType::Counter,
            tasks
                .stats
                .ended()
                .map(|(how, n)| (vec![("state", how.to_owned())], counter(n))),
        )?;
        family(
            e,
            "fulcrum_router_tasks_expired",
            "Ended background calls forgotten before anyone deleted them",
            MetricType::Counter,
            [(vec![], counter(tasks.stats.expired()))],
        )?;

        let mut models: Vec<_> = table.models.iter().collect();
        models.sort_by(|a, b| a.0.cmp(b.0));
        let model = |m: &str| vec![("model", m.to_owned())];
        family(
            e,
            "fulcrum_router_requests",
            "Calls answered, by gRPC status code",
            MetricType::Counter,
            models.iter().flat_map(|(m, r)| {
                let stats = &r.state.stats;
                (0..CODES).filter_map(move |i| {
                    let n = stats.by_code[i].load(Ordering::Relaxed);
                    (n > 0).then(|| {
                        let labels = vec![("model", (*m).clone()), ("code", code_name(i).into())];
                        (labels, counter(n))
                    })
                })
            }),
        )?;
        for (name, help, read) in [
            (
                "fulcrum_router_retries",
                "Attempts retried on another node",
                (|s: &ModelStats| s.retries.load(Ordering::Relaxed)) as fn(&ModelStats) -> u64,
            ),
            (
                "fulcrum_router_hedges",
                "Hedged attempts started",
                |s: &ModelStats| s.hedges.load(Ordering::Relaxed),
            ),
            (
                "fulcrum_router_rate_limited",
                "Calls refused by the model's rate limit on this router",
                |s: &ModelStats| s.rate_limited.load(Ordering::Relaxed),
            ),
            (
                "fulcrum_router_cache_hits",
                "Calls answered from the router's response cache",
                |s: &ModelStats| s.cache_hits.load(Ordering::Relaxed),
            ),
            (
                "fulcrum_router_cache_misses",
                "Calls of a cached model whose answer the router did not hold",
                |s: &ModelStats| s.cache_misses.load(Ordering::Relaxed),
            ),
            (
                "fulcrum_router_cache_coalesced",
                "Misses answered with the answer of an identical call in flight, waited for",
                |s: &ModelStats| s.cache_coalesced.load(Ordering::Relaxed),
            ),
            (
                "fulcrum_router_cache_shared_hits",
                "Misses of the router's cache answered from its shared level (Redis)",
                |s: &ModelStats| s.cache_shared_hits.load(Ordering::Relaxed),
            ),
            (
                "fulcrum_router_batches",
                "Node calls that carried a batch of two calls or more",
                |s: &ModelStats| s.batches.load(Ordering::Relaxed),
            ),
            (
                "fulcrum_router_batched_calls",
                "Calls sent to a node in a batch with others",
                |s: &ModelStats| s.batched_calls.load(Ordering::Relaxed),
            ),
        ] {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                models
                    .iter()
                    .map(|(m, r)| (model(m), counter(read(&r.state.stats)))),
            )?;
        }
        family(
            e,
            "fulcrum_router_shed",
            "Calls shed by the router because every node was at its limit, by call priority",
            MetricType::Counter,
            models.iter().flat_map(|(m, r)| {
                let stats = &r.state.stats;
                Priority::ALL.into_iter().map(move |p| {
                    let labels = vec![("model", (*m).clone()), ("priority", p.name().into())];
                    (
                        labels,
                        counter(stats.shed[p.index()].load(Ordering::Relaxed)),
                    )
                })
            }),
        )?;
        family(
            e,
            "fulcrum_router_canary",
            "Calls of the model its canary model took",
            MetricType::Counter,
            models.iter().filter_map(|(m, r)| {
                let canary = r.settings.canary.as_ref()?;
                let labels = vec![("model", (*m).clone()), ("canary", canary.model.clone())];
                Some((
                    labels,
                    counter(r.state.stats.canary.load(Ordering::Relaxed)),
                ))
            }),
        )?;
        family(
            e,
            "fulcrum_router_fallbacks",
            "Calls the model could not serve, sent to its fallback model: why, and whether the fallback served them",
            MetricType::Counter,
            models.iter().flat_map(|(m, r)| {
                let stats = &r.state.stats;
                let fallback = r.settings.fallback.clone();
                Reason::ALL.into_iter().flat_map(move |reason| {
                    let fallback = fallback.clone();
                    [(0, "served"), (1, "failed")]
                        .into_iter()
                        .filter_map(move |(i, result)| {
                            let labels = vec![
                                ("model", (*m).clone()),
                                ("fallback", fallback.clone()?),
                                ("reason", reason.name().into()),
                                ("result", result.into()),
                            ];
                            let n = stats.fallbacks[reason.index()][i].load(Ordering::Relaxed);
                            Some((labels, counter(n)))
                        })
                })
            }),
        )?;
        family(
            e,
            "fulcrum_router_local_share",
            "Share of the model's calls its local region takes now",
            MetricType::Gauge,
            models
                .iter()
                .map(|(m, r)| (model(m), gauge(r.state.share.get().0))),
        )?;
        let mut histogram = e.encode_descriptor(
            "fulcrum_router_request_duration_seconds",
            "Latency of answered calls, from arrival to answer",
            None,
            MetricType::Histogram,
        )?;
        for (m, r) in &models {
            let stats = &r.state.stats;
            let counts: Vec<u64> = stats
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            // Per-bucket counts: the encoder makes them cumulative, and writes f64::MAX as +Inf.
            let buckets: Vec<(f64, u64)> = counts
                .iter()
                .enumerate()
                .map(|(i, &c)| (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX), c))
                .collect();
            let count = counts.iter().sum();
            let sum = stats.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let labels = model(m);
            histogram
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }

        let mut nodes: Vec<_> = table.nodes.values().collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let weights: std::collections::HashMap<&str, f64> = table
            .source
            .endpoints
            .iter()
            .filter_map(|e| Some((e.spec.as_ref()?.id.as_str(), e.weight)))
            .collect();
        let node = |n: &crate::endpoint::NodeConn| {
            vec![("node", n.id.clone()), ("region", n.region.clone())]
        };
        family(
            e,
            "fulcrum_router_node_in_flight",
            "Calls in flight from this router to the node",
            MetricType::Gauge,
            nodes
                .iter()
                .map(|n| (node(n), gauge(f64::from(n.in_flight())))),
        )?;
        family(
            e,
            "fulcrum_router_node_limit",
            "The router's concurrency limit for the node (0: none)",
            MetricType::Gauge,
            nodes.iter().map(|n| (node(n), gauge(f64::from(n.limit())))),
        )?;
        family(
            e,
            "fulcrum_router_node_attempts",
            "Attempts sent to the node",
            MetricType::Counter,
            nodes.iter().map(|n| (node(n), counter(n.totals().0))),
        )?;
        family(
            e,
            "fulcrum_router_node_failures",
            "Attempts that failed through the node's fault (unavailable, overloaded, timed out)",
            MetricType::Counter,
            nodes.iter().map(|n| (node(n), counter(n.totals().1))),
        )?;
        family(
            e,
            "fulcrum_router_node_latency_seconds",
            "The node's peak-EWMA latency estimate",
            MetricType::Gauge,
            nodes
                .iter()
                .map(|n| (node(n), gauge(n.latency.estimate_ms(now) / 1e3))),
        )?;
        family(
            e,
            "fulcrum_router_node_weight",
            "The control plane's weight for the node",
            MetricType::Gauge,
            nodes.iter().map(|n| {
                let w = weights.get(n.id.as_str()).copied().unwrap_or(0.0);
                (node(n), gauge(w))
            }),
        )?;
        family(
            e,
            "fulcrum_router_node_ejected",
            "1 while the node is ejected as an outlier or paused after a refused connection",
            MetricType::Gauge,
            nodes
                .iter()
                .map(|n| (node(n), gauge(f64::from(u8::from(n.is_out(now_ms)))))),
        )?;
        family(
            e,
            "fulcrum_router_node_ejections",
            "Times the node was ejected as an outlier",
            MetricType::Counter,
            nodes
                .iter()
                .map(|n| (node(n), counter(n.outlier.ejections()))),
        )?;
        Ok(())
    }
}

/// The router's metrics in Prometheus' text format.
pub fn render(state: &Arc<RouterState>) -> String {
    fulcrum_telemetry::render(&RouterCollector(state.clone()))
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(state: Arc<RouterState>, listener: TcpListener) -> std::io::Result<()> {
    fulcrum_telemetry::serve(RouterCollector(state), listener).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_their_buckets_and_codes_are_counted() {
        let s = ModelStats::default();
        s.answered(tonic::Code::Ok, Duration::from_micros(800));
        s.answered(tonic::Code::Ok, Duration::from_millis(30));
        s.answered(tonic::Code::Unavailable, Duration::from_secs(20));
        let count = |i: usize| s.buckets[i].load(Ordering::Relaxed);
        assert_eq!(count(0), 1, "0.8 ms is under the 1 ms bound");
        assert_eq!(count(5), 1, "30 ms is under the 50 ms bound");
        assert_eq!(count(LATENCY_BUCKETS.len()), 1, "20 s is above every bound");
        assert_eq!(s.by_code[0].load(Ordering::Relaxed), 2);
        assert_eq!(s.by_code[14].load(Ordering::Relaxed), 1);
        assert_eq!(code_name(14), "UNAVAILABLE");
        assert_eq!(code_name(99), "UNKNOWN");
    }

    #[test]
    fn token_refusals_are_rendered_by_reason() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::write(&secrets, "a secret\n").unwrap();
        let auth = crate::auth::CallerAuth::load(crate::auth::AuthConfig {
            secret_files: vec![secrets],
            ..Default::default()
        })
        .unwrap();
        assert!(auth.authenticate(&mut http::HeaderMap::new()).is_err());
        let mut state = RouterState::new("a".into(), 1 << 20);
        assert!(!render(&Arc::new(RouterState::new("a".into(), 1 << 20))).contains("auth"));
        state.auth = Some(Arc::new(auth));
        let text = render(&Arc::new(state));
        assert!(
            text.contains("fulcrum_router_auth_refused_total{reason=\"missing\"} 1"),
            "{text}"
        );
        assert!(text.contains("fulcrum_router_auth_refused_total{reason=\"expired\"} 0"));
        assert!(text.contains("fulcrum_router_auth_keys 1"), "{text}");
        assert!(text.contains("fulcrum_router_auth_key_reloads_total{result=\"failed\"} 0"));
    }
}
