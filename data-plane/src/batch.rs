//! Request batching: `ModelInfer` calls of one model that arrive together are merged along
//! their first dimension into one node call, whose answer is split back among them
//! (`ModelPolicy.batch_max_size`, `batch_window_us`).
//!
//! The seed article's batching (16 to 64 requests a call), for the servers that do not batch
//! themselves (a model server without a dynamic batcher, or one whose batcher sees only one
//! router's share): a GPU runs a batch of 16 in little more than the time of one. Triton's
//! dynamic batcher is the model: calls wait at most a window (`batch_window_us`, default
//! [`DEFAULT_WINDOW`]) for others to join, and a batch leaves as soon as it is full.
//!
//! What may share a batch ([`group_key`]): requests of the same model and version, priority
//! and caller (`authorization`, `x-fulcrum-caller`), the same parameters and requested
//! outputs, and inputs alike in name, datatype, parameters and every dimension but the first;
//! the data all in `raw_input_contents` (of fixed-size datatypes: raw BYTES elements have no
//! fixed size to cut rows by) or all in typed `contents` (BYTES too: one entry an element).
//! A request of a Triton sequence is never batched (its state is the sequence's): it goes to a
//! node alone.
//!
//! The merged request ([`merge`]) is the first request with each input's first dimension the
//! sum of the members' and its data theirs one after another; its answer is split ([`split`])
//! by the same rows: each output must have the batch's rows as its first dimension and its
//! data (raw or typed) divide evenly into them, else nothing can be split and every member is
//! sent to a node alone (as it would have been without batching). Each member gets its own
//! `id`.
//!
//! The batcher itself ([`Batcher`]) is by hand, like the cache's flights: the first call of a
//! batch leads it (waits the window or until it is full, sends, splits); the others wait for
//! their share. A leader whose caller leaves hands its members back: each goes alone.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fulcrum_proto::inference::model_infer_response::InferOutputTensor;
use fulcrum_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use http::HeaderMap;
use prost::Message;
use siphasher::sip128::{Hasher128, SipHasher13};
use tokio::sync::{Notify, oneshot};

use crate::cache::hash_parameters;
use crate::priority::Priority;

/// Default of `batch_window_us`: 2 ms, Triton's order of magnitude for a dynamic batcher's
/// delay, a few percent of a typical model call's time.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(2);

/// Headers that tell callers apart: calls of different callers never share a batch (the merged
/// call carries its leader's headers).
const CALLER_HEADERS: [&str; 2] = ["authorization", "x-fulcrum-caller"];

/// A model's batching, from its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpec {
    /// Calls merged at most.
    pub max_size: usize,
    /// Longest a call waits for others.
    pub window: Duration,
}

impl BatchSpec {
    /// The batching a policy sets, if any: `None` below a size of 2.
    pub fn from_policy(max_size: u32, window_us: u32) -> Option<Self> {
        (max_size >= 2).then(|| Self {
            max_size: max_size.min(1024) as usize,
            window: match window_us {
                0 => DEFAULT_WINDOW,
                us => Duration::from_micros(u64::from(us.min(100_000))),
            },
        })
    }
}

