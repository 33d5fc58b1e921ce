//! Background calls: the tasks of the `fulcrum.v1.Tasks` service ([`crate::ingress::tasks`]),
//! as the router that accepted them keeps them.
//!
//! The seed article's asynchronous pattern (submit, get a task id, poll until it is done) for
//! inference that takes longer than a caller wants to hold a call open. A task is an ordinary
//! `ModelInfer` call the router makes on the caller's behalf, started at once; this store keeps
//! it while it runs and its outcome for [`TaskLimits::keep`] after it ends, so that the caller
//! can fetch it (or wait for it, a long poll) with `GetTask`.
//!
//! Bounds, because tasks come from the network: at most [`TaskLimits::max_tasks`] tasks held,
//! running or ended, and at most [`TaskLimits::max_bytes`] bytes of them (the requests of
//! running tasks, the answers of ended ones). A submission beyond either is refused
//! (RESOURCE_EXHAUSTED) rather than an answer nobody fetched yet being dropped: a caller that
//! was told "accepted" finds its answer. Ended tasks are forgotten when they expire (oldest
//! first, checked on every submission and by [`expire_every_second`]) or when deleted.
//!
//! A task's id is 32 hex digits of randomness, `@`, and the router's id: unguessable, and it
//! says which router holds the task, so that another router asked for it can say where to ask.
//! When the router checks tokens, a task belongs to its submitter: another caller asking for it
//! is told it does not exist.
//!
//! Why by hand rather than in a cache crate (moka): a running task must never be evicted (its
//! caller was promised an answer), while moka's bounds evict whatever they choose.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use fulcrum_proto::inference::ModelInferResponse;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::TaskError;

/// Default of [`TaskLimits::max_tasks`]. A held task without its payload is a few hundred
/// bytes, so this bounds the bookkeeping to tens of megabytes; it is also more calls than a
/// router has nodes to run at once, by far: what it holds beyond that are answers waiting to be
/// fetched.
pub const DEFAULT_MAX_TASKS: usize = 100_000;

/// Default of [`TaskLimits::max_bytes`]: the response cache's default size again, a quarter of
/// a small (1 GiB) router's memory for both together.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// Default of [`TaskLimits::keep`]. Long enough for a caller that lost its connection to come
/// back (a restart, a network change) and fetch its answer; short enough that answers nobody
/// fetches do not hold the router's memory for long.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(600);

/// Longest deadline a task may ask for: long generations take minutes, not hours, and a
/// router's restart (which ends its tasks) is no rarer than that.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// How a router bounds its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// Most tasks held, running or ended.
    pub max_tasks: usize,
    /// Most bytes held: requests of running tasks, answers of ended ones.
    pub max_bytes: u64,
    /// How long an ended task is kept.
    pub keep: Duration,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            max_tasks: DEFAULT_MAX_TASKS,
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The call was answered.
    Succeeded(ModelInferResponse),
    /// The call failed with this status.
    Failed {
        /// The status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// `CancelTask` stopped it.
    Cancelled,
}

/// The prefix of the answer headers a task keeps: Fulcrum's own (`x-fulcrum-node`,
/// `x-fulcrum-region`, `x-fulcrum-attempts`, `x-fulcrum-fallback`, `x-fulcrum-canary`,
/// `x-fulcrum-cache`), which say how the call was served.
pub const KEPT_HEADER_PREFIX: &str = "x-fulcrum-";

impl Outcome {
    /// The outcome of a call that ended with `result` (the node's answer, encoded), and the
    /// Fulcrum headers of its answer.
    pub fn of(
        result: Result<tonic::Response<bytes::Bytes>, tonic::Status>,
    ) -> (Self, BTreeMap<String, String>) {
        use prost::Message;
        let kept = |headers: &http::HeaderMap| {
            headers
                .iter()
                .filter(|(name, _)| name.as_str().starts_with(KEPT_HEADER_PREFIX))
                .filter_map(|(name, value)| {
                    Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
                })
                .collect()
        };
        match result {
            Ok(answer) => {
                let headers = kept(answer.metadata().as_ref());
                let outcome = match ModelInferResponse::decode(answer.into_inner()) {
                    Ok(response) => Outcome::Succeeded(response),
                    Err(e) => Outcome::Failed {
                        code: tonic::Code::Internal,
                        message: format!("the node's answer does not decode: {e}"),
                    },
                };
                (outcome, headers)
            }
            Err(status) => (
                Outcome::Failed {
                    code: status.code(),
                    message: status.message().to_owned(),
                },
                kept(status.metadata().as_ref()),
            ),
        }
    }

