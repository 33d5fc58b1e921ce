//! Response caching: a router answers a `ModelInfer` call it has answered before from memory,
//! for the models whose policy asks for it (`ModelPolicy.cache_ttl_ms`).
//!
//! The seed article's local cache layer (Caffeine with a TTL; moka is its Rust counterpart),
//! keyed as it advises on the model, its version and the sorted parameters — here the whole
//! request but its `id`: the model name and version, the parameters sorted by name, the input
//! and output tensors, and the raw input contents. So two callers sending the same tensors get
//! the same answer, whatever ids they give their calls; the answer they get carries their own
//! `id` (appended to the cached bytes: protobuf's last value of a field wins).
//!
//! - **Keys** are 128-bit SipHash-1-3 digests with a key drawn at random when the router
//!   starts: collisions are out of reach by chance (2⁻⁶⁴ at billions of entries), and a caller
//!   cannot craft a request whose digest matches another's to plant an answer for it, not
//!   knowing the key. `cache_key_header` adds a request header's value (a tenant, an API key)
//!   to the key, so callers do not share answers — nor learn from a hit's speed what another
//!   asked.
//! - **Entries** live for the model's TTL (at most an hour: the control plane refuses more),
//!   within one size bound per router ([`DEFAULT_CACHE_BYTES`], `fulcrum router --cache-mib`),
//!   least recently and frequently used first out (moka's TinyLFU). An answer larger than
//!   [`MAX_ENTRY_SHARE`] of the bound is not kept.
//! - **What is cached**: successful answers of the model itself — never errors, never an answer
//!   from its fallback model ([`crate::ingress::fallback`]), never a request of a Triton
//!   sequence (its answer depends on the sequence's state). A model with side effects
//!   (`not_idempotent`) cannot be cached (the control plane refuses the policy).
//! - **Hits** answer with `x-fulcrum-cache: hit` and no node; misses that were stored with
//!   `x-fulcrum-cache: miss`. Hits are not counted against the model's rate limit (they cost
//!   the nodes nothing).
//! - **Identical calls in flight are merged** ("request collapsing", as nginx's
//!   `proxy_cache_lock` and Varnish's waiting list do): while one call of a request is on its
//!   way to a node, identical calls wait for its answer instead of each calling a node — the
//!   stampede a busy model sees when many callers ask the same thing at once, or when callers
//!   retry a slow call before its first attempt is answered. They answer with
//!   `x-fulcrum-cache: coalesced` and, like hits, cost no node and no rate limit. A waiting call
//!   waits at most its own deadline. When the first call's outcome is not one to share (an
//!   error, a fallback's answer), each waiting call goes to a node itself, as it would have; when
//!   the first call gave up for reasons of its own (its caller left, its deadline ran out), one
//!   of the waiting calls goes to a node for the others. A call never waits for one of lower
//!   priority (it would wait behind it in the router's queue, and be shed with it): it goes to
//!   a node itself.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use fulcrum_proto::inference::{InferParameter, ModelInferRequest};
use http::HeaderMap;
use prost::Message;
use siphasher::sip128::{Hasher128, SipHasher13};
use tokio::sync::watch;

use crate::priority::Priority;

/// Default size of a router's response cache, in bytes: 256 MiB, a small share of an inference
/// host's memory that still holds tens of thousands of typical answers (kilobytes each).
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// Largest share of the cache one answer may take: a 1/64th, so a few huge answers (images,
/// long generations) cannot push out everything else.
pub const MAX_ENTRY_SHARE: u64 = 64;

/// Response header saying whether the answer came from the cache (`hit`), from an identical
/// call in flight (`coalesced`), or was stored in it (`miss`).
pub const CACHE_HEADER: &str = "x-fulcrum-cache";

/// A model's caching, from its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpec {
    /// How long an answer is kept.
    pub ttl: Duration,
    /// The request header whose value is part of the key (lowercase), if any.
    pub key_header: Option<String>,
    /// The policy's cache epoch, part of the key: a flush ([`ModelPolicy`]'s `cache_epoch`,
    /// changed by the control plane) makes every answer kept under the old one unreachable at
    /// once; moka lets them age out.
    ///
    /// [`ModelPolicy`]: fulcrum_proto::fulcrum::v1::ModelPolicy
    pub epoch: u64,
}