/// The rows (first dimension) of a request that may be batched, and its group: requests of
/// one group can be merged. `None` when the request cannot share a batch.
pub fn group_key(
    request: &ModelInferRequest,
    priority: Priority,
    headers: &HeaderMap,
) -> Option<(u128, i64)> {
    // All inputs raw, or all typed (`contents`): one form for the whole batch.
    let raw = !request.raw_input_contents.is_empty();
    if request.inputs.is_empty()
        || (raw && request.raw_input_contents.len() != request.inputs.len())
        || (!raw && request.inputs.iter().any(|i| i.contents.is_none()))
    {
        return None;
    }
    // A Triton sequence's requests carry its state: never merged.
    if request.parameters.contains_key("sequence_id") {
        return None;
    }
    let rows = request.inputs[0].shape.first().copied()?;
    if rows < 1 {
        return None;
    }
    // The grouping needs no secret: it decides only which calls travel together.
    let mut h = SipHasher13::new_with_keys(0, 0);
    let mut piece = |bytes: &[u8]| {
        h.write_u64(bytes.len() as u64);
        h.write(bytes);
    };
    piece(request.model_name.as_bytes());
    piece(request.model_version.as_bytes());
    piece(&[priority as u8, u8::from(raw)]);
    for name in CALLER_HEADERS {
        for v in headers.get_all(name) {
            piece(name.as_bytes());
            piece(v.as_bytes());
        }
    }
    hash_parameters(&mut piece, &request.parameters);
    for input in &request.inputs {
        // Raw BYTES elements have no fixed size to cut rows by; typed ones are one entry each.
        if (raw && (input.datatype == "BYTES" || input.contents.is_some()))
            || input.shape.first() != Some(&rows)
        {
            return None;
        }
        piece(input.name.as_bytes());
        piece(input.datatype.as_bytes());
        let dims: Vec<u8> = input.shape[1..]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        piece(&dims);
        hash_parameters(&mut piece, &input.parameters);
    }
    piece(&(request.outputs.len() as u64).to_le_bytes());
    for output in &request.outputs {
        piece(&output.encode_to_vec());
    }
    Some((h.finish128().as_u128(), rows))
}

/// One request of the members' (all of one group, in order): the first's, with each input's
/// first dimension the sum of theirs and its data (raw or typed) theirs one after another, and
/// no id.
pub fn merge(members: &[&ModelInferRequest]) -> ModelInferRequest {
    let first = members[0];
    let rows: i64 = members.iter().map(|m| m.inputs[0].shape[0]).sum();
    let mut merged = first.clone();
    merged.id.clear();
    let raw = !first.raw_input_contents.is_empty();
    for (i, input) in merged.inputs.iter_mut().enumerate() {
        input.shape[0] = rows;
        if raw {
            let len = members.iter().map(|m| m.raw_input_contents[i].len()).sum();
            let mut data = BytesMut::with_capacity(len);
            for m in members {
                data.extend_from_slice(&m.raw_input_contents[i]);
            }
            merged.raw_input_contents[i] = data.freeze();
        } else {
            let mut contents = InferTensorContents::default();
            for m in members {
                if let Some(c) = &m.inputs[i].contents {
                    append(&mut contents, c);
                }
            }
            input.contents = Some(contents);
        }
    }
    merged
}

/// Calls `$f!(field)` for every repeated field of `InferTensorContents`.
macro_rules! each_field {
    ($f:ident) => {
        $f!(bool_contents);
        $f!(int_contents);
        $f!(int64_contents);
        $f!(uint_contents);
        $f!(uint64_contents);
        $f!(fp32_contents);
        $f!(fp64_contents);
        $f!(bytes_contents);
    };
}

/// `from`'s elements after `to`'s, field by field.
fn append(to: &mut InferTensorContents, from: &InferTensorContents) {
    macro_rules! extend {
        ($field:ident) => {
            to.$field.extend_from_slice(&from.$field)
        };
    }
    each_field!(extend);
}

/// Elements in `c`, all fields together (a tensor uses one).
fn elements(c: &InferTensorContents) -> usize {
    let mut n = 0;
    macro_rules! count {
        ($field:ident) => {
            n += c.$field.len()
        };
    }
    each_field!(count);
    n
}

/// Elements `from..to` of every field of `c`.
fn slice(c: &InferTensorContents, from: usize, to: usize) -> InferTensorContents {
    let mut out = InferTensorContents::default();
    macro_rules! cut {
        ($field:ident) => {
            if !c.$field.is_empty() {
                out.$field = c.$field[from..to].to_vec();
            }
        };
    }
    each_field!(cut);
    out
}