    /// Bytes it holds.
    fn size(&self) -> u64 {
        use prost::Message;
        match self {
            Outcome::Succeeded(r) => r.encoded_len() as u64,
            Outcome::Failed { message, .. } => message.len() as u64,
            Outcome::Cancelled => 0,
        }
    }
}

/// An ended task's outcome and times.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    /// How it ended.
    pub outcome: Outcome,
    /// When, in Unix milliseconds.
    pub ended_unix_ms: u64,
    /// When the router forgets it, in Unix milliseconds.
    pub expires_unix_ms: u64,
    /// The answer's Fulcrum headers ([`KEPT_HEADER_PREFIX`]).
    pub headers: BTreeMap<String, String>,
}

/// One task.
#[derive(Debug)]
pub struct Task {
    /// Its id.
    pub id: String,
    /// The model its request names.
    pub model: String,
    /// Who submitted it, when the router checks tokens.
    pub owner: Option<String>,
    /// When it was submitted, in Unix milliseconds.
    pub submitted_unix_ms: u64,
    /// Bytes it counts in the store now (its request while it runs, its outcome after).
    held: AtomicU64,
    /// `None` while it runs.
    ended: watch::Sender<Option<Arc<Ended>>>,
    /// Stops its call.
    abort: Mutex<Option<AbortHandle>>,
}

impl Task {
    /// How it ended, if it did.
    pub fn ended(&self) -> Option<Arc<Ended>> {
        self.ended.borrow().clone()
    }

    /// Waits until it ends.
    pub async fn wait(&self) {
        let mut ended = self.ended.subscribe();
        // The sender lives as long as the task: an error cannot happen while `self` is held.
        let _ = ended.wait_for(Option::is_some).await;
    }

    /// Hands it the handle that stops its call; stops the call at once if the task already
    /// ended (cancelled before its call was started).
    pub fn set_abort(&self, handle: AbortHandle) {
        let mut abort = self.abort.lock().unwrap_or_else(PoisonError::into_inner);
        if self.ended.borrow().is_some() {
            handle.abort();
        } else {
            *abort = Some(handle);
        }
    }

    fn stop_call(&self) {
        let handle = self
            .abort
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            h.abort();
        }
    }
}

/// A router's tasks.
#[derive(Debug)]
pub struct TaskStore {
    router_id: String,
    limits: TaskLimits,
    inner: Mutex<Inner>,
    /// Counters, for the metrics.
    pub stats: TaskStats,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: HashMap<String, Arc<Task>>,
    /// Bytes the tasks hold.
    bytes: u64,
    /// Ended tasks in the order they expire (every one is kept as long).
    expiring: VecDeque<(Instant, Arc<Task>)>,
    running: usize,
}

/// What a router's tasks have done.
#[derive(Debug, Default)]
pub struct TaskStats {
    submitted: AtomicU64,
    refused: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    expired: AtomicU64,
}

impl TaskStats {
    /// Tasks started.
    pub fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Relaxed)
    }

    /// Submissions refused because the store was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Tasks ended, by how: `succeeded`, `failed`, `cancelled`.
    pub fn ended(&self) -> [(&'static str, u64); 3] {
        [
            ("succeeded", self.succeeded.load(Ordering::Relaxed)),
            ("failed", self.failed.load(Ordering::Relaxed)),
            ("cancelled", self.cancelled.load(Ordering::Relaxed)),
        ]
    }

    /// Ended tasks forgotten because nobody deleted them in time.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }
}

/// What a store holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Tasks running.
    pub running: usize,
    /// Tasks ended and kept.
    pub ended: usize,
    /// Bytes held.
    pub bytes: u64,
}

/// Number of random bytes in a task id (32 hex digits): unguessable, so that an id is all a
/// caller needs to show when the router does not check tokens.
const ID_RANDOM_BYTES: usize = 16;