impl CacheSpec {
    /// The caching a policy sets, if any: `None` for a TTL of 0, or for a model with side
    /// effects (the control plane refuses that policy; a router does not trust it).
    pub fn from_policy(
        ttl_ms: u32,
        key_header: &str,
        idempotent: bool,
        epoch: u64,
    ) -> Option<Self> {
        (ttl_ms > 0 && idempotent).then(|| Self {
            ttl: Duration::from_millis(u64::from(ttl_ms)),
            key_header: (!key_header.is_empty()).then(|| key_header.to_ascii_lowercase()),
            epoch,
        })
    }
}

/// A cached answer and how long it lives.
#[derive(Debug, Clone)]
struct Entry {
    answer: Bytes,
    ttl: Duration,
}

/// Each entry expires after its own model's TTL.
struct PerModelTtl;

impl moka::Expiry<u128, Entry> for PerModelTtl {
    fn expire_after_create(&self, _: &u128, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// A router's response cache, shared by all its models.
pub struct ResponseCache {
    keys: (u64, u64),
    entries: moka::sync::Cache<u128, Entry>,
    max_entry: usize,
    /// The misses on their way to a node, by key: what identical calls wait on. An entry lives
    /// only while its call is in flight, so the map is bounded by the router's calls in flight.
    /// Why not moka's `get_with` (which also merges concurrent loads): its loader's outcome is
    /// the entry, while here the waiting calls must also learn of outcomes that are not kept
    /// (errors, fallback answers, answers too large) and of a first call that gave up.
    flights: Mutex<HashMap<u128, (watch::Receiver<Flight>, Priority)>>,
}

/// Where a miss that identical calls wait on stands.
#[derive(Debug, Clone)]
enum Flight {
    /// Its call is on its way to a node.
    Pending,
    /// Answered: the answer, as its own caller got it.
    Answered(Bytes),
    /// Its outcome is not one to share (an error, a fallback's answer): each waiting call goes
    /// to a node itself.
    NotShared,
    /// It gave up for reasons of its own (its caller left, its deadline ran out): the waiting
    /// calls look the request up again, and one of them goes to a node for the others.
    Abandoned,
}

/// What a look-up in the cache found.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The answer kept, as this call gets it.
    Hit(Bytes),
    /// Neither kept nor in flight: this call goes to a node, and identical calls that come
    /// meanwhile wait for its outcome, which it must report ([`Leader`]).
    Lead(Leader<'a>),
    /// An identical call is on its way to a node: wait for its outcome ([`Follower::wait`]).
    Follow(Follower),
    /// An identical call is on its way to a node, but of a lower priority than this call,
    /// which would wait behind it in the router's queue (and be shed with it): go to a node
    /// alone.
    Overtake,
}

/// The call that goes to a node for identical calls too. Dropped without an outcome (its
/// caller left), it counts as abandoned: a waiting call takes over.
#[derive(Debug)]
pub struct Leader<'a> {
    cache: &'a ResponseCache,
    key: u128,
    tx: Option<watch::Sender<Flight>>,
}

impl Leader<'_> {
    /// The key of the request this call fetches.
    pub fn key(&self) -> u128 {
        self.key
    }

    /// The answer was found in the shared level ([`crate::shared_cache`]), to live `ttl` more:
    /// kept here that long (if it fits) and handed to the waiting calls; returns it as this
    /// call (whose request has `id`) gets it.
    pub fn found_shared(self, answer: Bytes, ttl: Duration, id: &str) -> Bytes {
        let mine = with_id(&answer, id);
        self.answered(answer, ttl);
        mine
    }

    /// The call was answered: keeps `answer` for `ttl` (if it fits) and hands it to the waiting
    /// calls; says whether it was kept.
    pub fn answered(mut self, answer: Bytes, ttl: Duration) -> bool {
        let kept = self.cache.insert(self.key, answer.clone(), ttl);
        self.end(Flight::Answered(answer));
        kept
    }

    /// The call's outcome is not one to share: each waiting call goes to a node itself.
    pub fn not_shared(mut self) {
        self.end(Flight::NotShared);
    }