/// The answer to a merged request, split by the members' `rows` (in the order they were
/// merged): each member's outputs have its rows, and its slice of the data (raw bytes or typed
/// elements). Fails, saying why, when an output does not have the batch's rows as its first
/// dimension, or has no data, or its data does not divide evenly into them.
pub fn split(answer: &ModelInferResponse, rows: &[i64]) -> Result<Vec<ModelInferResponse>, String> {
    let total: i64 = rows.iter().sum();
    let raw = !answer.raw_output_contents.is_empty();
    if raw && answer.raw_output_contents.len() != answer.outputs.len() {
        return Err("raw_output_contents has not one entry per output".into());
    }
    // Per output: bytes (raw) or elements (typed) per row.
    let mut cuts = Vec::with_capacity(answer.outputs.len());
    for (i, output) in answer.outputs.iter().enumerate() {
        if output.shape.first() != Some(&total) {
            return Err(format!(
                "output {:?} has shape {:?}, not the batch's {total} rows first",
                output.name, output.shape
            ));
        }
        let total = usize::try_from(total).map_err(|_| "too many rows".to_owned())?;
        let len = match (raw, &output.contents) {
            (true, _) => answer.raw_output_contents[i].len(),
            (false, Some(c)) => elements(c),
            (false, None) => {
                return Err(format!("output {:?} has no data", output.name));
            }
        };
        if len % total != 0 {
            return Err(format!(
                "output {:?}'s {len} {} do not divide into {total} rows",
                output.name,
                if raw { "bytes" } else { "elements" }
            ));
        }
        cuts.push(len / total);
    }
    let mut offset = 0usize;
    let mut answers = Vec::with_capacity(rows.len());
    for &r in rows {
        let r = usize::try_from(r).map_err(|_| "negative rows".to_owned())?;
        let outputs = answer
            .outputs
            .iter()
            .zip(&cuts)
            .map(|(o, per_row)| InferOutputTensor {
                shape: std::iter::once(r as i64)
                    .chain(o.shape[1..].iter().copied())
                    .collect(),
                contents: o
                    .contents
                    .as_ref()
                    .filter(|_| !raw)
                    .map(|c| slice(c, offset * per_row, (offset + r) * per_row)),
                ..o.clone()
            })
            .collect();
        let raw_output_contents = answer
            .raw_output_contents
            .iter()
            .zip(&cuts)
            .map(|(data, per_row)| data.slice(offset * per_row..(offset + r) * per_row))
            .collect();
        answers.push(ModelInferResponse {
            outputs,
            raw_output_contents,
            ..answer.clone()
        });
        offset += r;
    }
    Ok(answers)
}

/// What a member of a batch gets.
#[derive(Debug)]
pub enum Share {
    /// Its answer (encoded, with its id), or the batch's error, and the response headers.
    Answered(Result<(Bytes, HeaderMap), tonic::Status>),
    /// Go to a node alone: the batch's answer could not be split, or its leader went.
    Alone,
}

/// A call waiting in a batch: its request and where its share goes.
#[derive(Debug)]
pub struct Member {
    /// Its request.
    pub request: ModelInferRequest,
    /// Its rows.
    pub rows: i64,
    /// Where its share goes.
    pub share: oneshot::Sender<Share>,
}

/// A batch still taking members.
#[derive(Debug)]
struct Open {
    /// Tells the batches of one key apart (one sealed, the next opened).
    id: u64,
    members: Vec<Member>,
    /// Told when the batch is full.
    full: Arc<Notify>,
}

/// The batches open on a router, by group.
#[derive(Debug, Default)]
pub struct Batcher {
    open: Mutex<HashMap<u128, Open>>,
    made: std::sync::atomic::AtomicU64,
}

/// What joining a batch made of a call.
#[derive(Debug)]
pub enum Joined<'a> {
    /// The first of its batch: it leads it ([`Lead::collect`]), with its own request.
    Lead(Lead<'a>, ModelInferRequest),
    /// A member: its share comes here.
    Member(oneshot::Receiver<Share>),
    /// Its batch is full and about to leave: it goes to a node alone.
    Alone(ModelInferRequest),
}

/// The call that leads a batch: collects its members, then sends and splits.
#[derive(Debug)]
pub struct Lead<'a> {
    batcher: &'a Batcher,
    key: u128,
    id: u64,
    max_size: usize,
    full: Arc<Notify>,
    collected: bool,
}