impl TaskStore {
    /// An empty store for the router `router_id`.
    pub fn new(router_id: impl Into<String>, limits: TaskLimits) -> Self {
        Self {
            router_id: router_id.into(),
            limits,
            inner: Mutex::default(),
            stats: TaskStats::default(),
        }
    }

    /// The id of the router whose tasks these are.
    pub fn router_id(&self) -> &str {
        &self.router_id
    }

    /// Its bounds.
    pub fn limits(&self) -> TaskLimits {
        self.limits
    }

    /// What it holds now (after forgetting what expired).
    pub fn held(&self) -> Held {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        Held {
            running: inner.running,
            ended: inner.tasks.len() - inner.running,
            bytes: inner.bytes,
        }
    }

    /// Takes a new task of `model` whose request is `request_bytes` long, or refuses it when
    /// the store is full. The task runs from here on: the caller starts its call and hands
    /// [`Task::set_abort`] its handle, then ends it with [`TaskStore::end`].
    pub fn admit(
        &self,
        model: &str,
        owner: Option<String>,
        request_bytes: u64,
    ) -> Result<Arc<Task>, TaskError> {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        if inner.tasks.len() >= self.limits.max_tasks
            || inner.bytes.saturating_add(request_bytes) > self.limits.max_bytes
        {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(TaskError::Full {
                tasks: inner.tasks.len(),
                bytes: inner.bytes,
                asked: request_bytes,
                max_tasks: self.limits.max_tasks,
                max_bytes: self.limits.max_bytes,
            });
        }
        let task = Arc::new(Task {
            id: self.new_id(),
            model: model.to_owned(),
            owner,
            submitted_unix_ms: unix_ms(SystemTime::now()),
            held: AtomicU64::new(request_bytes),
            ended: watch::Sender::new(None),
            abort: Mutex::default(),
        });
        inner.tasks.insert(task.id.clone(), task.clone());
        inner.bytes += request_bytes;
        inner.running += 1;
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(task)
    }

    /// Ends `task` with `outcome`, unless it ended already (a cancel and the call's end can
    /// race: the first one counts). Returns whether this ended it.
    pub fn end(&self, task: &Task, outcome: Outcome, headers: BTreeMap<String, String>) -> bool {
        let mut inner = self.lock();
        if task.ended.borrow().is_some() {
            return false;
        }
        let counter = match outcome {
            Outcome::Succeeded(_) => &self.stats.succeeded,
            Outcome::Failed { .. } => &self.stats.failed,
            Outcome::Cancelled => &self.stats.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let size = outcome.size()
            + headers
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64)
                .sum::<u64>();
        let now = Instant::now();
        let wall = SystemTime::now();
        let ended = Arc::new(Ended {
            outcome,
            ended_unix_ms: unix_ms(wall),
            expires_unix_ms: unix_ms(wall + self.limits.keep),
            headers,
        });
        task.ended.send_replace(Some(ended));
        inner.running -= 1;
        // A deleted task is no longer counted: only one still held moves to the expiry queue.
        if let Some(held) = inner.tasks.get(&task.id).cloned() {
            let before = held.held.swap(size, Ordering::Relaxed);
            inner.bytes = inner.bytes - before + size;
            inner.expiring.push_back((now + self.limits.keep, held));
        }
        true
    }

    /// The task `id`, as the caller `owner` may see it.
    pub fn get(&self, id: &str, owner: Option<&str>) -> Result<Arc<Task>, TaskError> {
        self.check_id(id)?;
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        match inner.tasks.get(id) {
            // Someone else's task is not told apart from no task: its id is not to be probed.
            Some(task) if task.owner.as_deref() == owner => Ok(task.clone()),
            _ => Err(TaskError::NotFound {
                id: id.to_owned(),
                keep: self.limits.keep,
            }),
        }
    }

    /// Cancels the task `id` if it runs (its call is stopped); returns it as it is then.
    pub fn cancel(&self, id: &str, owner: Option<&str>) -> Result<Arc<Task>, TaskError> {
        let task = self.get(id, owner)?;
        if self.end(&task, Outcome::Cancelled, BTreeMap::new()) {
            task.stop_call();
        }
        Ok(task)
    }