    /// The call gave up for reasons of its own: a waiting call goes to a node for the others.
    pub fn abandoned(mut self) {
        self.end(Flight::Abandoned);
    }

    /// Ends the flight: later calls no longer find it (an answer kept is in the cache first),
    /// and the waiting ones learn `how`.
    fn end(&mut self, how: Flight) {
        if let Some(tx) = self.tx.take() {
            self.cache.flights().remove(&self.key);
            tx.send_replace(how);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.end(Flight::Abandoned);
    }
}

/// A call waiting for an identical call's outcome.
#[derive(Debug)]
pub struct Follower {
    rx: watch::Receiver<Flight>,
}

/// What a waiting call learnt.
#[derive(Debug, PartialEq)]
pub enum Followed {
    /// The identical call's answer, as this call (whose request has its own id) gets it.
    Answer(Bytes),
    /// Go to a node alone: the identical call's outcome was not one to share.
    CallAlone,
    /// Look the request up again: the identical call gave up.
    LookAgain,
}

impl Follower {
    /// Waits for the identical call's outcome; the answer carries `id`.
    pub async fn wait(mut self, id: &str) -> Followed {
        match self.rx.wait_for(|f| !matches!(f, Flight::Pending)).await {
            Ok(flight) => match &*flight {
                Flight::Answered(answer) => Followed::Answer(with_id(answer, id)),
                Flight::NotShared => Followed::CallAlone,
                Flight::Pending | Flight::Abandoned => Followed::LookAgain,
            },
            // The leader always reports before it goes (its `Drop`); should it not, look again.
            Err(_) => Followed::LookAgain,
        }
    }
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.entries.entry_count())
            .field("bytes", &self.entries.weighted_size())
            .finish_non_exhaustive()
    }
}

impl Default for ResponseCache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_BYTES)
    }
}

impl ResponseCache {
    /// A cache of at most `bytes` of answers (0: nothing is ever kept), hashing requests with
    /// keys of its own, drawn at random.
    pub fn new(bytes: u64) -> Self {
        Self::with_keys(bytes, (rand::random(), rand::random()))
    }

    /// A cache of at most `bytes` of answers hashing requests with `keys`: those of the shared
    /// level ([`crate::shared_cache::keys_from_secret`]), so that routers sharing it agree on
    /// every key.
    pub fn with_keys(bytes: u64, keys: (u64, u64)) -> Self {
        Self {
            keys,
            entries: moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, e: &Entry| u32::try_from(e.answer.len()).unwrap_or(u32::MAX))
                .expire_after(PerModelTtl)
                .build(),
            max_entry: usize::try_from(bytes / MAX_ENTRY_SHARE).unwrap_or(usize::MAX),
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// The key of `request` under `spec`, with the caller's `headers`.
    pub fn key(&self, spec: &CacheSpec, request: &ModelInferRequest, headers: &HeaderMap) -> u128 {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        // Every piece is written with its length first, so no two requests run together into
        // the same stream of bytes.
        let mut piece = |bytes: &[u8]| {
            h.write_u64(bytes.len() as u64);
            h.write(bytes);
        };
        piece(request.model_name.as_bytes());
        piece(request.model_version.as_bytes());
        piece(&spec.epoch.to_le_bytes());
        match spec.key_header.as_deref().map(|name| headers.get_all(name)) {
            Some(values) => {
                for v in values {
                    piece(b"k");
                    piece(v.as_bytes());
                }
            }
            None => piece(b"-"),
        }
        hash_parameters(&mut piece, &request.parameters);
        piece(&(request.inputs.len() as u64).to_le_bytes());
        for t in &request.inputs {
            piece(&t.encode_to_vec());
        }
        piece(&(request.outputs.len() as u64).to_le_bytes());
        for t in &request.outputs {
            piece(&t.encode_to_vec());
        }
        piece(&(request.raw_input_contents.len() as u64).to_le_bytes());
        for raw in &request.raw_input_contents {
            piece(raw);
        }
        h.finish128().as_u128()
    }

    /// The answer kept for `key`, as the caller whose request has `id` gets it.
    pub fn get(&self, key: u128, id: &str) -> Option<Bytes> {
        let entry = self.entries.get(&key)?;
        Some(with_id(&entry.answer, id))
    }

    /// The answer kept for `key` (as the caller whose request has `id` gets it), else the
    /// identical call on its way to a node to wait for (unless it is of a lower priority than
    /// this call's), else the lead: this call goes to a node for identical calls too.
    pub fn lookup(&self, key: u128, id: &str, priority: Priority) -> Lookup<'_> {
        if let Some(hit) = self.get(key, id) {
            return Lookup::Hit(hit);
        }
        let mut flights = self.flights();
        if let Some((rx, leader)) = flights.get(&key) {
            if *leader < priority {
                return Lookup::Overtake;
            }
            return Lookup::Follow(Follower { rx: rx.clone() });
        }
        // A leader keeps its answer before it ends its flight: one that ended since the look-up
        // above left its answer here.
        if let Some(hit) = self.get(key, id) {
            return Lookup::Hit(hit);
        }
        let (tx, rx) = watch::channel(Flight::Pending);
        flights.insert(key, (rx, priority));
        Lookup::Lead(Leader {
            cache: self,
            key,
            tx: Some(tx),
        })
    }