impl Batcher {
    /// Joins the open batch of `key` with `request` (of `rows` rows), or opens one: then this
    /// call leads it, and keeps its request.
    pub fn join(
        &self,
        key: u128,
        spec: BatchSpec,
        request: ModelInferRequest,
        rows: i64,
    ) -> Joined<'_> {
        let mut open = self.lock();
        if let Some(batch) = open.get_mut(&key) {
            // Full, and not yet sealed by its leader: this call does not make it larger than
            // the node accepts.
            if batch.members.len() + 1 >= spec.max_size {
                return Joined::Alone(request);
            }
            let (share, rx) = oneshot::channel();
            batch.members.push(Member {
                request,
                rows,
                share,
            });
            // The leader is not in `members`: full at one less than the size.
            if batch.members.len() + 1 >= spec.max_size {
                batch.full.notify_one();
            }
            return Joined::Member(rx);
        }
        let id = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let full = Arc::new(Notify::new());
        open.insert(
            key,
            Open {
                id,
                members: Vec::new(),
                full: full.clone(),
            },
        );
        Joined::Lead(
            Lead {
                batcher: self,
                key,
                id,
                max_size: spec.max_size,
                full,
                collected: false,
            },
            request,
        )
    }

    /// Batches taking members now.
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u128, Open>> {
        // Each change is one insert, push or remove: consistent whenever a holder panics.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes batch `id` of `key` (if it is still open) and returns its members.
    fn seal(&self, key: u128, id: u64) -> Vec<Member> {
        let mut open = self.lock();
        match open.get(&key) {
            Some(batch) if batch.id == id => open.remove(&key).map_or_else(Vec::new, |b| b.members),
            _ => Vec::new(),
        }
    }
}

impl Lead<'_> {
    /// Waits until the batch is full or `window` has passed, and takes its members (the
    /// leader's own request is not among them). The batch is closed: calls that come now open
    /// the next.
    pub async fn collect(&mut self, window: Duration) -> Vec<Member> {
        if self.max_size > 1 {
            let _ = tokio::time::timeout(window, self.full.notified()).await;
        }
        self.collected = true;
        self.batcher.seal(self.key, self.id)
    }
}