    /// Forgets the task `id`, cancelling it first if it runs.
    pub fn delete(&self, id: &str, owner: Option<&str>) -> Result<(), TaskError> {
        let task = self.cancel(id, owner)?;
        let mut inner = self.lock();
        if inner.tasks.remove(&task.id).is_some() {
            inner.bytes -= task.held.swap(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Forgets the ended tasks whose time is up.
    pub fn expire_now(&self) {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, _)) = inner.expiring.front() {
            if *at > now {
                break;
            }
            let Some((_, task)) = inner.expiring.pop_front() else {
                break;
            };
            // A task deleted meanwhile is gone already.
            if inner.tasks.remove(&task.id).is_some() {
                inner.bytes -= task.held.swap(0, Ordering::Relaxed);
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The router holding task `id` when it is a well-formed id of another router's task.
    pub fn holder_elsewhere<'a>(&self, id: &'a str) -> Option<&'a str> {
        match self.check_id(id) {
            Err(TaskError::Elsewhere { .. }) => Some(&id[2 * ID_RANDOM_BYTES + 1..]),
            _ => None,
        }
    }

    /// A task id is 32 hex digits, `@`, and the id of the router holding it; a well-formed id of
    /// another router's task is told apart, so the caller learns where to ask.
    fn check_id(&self, id: &str) -> Result<(), TaskError> {
        let well_formed = id.len() > 2 * ID_RANDOM_BYTES + 1
            && id.is_char_boundary(2 * ID_RANDOM_BYTES)
            && id.as_bytes()[..2 * ID_RANDOM_BYTES]
                .iter()
                .all(u8::is_ascii_hexdigit)
            && id.as_bytes()[2 * ID_RANDOM_BYTES] == b'@';
        if !well_formed {
            return Err(TaskError::BadId(id.chars().take(80).collect()));
        }
        let holder = &id[2 * ID_RANDOM_BYTES + 1..];
        if holder != self.router_id {
            return Err(TaskError::Elsewhere {
                id: id.to_owned(),
                holder: holder.to_owned(),
                this: self.router_id.clone(),
            });
        }
        Ok(())
    }

    fn new_id(&self) -> String {
        use std::fmt::Write;
        let random: [u8; ID_RANDOM_BYTES] = rand::random();
        let mut id = String::with_capacity(2 * ID_RANDOM_BYTES + 1 + self.router_id.len());
        for b in random {
            let _ = write!(id, "{b:02x}");
        }
        id.push('@');
        id.push_str(&self.router_id);
        id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Forgets expired tasks once a second, so that a router nobody submits to frees their memory
/// too (a second: an answer kept a second past ten minutes costs nothing).
pub async fn expire_every_second(store: Arc<TaskStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        store.expire_now();
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_tasks: usize, max_bytes: u64) -> TaskStore {
        TaskStore::new(
            "r1",
            TaskLimits {
                max_tasks,
                max_bytes,
                keep: Duration::from_secs(60),
            },
        )
    }

    fn answer(bytes: usize) -> Outcome {
        Outcome::Succeeded(ModelInferResponse {
            raw_output_contents: vec![vec![7u8; bytes].into()],
            ..Default::default()
        })
    }

    #[test]
    fn ids_are_random_hex_at_the_router_and_checked() {
        let s = store(10, 1000);
        let a = s.admit("m", None, 1).unwrap();
        let b = s.admit("m", None, 1).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 32 + 1 + 2);
        assert!(a.id.ends_with("@r1"), "{}", a.id);
        assert!(s.get(&a.id, None).is_ok());
        let (g, e) = ("g".repeat(32), "é".repeat(20));
        for bad in ["", "@r1", "xyz@r1", &a.id[..33], g.as_str(), e.as_str()] {
            assert!(
                matches!(s.get(bad, None), Err(TaskError::BadId(_))),
                "{bad:?}"
            );
        }
        let elsewhere = format!("{}@r2", &a.id[..32]);
        match s.get(&elsewhere, None) {
            Err(TaskError::Elsewhere { holder, this, .. }) => {
                assert_eq!((holder.as_str(), this.as_str()), ("r2", "r1"));
            }
            other => panic!("{other:?}"),
        }
        let unknown = format!("{}@r1", "0".repeat(32));
        assert!(matches!(
            s.get(&unknown, None),
            Err(TaskError::NotFound { .. })
        ));
    }

    #[test]
    fn a_full_store_refuses_and_changes_nothing() {
        let s = store(2, 100);
        let a = s.admit("m", None, 60).unwrap();
        // Over the bytes.
        assert!(matches!(
            s.admit("m", None, 41),
            Err(TaskError::Full { .. })
        ));
        let _b = s.admit("m", None, 40).unwrap();
        // Over the count.
        assert!(matches!(s.admit("m", None, 0), Err(TaskError::Full { .. })));
        assert_eq!(s.stats.refused(), 2);
        assert_eq!(
            s.held(),
            Held {
                running: 2,
                ended: 0,
                bytes: 100
            }
        );
        // An ended task holds its answer in place of its request; deleting it frees both.
        assert!(s.end(&a, answer(10), BTreeMap::new()));
        let held = s.held();
        assert_eq!((held.running, held.ended), (1, 1));
        assert!(held.bytes < 60, "{held:?}");
        s.delete(&a.id, None).unwrap();
        assert_eq!(s.held().bytes, 40);
        assert!(s.admit("m", None, 60).is_ok());
    }

    #[test]
    fn the_first_end_counts_and_cancel_stops_the_call() {
        let s = store(10, 1000);
        let t = s.admit("m", None, 5).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let call = rt.spawn(std::future::pending::<()>());
        t.set_abort(call.abort_handle());
        s.cancel(&t.id, None).unwrap();
        assert!(matches!(t.ended().unwrap().outcome, Outcome::Cancelled));
        assert!(rt.block_on(call).unwrap_err().is_cancelled());
        // The call's own end, after the cancel, changes nothing.
        assert!(!s.end(&t, answer(1), BTreeMap::new()));
        assert!(matches!(t.ended().unwrap().outcome, Outcome::Cancelled));
        // A handle given after the task ended stops its call at once.
        let late = rt.spawn(std::future::pending::<()>());
        t.set_abort(late.abort_handle());
        assert!(rt.block_on(late).unwrap_err().is_cancelled());
        let counts = s.stats.ended();
        assert_eq!(counts, [("succeeded", 0), ("failed", 0), ("cancelled", 1)]);
    }

    #[test]
    fn tasks_belong_to_their_submitter() {
        let s = store(10, 1000);
        let t = s.admit("m", Some("alice".into()), 5).unwrap();
        assert!(s.get(&t.id, Some("alice")).is_ok());
        assert!(matches!(
            s.get(&t.id, Some("bob")),
            Err(TaskError::NotFound { .. })
        ));
        assert!(matches!(
            s.get(&t.id, None),
            Err(TaskError::NotFound { .. })
        ));
        assert!(s.cancel(&t.id, Some("bob")).is_err());
        assert!(s.delete(&t.id, Some("bob")).is_err());
        assert!(t.ended().is_none(), "bob changed nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn ended_tasks_expire_after_the_keep_time() {
        let s = store(10, 1000);
        let t = s.admit("m", None, 5).unwrap();
        let running = s.admit("m", None, 5).unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        s.end(&t, answer(3), BTreeMap::new());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(s.get(&t.id, None).is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            s.get(&t.id, None),
            Err(TaskError::NotFound { .. })
        ));
        assert_eq!(s.stats.expired(), 1);
        // A running task never expires.
        assert!(s.get(&running.id, None).is_ok());
        assert_eq!(
            s.held(),
            Held {
                running: 1,
                ended: 0,
                bytes: 5
            }
        );
    }

    #[tokio::test]
    async fn waiting_returns_when_the_task_ends() {
        let s = Arc::new(store(10, 1000));
        let t = s.admit("m", None, 5).unwrap();
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.end(
            &t,
            Outcome::Failed {
                code: tonic::Code::Unavailable,
                message: "no node".into(),
            },
            BTreeMap::new(),
        );
        waiter.await.unwrap();
        assert_eq!(s.stats.ended()[1], ("failed", 1));
    }
}