    /// Misses on their way to a node now.
    pub fn in_flight(&self) -> usize {
        self.flights().len()
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<u128, (watch::Receiver<Flight>, Priority)>> {
        // The map is consistent whenever a holder panics: each change is one insert or remove.
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `answer` for `key` for `ttl`; says whether it was kept (not too large).
    pub fn insert(&self, key: u128, answer: Bytes, ttl: Duration) -> bool {
        if answer.len() > self.max_entry {
            return false;
        }
        self.entries.insert(key, Entry { answer, ttl });
        true
    }

    /// Answers kept now, and their bytes (moka's estimates, brought up to date).
    pub fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}

/// Feeds `parameters` to `piece` in an order that does not depend on the map's: their count,
/// then each name and encoded value, sorted by name (what the cache key and a batch's group
/// take of a request's parameters).
pub(crate) fn hash_parameters(
    piece: &mut impl FnMut(&[u8]),
    parameters: &std::collections::HashMap<String, InferParameter>,
) {
    let mut sorted: Vec<_> = parameters.iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    piece(&(sorted.len() as u64).to_le_bytes());
    for (name, value) in sorted {
        piece(name.as_bytes());
        piece(&value.encode_to_vec());
    }
}

/// An encoded `ModelInferResponse` carrying `id` instead of its own: field 3 appended (the last
/// value of a field wins), so the rest goes out byte for byte.
fn with_id(answer: &Bytes, id: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(answer.len() + id.len() + 6);
    out.put_slice(answer);
    // Field 3, wire type 2 (length-delimited): tag (3 << 3) | 2.
    out.put_u8(0x1a);
    crate::ingress::infer::put_varint(&mut out, id.len() as u64);
    out.put_slice(id.as_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::inference::infer_parameter::ParameterChoice;
    use fulcrum_proto::inference::model_infer_request::InferInputTensor;
    use fulcrum_proto::inference::{InferParameter, ModelInferResponse};
    use http::HeaderValue;

    fn request(id: &str, values: &[u8]) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            id: id.into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "UINT8".into(),
                shape: vec![values.len() as i64],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::copy_from_slice(values)],
            ..Default::default()
        }
    }