impl Drop for Lead<'_> {
    /// A leader that goes before collecting (its caller left) closes its batch: the members'
    /// senders go with it, and each member goes to a node alone.
    fn drop(&mut self) {
        if !self.collected {
            drop(self.batcher.seal(self.key, self.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::inference::InferParameter;
    use fulcrum_proto::inference::infer_parameter::ParameterChoice;
    use fulcrum_proto::inference::model_infer_request::InferInputTensor;
    use proptest::prelude::*;

    fn request(id: &str, rows: i64, cols: i64, seed: u8) -> ModelInferRequest {
        let data: Vec<u8> = (0..rows * cols * 4)
            .map(|i| seed.wrapping_add(i as u8))
            .collect();
        ModelInferRequest {
            model_name: "m".into(),
            id: id.into(),
            inputs: vec![
                InferInputTensor {
                    name: "x".into(),
                    datatype: "FP32".into(),
                    shape: vec![rows, cols],
                    ..Default::default()
                },
                InferInputTensor {
                    name: "y".into(),
                    datatype: "INT8".into(),
                    shape: vec![rows],
                    ..Default::default()
                },
            ],
            raw_input_contents: vec![Bytes::from(data), Bytes::from(vec![seed; rows as usize])],
            ..Default::default()
        }
    }

    /// An echo model's answer: each input back as an output of the same shape.
    fn echo(r: &ModelInferRequest) -> ModelInferResponse {
        ModelInferResponse {
            model_name: r.model_name.clone(),
            id: r.id.clone(),
            outputs: r
                .inputs
                .iter()
                .map(|i| InferOutputTensor {
                    name: i.name.clone(),
                    datatype: i.datatype.clone(),
                    shape: i.shape.clone(),
                    ..Default::default()
                })
                .collect(),
            raw_output_contents: r.raw_input_contents.clone(),
            ..Default::default()
        }
    }

    fn key(r: &ModelInferRequest) -> Option<u128> {
        group_key(r, Priority::Normal, &HeaderMap::new()).map(|(k, _)| k)
    }

    proptest! {
        /// Merged, answered by an echo model and split, every member gets exactly its own
        /// tensors back.
        #[test]
        fn split_undoes_merge(rows in prop::collection::vec(1i64..5, 1..12), cols in 1i64..4) {
            let members: Vec<_> = rows
                .iter()
                .enumerate()
                .map(|(i, &r)| request(&format!("c{i}"), r, cols, i as u8 * 17))
                .collect();
            let refs: Vec<_> = members.iter().collect();
            let merged = merge(&refs);
            prop_assert_eq!(merged.inputs[0].shape[0], rows.iter().sum::<i64>());
            let answers = split(&echo(&merged), &rows).unwrap();
            prop_assert_eq!(answers.len(), members.len());
            for (m, a) in members.iter().zip(&answers) {
                let want = echo(m);
                prop_assert_eq!(&a.outputs, &want.outputs);
                prop_assert_eq!(&a.raw_output_contents, &want.raw_output_contents);
            }
        }
    }

    #[test]
    fn only_alike_requests_share_a_group() {
        let a = request("a", 2, 3, 1);
        assert_eq!(
            key(&a),
            key(&request("b", 5, 3, 9)),
            "rows and data may differ"
        );
        assert_ne!(
            key(&a),
            key(&request("c", 2, 4, 1)),
            "other inner dimensions"
        );
        let mut other_model = a.clone();
        other_model.model_name = "n".into();
        assert_ne!(key(&a), key(&other_model));
        let mut with_param = a.clone();
        with_param.parameters.insert(
            "temperature".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::DoubleParam(0.5)),
            },
        );
        assert_ne!(key(&a), key(&with_param));
        assert_ne!(
            group_key(&a, Priority::Normal, &HeaderMap::new()),
            group_key(&a, Priority::Critical, &HeaderMap::new())
        );
        let mut alice = HeaderMap::new();
        alice.insert("x-fulcrum-caller", "alice".parse().unwrap());
        assert_ne!(
            group_key(&a, Priority::Normal, &alice),
            group_key(&a, Priority::Normal, &HeaderMap::new())
        );
        // Never batched: sequences, BYTES, typed contents, inputs of other row counts.
        let mut seq = a.clone();
        seq.parameters.insert(
            "sequence_id".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(3)),
            },
        );
        assert_eq!(key(&seq), None);
        let mut bytes = a.clone();
        bytes.inputs[1].datatype = "BYTES".into();
        assert_eq!(key(&bytes), None);
        let mut typed = a.clone();
        typed.raw_input_contents.clear();
        assert_eq!(key(&typed), None);
        let mut ragged = a.clone();
        ragged.inputs[1].shape = vec![3];
        assert_eq!(key(&ragged), None);
    }

    /// `request` with its data in typed `contents` (FP32 and INT8 as int_contents; BYTES too).
    fn typed(r: &ModelInferRequest) -> ModelInferRequest {
        let mut t = r.clone();
        t.raw_input_contents.clear();
        let x: Vec<f32> = r.raw_input_contents[0]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let y: Vec<Vec<u8>> = r.raw_input_contents[1]
            .iter()
            .map(|b| vec![*b; 3])
            .collect();
        t.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: x,
            ..Default::default()
        });
        t.inputs[1].datatype = "BYTES".into();
        t.inputs[1].contents = Some(InferTensorContents {
            bytes_contents: y,
            ..Default::default()
        });
        t
    }

    /// An echo model's answer to a typed request: each input's contents back.
    fn echo_typed(r: &ModelInferRequest) -> ModelInferResponse {
        ModelInferResponse {
            model_name: r.model_name.clone(),
            outputs: r
                .inputs
                .iter()
                .map(|i| InferOutputTensor {
                    name: i.name.clone(),
                    datatype: i.datatype.clone(),
                    shape: i.shape.clone(),
                    contents: i.contents.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn typed_requests_batch_too_bytes_included() {
        let members: Vec<_> = [1, 3, 2]
            .iter()
            .enumerate()
            .map(|(i, &rows)| typed(&request(&format!("t{i}"), rows, 2, i as u8 * 9)))
            .collect();
        let keys: Vec<_> = members.iter().map(key).collect();
        assert!(keys[0].is_some() && keys.iter().all(|k| *k == keys[0]));
        // Typed and raw requests do not share a batch.
        assert_ne!(keys[0], key(&request("r", 1, 2, 0)));
        let merged = merge(&members.iter().collect::<Vec<_>>());
        assert_eq!(merged.inputs[0].shape, [6, 2]);
        let answers = split(&echo_typed(&merged), &[1, 3, 2]).unwrap();
        for (m, a) in members.iter().zip(&answers) {
            assert_eq!(a.outputs, echo_typed(m).outputs);
        }
        // An input with neither raw nor typed data cannot be batched.
        let mut empty = members[0].clone();
        empty.inputs[1].contents = None;
        assert_eq!(key(&empty), None);
    }

    #[test]
    fn an_answer_that_cannot_be_split_says_why() {
        let members = [request("a", 1, 2, 0), request("b", 2, 2, 0)];
        let merged = merge(&[&members[0], &members[1]]);
        let mut answer = echo(&merged);
        answer.outputs[0].shape = vec![1, 2];
        let e = split(&answer, &[1, 2]).unwrap_err();
        assert!(e.contains("not the batch's 3 rows"), "{e}");
        let mut no_data = echo(&merged);
        no_data.raw_output_contents.clear();
        let e = split(&no_data, &[1, 2]).unwrap_err();
        assert!(e.contains("has no data"), "{e}");
    }

    fn join(b: &Batcher, key: u128, spec: BatchSpec) -> Joined<'_> {
        b.join(key, spec, request("m", 1, 1, 0), 1)
    }

    #[tokio::test]
    async fn the_first_call_leads_and_collects_the_others_until_full() {
        let b = Batcher::default();
        let spec = BatchSpec {
            max_size: 3,
            window: Duration::from_secs(30),
        };
        let Joined::Lead(mut lead, _) = join(&b, 1, spec) else {
            panic!("the first call leads");
        };
        let mut shares = Vec::new();
        for _ in 0..2 {
            match join(&b, 1, spec) {
                Joined::Member(rx) => shares.push(rx),
                other => panic!("expected a member, got {other:?}"),
            }
        }
        // A fourth finds it full: alone.
        assert!(matches!(join(&b, 1, spec), Joined::Alone(_)));
        // Full at three: collected at once, not after the 30 s window.
        let members = tokio::time::timeout(Duration::from_secs(5), lead.collect(spec.window))
            .await
            .expect("a full batch leaves at once");
        assert_eq!(members.len(), 2);
        assert_eq!(b.open(), 0);
        // The next call opens the next batch.
        assert!(matches!(join(&b, 1, spec), Joined::Lead(..)));
        drop(members);
        for rx in shares {
            assert!(rx.await.is_err(), "dropped members hear nothing");
        }
    }

    #[tokio::test]
    async fn a_leader_that_goes_frees_its_members() {
        let b = Batcher::default();
        let spec = BatchSpec {
            max_size: 8,
            window: Duration::from_secs(30),
        };
        let lead = join(&b, 2, spec);
        let Joined::Member(rx) = join(&b, 2, spec) else {
            panic!("a member");
        };
        drop(lead);
        assert!(rx.await.is_err());
        assert_eq!(b.open(), 0);
    }

    #[test]
    fn batching_is_off_below_two_and_the_window_defaults() {
        assert_eq!(BatchSpec::from_policy(1, 0), None);
        assert_eq!(
            BatchSpec::from_policy(16, 0),
            Some(BatchSpec {
                max_size: 16,
                window: DEFAULT_WINDOW
            })
        );
        assert_eq!(
            BatchSpec::from_policy(16, 500).unwrap().window,
            Duration::from_micros(500)
        );
    }
}
