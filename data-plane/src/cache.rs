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
//!   the nodes nothing), and concurrent misses of one request are not merged: each goes to a
//!   node.

use std::hash::Hasher;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use fulcrum_proto::inference::ModelInferRequest;
use http::HeaderMap;
use prost::Message;
use siphasher::sip128::{Hasher128, SipHasher13};

/// Default size of a router's response cache, in bytes: 256 MiB, a small share of an inference
/// host's memory that still holds tens of thousands of typical answers (kilobytes each).
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// Largest share of the cache one answer may take: a 1/64th, so a few huge answers (images,
/// long generations) cannot push out everything else.
pub const MAX_ENTRY_SHARE: u64 = 64;

/// Response header saying whether the answer came from the cache (`hit`) or was stored in it
/// (`miss`).
pub const CACHE_HEADER: &str = "x-fulcrum-cache";

/// A model's caching, from its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpec {
    /// How long an answer is kept.
    pub ttl: Duration,
    /// The request header whose value is part of the key (lowercase), if any.
    pub key_header: Option<String>,
}

impl CacheSpec {
    /// The caching a policy sets, if any: `None` for a TTL of 0, or for a model with side
    /// effects (the control plane refuses that policy; a router does not trust it).
    pub fn from_policy(ttl_ms: u32, key_header: &str, idempotent: bool) -> Option<Self> {
        (ttl_ms > 0 && idempotent).then(|| Self {
            ttl: Duration::from_millis(u64::from(ttl_ms)),
            key_header: (!key_header.is_empty()).then(|| key_header.to_ascii_lowercase()),
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
    /// A cache of at most `bytes` of answers (0: nothing is ever kept).
    pub fn new(bytes: u64) -> Self {
        Self {
            keys: (rand::random(), rand::random()),
            entries: moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, e: &Entry| u32::try_from(e.answer.len()).unwrap_or(u32::MAX))
                .expire_after(PerModelTtl)
                .build(),
            max_entry: usize::try_from(bytes / MAX_ENTRY_SHARE).unwrap_or(usize::MAX),
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
        match spec.key_header.as_deref().map(|name| headers.get_all(name)) {
            Some(values) => {
                for v in values {
                    piece(b"k");
                    piece(v.as_bytes());
                }
            }
            None => piece(b"-"),
        }
        let mut parameters: Vec<_> = request.parameters.iter().collect();
        parameters.sort_unstable_by(|a, b| a.0.cmp(b.0));
        piece(&(parameters.len() as u64).to_le_bytes());
        for (name, value) in parameters {
            piece(name.as_bytes());
            piece(&value.encode_to_vec());
        }
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

    #[test]
    fn caching_is_off_for_a_ttl_of_zero_and_for_models_with_side_effects() {
        assert_eq!(CacheSpec::from_policy(0, "", true), None);
        assert_eq!(CacheSpec::from_policy(1000, "", false), None);
        let s = CacheSpec::from_policy(1000, "X-Tenant", true).unwrap();
        assert_eq!(s.ttl, Duration::from_secs(1));
        assert_eq!(s.key_header.as_deref(), Some("x-tenant"));
    }
}