    fn param(v: i64) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(v)),
        }
    }

    fn spec(key_header: Option<&str>) -> CacheSpec {
        CacheSpec {
            ttl: Duration::from_secs(60),
            key_header: key_header.map(str::to_owned),
            epoch: 1,
        }
    }

    #[test]
    fn the_key_is_the_request_but_its_id() {
        let cache = ResponseCache::default();
        let none = HeaderMap::new();
        let key = |r: &ModelInferRequest| cache.key(&spec(None), r, &none);
        let a = request("call-1", &[1, 2, 3]);
        assert_eq!(key(&a), key(&request("call-2", &[1, 2, 3])));
        assert_ne!(key(&a), key(&request("call-1", &[1, 2, 4])));
        let mut other_model = a.clone();
        other_model.model_name = "n".into();
        assert_ne!(key(&a), key(&other_model));
        let mut versioned = a.clone();
        versioned.model_version = "2".into();
        assert_ne!(key(&a), key(&versioned));
        // Parameters count, in whatever order they came.
        let mut p1 = a.clone();
        p1.parameters.insert("temperature".into(), param(1));
        p1.parameters.insert("top_k".into(), param(5));
        let mut p2 = a.clone();
        p2.parameters.insert("top_k".into(), param(5));
        p2.parameters.insert("temperature".into(), param(1));
        assert_eq!(key(&p1), key(&p2));
        assert_ne!(key(&a), key(&p1));
        let mut p3 = p1.clone();
        p3.parameters.insert("top_k".into(), param(6));
        assert_ne!(key(&p1), key(&p3));
        // The same bytes split otherwise between inputs are another request.
        let mut split = a.clone();
        split.raw_input_contents = vec![Bytes::from_static(&[1]), Bytes::from_static(&[2, 3])];
        assert_ne!(key(&a), key(&split));
        // A flushed policy (a new epoch): other digests.
        let flushed = CacheSpec {
            epoch: 2,
            ..spec(None)
        };
        assert_ne!(key(&a), cache.key(&flushed, &a, &none));
        // Another router (another random key): other digests.
        assert_ne!(
            key(&a),
            ResponseCache::default().key(&spec(None), &a, &none)
        );
    }

    #[test]
    fn a_key_header_keeps_callers_apart() {
        let cache = ResponseCache::default();
        let r = request("", &[7]);
        let with = |tenant: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(t) = tenant {
                h.insert("x-tenant", HeaderValue::from_str(t).unwrap());
            }
            cache.key(&spec(Some("x-tenant")), &r, &h)
        };
        assert_eq!(with(Some("a")), with(Some("a")));
        assert_ne!(with(Some("a")), with(Some("b")));
        assert_ne!(with(Some("a")), with(None));
        // Without a key header, the header changes nothing.
        let mut h = HeaderMap::new();
        h.insert("x-tenant", HeaderValue::from_static("a"));
        assert_eq!(
            cache.key(&spec(None), &r, &h),
            cache.key(&spec(None), &r, &HeaderMap::new())
        );
    }

    #[test]
    fn a_hit_carries_the_callers_id_and_the_rest_unchanged() {
        let cache = ResponseCache::default();
        let answer = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: "first-caller".into(),
            raw_output_contents: vec![Bytes::from_static(&[9, 9])],
            ..Default::default()
        };
        assert!(cache.insert(7, answer.encode_to_vec().into(), Duration::from_secs(60)));
        assert!(cache.get(8, "x").is_none());
        let long = "i".repeat(200);
        for id in ["second-caller", "", long.as_str()] {
            let hit = ModelInferResponse::decode(cache.get(7, id).unwrap()).unwrap();
            assert_eq!(hit.id, id);
            assert_eq!(
                ModelInferResponse {
                    id: "first-caller".into(),
                    ..hit
                },
                answer
            );
        }
    }

    #[test]
    fn large_answers_are_not_kept_and_entries_expire() {
        let cache = ResponseCache::new(64 * 1024);
        assert!(!cache.insert(1, Bytes::from(vec![0; 1025]), Duration::from_secs(60)));
        assert!(cache.get(1, "").is_none());
        assert!(cache.insert(2, Bytes::from(vec![0; 1024]), Duration::from_millis(1)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while cache.get(2, "").is_some() {
            assert!(Instant::now() < deadline, "the entry never expired");
            std::thread::sleep(Duration::from_millis(5));
        }
        // What the cache holds is counted in bytes.
        assert!(cache.insert(3, Bytes::from(vec![0; 1000]), Duration::from_secs(60)));
        let (_, bytes) = cache.size();
        assert!((1000..=2024).contains(&bytes), "{bytes}");
    }

    fn encoded(id: &str, value: u8) -> Bytes {
        ModelInferResponse {
            model_name: "m".into(),
            id: id.into(),
            raw_output_contents: vec![Bytes::from(vec![value])],
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    fn lead<'a>(cache: &'a ResponseCache, key: u128, id: &str) -> Leader<'a> {
        match cache.lookup(key, id, Priority::Normal) {
            Lookup::Lead(l) => l,
            other => panic!("expected the lead, got {other:?}"),
        }
    }

    fn follow(cache: &ResponseCache, key: u128, id: &str) -> Follower {
        match cache.lookup(key, id, Priority::Normal) {
            Lookup::Follow(f) => f,
            other => panic!("expected to follow, got {other:?}"),
        }
    }

    fn id_of(answer: &Bytes) -> String {
        ModelInferResponse::decode(answer.clone()).unwrap().id
    }

    #[tokio::test]
    async fn identical_misses_wait_for_the_first_and_get_its_answer() {
        let cache = ResponseCache::default();
        let leader = lead(&cache, 5, "first");
        let waiting: Vec<_> = ["second", "third"]
            .into_iter()
            .map(|id| {
                let f = follow(&cache, 5, id);
                tokio::spawn(async move { f.wait(id).await })
            })
            .collect();
        // Another request is not merged with this one.
        drop(lead(&cache, 6, "other"));
        assert_eq!(cache.in_flight(), 1);
        assert!(leader.answered(encoded("first", 4), Duration::from_secs(60)));
        for (w, id) in waiting.into_iter().zip(["second", "third"]) {
            match w.await.unwrap() {
                Followed::Answer(a) => assert_eq!(id_of(&a), id),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(cache.in_flight(), 0);
        // And it was kept: the next identical call is a hit.
        match cache.lookup(5, "fourth", Priority::Normal) {
            Lookup::Hit(a) => assert_eq!(id_of(&a), "fourth"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_call_does_not_wait_behind_an_identical_call_of_lower_priority() {
        let cache = ResponseCache::default();
        let leader = match cache.lookup(4, "a", Priority::Normal) {
            Lookup::Lead(l) => l,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            cache.lookup(4, "b", Priority::Critical),
            Lookup::Overtake
        ));
        for p in [Priority::Normal, Priority::Sheddable] {
            assert!(
                matches!(cache.lookup(4, "c", p), Lookup::Follow(_)),
                "{p:?}"
            );
        }
        drop(leader);
    }

    #[tokio::test]
    async fn an_answer_too_large_to_keep_is_still_shared() {
        let cache = ResponseCache::new(64 * 1024);
        let leader = lead(&cache, 1, "a");
        let f = follow(&cache, 1, "b");
        let big = Bytes::from(vec![0; 2048]);
        assert!(!leader.answered(big.clone(), Duration::from_secs(60)));
        match f.wait("b").await {
            Followed::Answer(a) => assert!(a.starts_with(&big)),
            other => panic!("{other:?}"),
        }
        drop(lead(&cache, 1, "c"));
    }

    #[tokio::test]
    async fn outcomes_not_to_share_send_each_waiting_call_alone() {
        let cache = ResponseCache::default();
        let leader = lead(&cache, 9, "a");
        let f = follow(&cache, 9, "b");
        leader.not_shared();
        assert_eq!(f.wait("b").await, Followed::CallAlone);
        // Nothing was kept, and the flight is over: the next call leads.
        drop(lead(&cache, 9, "c"));
    }

    #[tokio::test]
    async fn a_leader_that_gives_up_or_goes_hands_over_the_lead() {
        let cache = ResponseCache::default();
        let leader = lead(&cache, 3, "a");
        let f = follow(&cache, 3, "b");
        leader.abandoned();
        assert_eq!(f.wait("b").await, Followed::LookAgain);
        // A leader whose caller left (dropped, never reporting) hands over too.
        let leader = lead(&cache, 3, "b");
        let f = follow(&cache, 3, "c");
        drop(leader);
        assert_eq!(f.wait("c").await, Followed::LookAgain);
        assert_eq!(cache.in_flight(), 0);
        drop(lead(&cache, 3, "c"));
    }

    #[test]
    fn caching_is_off_for_a_ttl_of_zero_and_for_models_with_side_effects() {
        assert_eq!(CacheSpec::from_policy(0, "", true, 1), None);
        assert_eq!(CacheSpec::from_policy(1000, "", false, 1), None);
        let s = CacheSpec::from_policy(1000, "X-Tenant", true, 7).unwrap();
        assert_eq!(s.epoch, 7);
        assert_eq!(s.ttl, Duration::from_secs(1));
        assert_eq!(s.key_header.as_deref(), Some("x-tenant"));
    }
}
