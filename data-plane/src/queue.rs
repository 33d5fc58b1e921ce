//! The wait queue of calls that found every node they could use at its concurrency limit.
//!
//! Served by priority ([`crate::priority`]), then first come, first served, with one wake-up
//! per freed slot: when a call ends, its node's slot goes to the first waiting call in that
//! order that can use that node (one of its model's routable nodes, not one it already tried).
//! The woken call then picks as usual (the freed node, or another one freed meanwhile); if a
//! call that never queued took the slot first, it queues again in its old place. A call that
//! leaves after being woken without taking a slot (its caller gave up) passes the wake-up on,
//! so a free slot is never left unclaimed while calls that could use it wait. A full queue
//! lets a call in by shedding its newest call of the lowest priority, if that is below the
//! arriving call's ([`Waited::Displaced`]).
//!
//! Why not `tokio::sync::Notify`: `notify_waiters` woke every waiter for every freed slot, and
//! with hundreds of calls queued on a CPU-starved router that herd cost the CPU the calls
//! needed (the routing-quality benchmark saw the queue collapse into shedding); `notify_one`
//! wakes the oldest waiter whether or not it can use the freed node (another model's, one it
//! already tried), and that waiter swallows the wake-up. Why not a semaphore: slots belong to
//! nodes, and each waiter can use only some of them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::endpoint::NodeConn;
use crate::priority::Priority;

/// Most calls that may wait at once, whatever their expected wait: a bound on the memory that
/// queued requests hold (at inference's usual request sizes, tens of kilobytes, a few thousand
/// calls are some tens of megabytes). The bound that sheds in practice is the expected wait
/// (the calls ahead at the nodes' [`drain_rate`], against [`admit_wait`]), which scales with
/// how fast the nodes drain.
pub const MAX_QUEUED_CALLS: usize = 4096;

/// Longest a call waits in the queue in all: a slot that does not free up within half a second
/// means the model is overloaded, and the caller is better served by a fast RESOURCE_EXHAUSTED
/// it can back off on than by a slow timeout.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_millis(500);

/// Longest expected wait a sheddable call is let into the queue with: half of
/// [`MAX_QUEUE_WAIT`]; critical and normal calls are let in with up to the whole bound
/// ([`admit_wait`]). A queue that overload keeps at its admission bound times out about half
/// of the calls at its back (their expected wait is the bound, and the drain varies): shed
/// after waiting half a second instead of at once (the overload benchmark, scenario 6, saw
/// failed calls' p99 at 501 ms). With twice its expected wait to spare, a sheddable call
/// rarely waits in vain, and the sheddable calls that are served wait half as long. Why not
/// for every call: the same half bound shed 0.5 % of normal calls at 95 % load while a node
/// stalled (scenario 2, quick, 2026-12-07), where the whole bound sheds none; riding out such a
/// transient is what the queue is for, and sheddable calls are the ones meant to go first.
pub const SHEDDABLE_ADMIT_WAIT: Duration = Duration::from_millis(250);

/// Longest expected wait a call of `priority` is let into the queue with.
pub fn admit_wait(priority: Priority) -> Duration {
    match priority {
        Priority::Sheddable => SHEDDABLE_ADMIT_WAIT,
        Priority::Normal | Priority::Critical => MAX_QUEUE_WAIT,
    }
}

/// A call's place in the queue, kept while it waits again after a wake-up it could not use.
#[derive(Debug, Default)]
pub struct Place(Option<u64>);

impl Place {
    /// Whether the call has queued before (it is then let back in whatever the queue's length).
    pub fn has_queued(&self) -> bool {
        self.0.is_some()
    }
}

/// How fast nodes with the given (calls in flight, mean slot hold time in milliseconds) free
/// slots, in slots a second: by Little's law each frees in-flight ÷ hold time a second. `None`
/// when they free nothing (no call in flight, or none that ends: a hung node's estimate is
/// huge, so it adds next to nothing).
pub fn drain_rate(nodes: impl IntoIterator<Item = (u32, f64)>) -> Option<f64> {
    let per_sec: f64 = nodes
        .into_iter()
        .filter(|(_, ms)| ms.is_finite() && *ms > 0.0)
        .map(|(in_flight, ms)| f64::from(in_flight) * 1e3 / ms)
        .sum();
    (per_sec > 0.0 && per_sec.is_finite()).then_some(per_sec)
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// A slot the call can use freed up (or was free already): pick again.
    Woken,
    /// No slot freed in time.
    TimedOut,
    /// The queue is full (of calls of this call's priority or higher): shed the call.
    QueueFull,
    /// The call waited, and a call of higher priority took its place in a full queue: shed it.
    Displaced,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    priority: Priority,
    /// The nodes the call can use.
    nodes: Vec<Arc<NodeConn>>,
    /// A node with a slot free (the call may pick again), or `None`: the call lost its place.
    wake: oneshot::Sender<Option<Arc<NodeConn>>>,
}

impl Waiter {
    /// The waiter's place in line: the highest priority first, the oldest first within one.
    fn order(&self) -> (std::cmp::Reverse<Priority>, u64) {
        (std::cmp::Reverse(self.priority), self.ticket)
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_ticket: u64,
    /// In line ([`Waiter::order`]): the call served next first, the one shed next last.
    waiters: VecDeque<Waiter>,
    /// Who the freed slots went to lately.
    handoffs: Handoffs,
}

/// How long the record of slot hand-offs remembers: the time constant of its decay. At the
/// rates where calls queue (hundreds of freed slots a second and more) a second averages over
/// hundreds of hand-offs, and when critical calls stop queueing the calls below them see the
/// whole drain rate again within a second or two.
const HANDOFF_MEMORY: Duration = Duration::from_secs(1);

/// Slot hand-offs to waiting calls by priority, decaying exponentially with
/// [`HANDOFF_MEMORY`]: how many freed slots a second went to each priority lately.
#[derive(Debug, Default)]
struct Handoffs {
    at_ns: u64,
    counts: [f64; 3],
}

impl Handoffs {
    fn decay_to(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.at_ns) as f64 / 1e9;
        let keep = (-dt / HANDOFF_MEMORY.as_secs_f64()).exp();
        for c in &mut self.counts {
            *c *= keep;
        }
        self.at_ns = now_ns;
    }

    fn record(&mut self, priority: Priority, now_ns: u64) {
        self.decay_to(now_ns);
        self.counts[priority.index()] += 1.0;
    }

    /// Slots a second handed lately to calls above `priority`. An exponentially decayed count
    /// of events at a steady rate settles at rate × time constant, so dividing by the time
    /// constant reads the rate back; with no new hand-offs it decays to zero, so calls below
    /// see the whole drain again once the calls above stop queueing.
    fn rate_above(&self, priority: Priority) -> f64 {
        let above: f64 = self.counts[priority.index() + 1..].iter().sum();
        above / HANDOFF_MEMORY.as_secs_f64()
    }
}

/// The router's wait queue (one per router, shared by every node's connection).
#[derive(Debug, Default)]
pub struct WaitQueue {
    /// `inner.waiters.len()`, read without the lock on every call's end.
    waiting: AtomicUsize,
    inner: Mutex<Inner>,
}

impl WaitQueue {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls waiting now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether no call waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls waiting now ahead of a call of `priority` for `nodes`: the most waiting, at that
    /// priority or higher, for any one of them. Calls for another model whose nodes these are
    /// not do not count (they wait for other slots); calls that share only some nodes count
    /// once, not once per node; calls of lower priority do not count (they are served after
    /// it).
    pub fn waiting_for(&self, nodes: &[Arc<NodeConn>], priority: Priority) -> usize {
        nodes
            .iter()
            .map(|n| {
                n.waiting[priority.index()..]
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed) as usize)
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0)
    }

    /// Of the `rate` slots a second some nodes free, those left to waiting calls of
    /// `priority`: the rest went to calls of higher priority lately, which overtake it in
    /// line. At least zero.
    pub fn rate_left_for(&self, priority: Priority, rate: f64) -> f64 {
        if priority == Priority::Critical {
            return rate;
        }
        let mut inner = self.lock();
        inner.handoffs.decay_to(crate::endpoint::now_ns());
        (rate - inner.handoffs.rate_above(priority)).max(0.0)
    }

    /// Waits up to `timeout` for a slot on one of `nodes`, keeping the call's `place` in line
    /// among the calls of its `priority`.
    ///
    /// `drain_per_sec`, when known, is how fast `nodes` free slots ([`drain_rate`]). A call
    /// joining ahead of calls of lower priority pushes them back; the newest of them that can
    /// then no longer expect a slot within [`MAX_QUEUE_WAIT`] (at the rate of freed slots left
    /// to its priority) is shed at once ([`Waited::Displaced`]) rather than left to wait in
    /// vain. Not within [`admit_wait`]: the rate left to a priority already allows for the
    /// calls above it that keep arriving, so the usual push-back by one of them is what the
    /// margin between the two bounds is for; only a surprise (a burst of them) sheds.
    pub async fn wait(
        &self,
        place: &mut Place,
        priority: Priority,
        nodes: Vec<Arc<NodeConn>>,
        timeout: Duration,
        drain_per_sec: Option<f64>,
    ) -> Waited {
        if nodes.is_empty() {
            return Waited::QueueFull;
        }
        let (wake, woken) = oneshot::channel();
        {
            let mut inner = self.lock();
            // A call queuing again keeps its place even when the queue has filled meanwhile.
            if place.0.is_none() && inner.waiters.len() >= MAX_QUEUED_CALLS {
                // Full: the newest call of the lowest priority gives its place to a call of
                // higher priority, or this call is turned away.
                if inner.waiters.back().is_none_or(|w| w.priority >= priority) {
                    return Waited::QueueFull;
                }
                if let Some(shed) = inner.waiters.pop_back() {
                    count(&shed.nodes, shed.priority, false);
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    let _ = shed.wake.send(None);
                }
            }
            let ticket = *place.0.get_or_insert_with(|| {
                inner.next_ticket += 1;
                inner.next_ticket
            });
            let order = (std::cmp::Reverse(priority), ticket);
            let at = inner.waiters.partition_point(|w| w.order() < order);
            let nodes_of_call = nodes.clone();
            let nodes = nodes.clone();
            count(&nodes, priority, true);
            inner.waiters.insert(
                at,
                Waiter {
                    ticket,
                    priority,
                    nodes,
                    wake,
                },
            );
            self.waiting.fetch_add(1, Ordering::SeqCst);
            if let Some(rate) = drain_per_sec.filter(|r| *r > 0.0 && r.is_finite()) {
                self.shed_pushed_back(&mut inner, priority, &nodes_of_call, rate);
            }
        }
        let mut guard = Registered {
            queue: self,
            ticket: place.0.unwrap_or_default(),
            woken,
        };
        // A slot freed between the caller's failed pick and the registration above woke no
        // one (the queue looked empty to the call that freed it): look once more. The fence
        // pairs with the one in `slot_freed`: either that call sees this waiter, or this check
        // sees its slot.
        fence(Ordering::SeqCst);
        let now_ms = crate::endpoint::now_ns() / 1_000_000;
        if nodes.iter().any(|n| !n.is_full() && !n.is_out(now_ms)) {
            return Waited::Woken;
        }
        match tokio::time::timeout(timeout, &mut guard.woken).await {
            Ok(Ok(Some(_node))) => Waited::Woken,
            Ok(Ok(None)) => Waited::Displaced,
            // The sender is only dropped after a send or on removal by this call.
            Ok(Err(_)) | Err(_) => Waited::TimedOut,
        }
    }

    /// Sheds, newest first, the waiters below `priority` sharing a node with `nodes` that a
    /// call of `priority` just pushed back beyond [`MAX_QUEUE_WAIT`] of expected wait at
    /// `rate` slots a second (their priority's share of it).
    fn shed_pushed_back(
        &self,
        inner: &mut Inner,
        priority: Priority,
        nodes: &[Arc<NodeConn>],
        rate: f64,
    ) {
        inner.handoffs.decay_to(crate::endpoint::now_ns());
        // The waiters below `priority` are the back of the line (it is ordered by priority):
        // look only there, newest first, not through the whole queue on every join.
        while let Some(i) = inner
            .waiters
            .iter()
            .enumerate()
            .rev()
            .take_while(|(_, w)| w.priority < priority)
            .find(|(_, w)| {
                w.nodes
                    .iter()
                    .any(|n| nodes.iter().any(|m| Arc::ptr_eq(n, m)))
            })
            .map(|(i, _)| i)
        {
            let below = inner.waiters[i].priority;
            // The waiter and every call ahead of it, exact: counts change only under the lock.
            let in_line = self.waiting_for(nodes, below) as f64;
            let left = rate - inner.handoffs.rate_above(below);
            if left > 0.0 && in_line / left <= MAX_QUEUE_WAIT.as_secs_f64() {
                return;
            }
            if let Some(shed) = inner.waiters.remove(i) {
                count(&shed.nodes, shed.priority, false);
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                let _ = shed.wake.send(None);
            }
        }
    }

    /// A call on `node` ended and freed a slot: wakes the first waiter in line that can use it.
    pub fn slot_freed(&self, node: &Arc<NodeConn>) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut inner = self.lock();
        let mut i = 0;
        while i < inner.waiters.len() {
            if !inner.waiters[i].nodes.iter().any(|n| Arc::ptr_eq(n, node)) {
                i += 1;
                continue;
            }
            let Some(waiter) = inner.waiters.remove(i) else {
                break;
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            count(&waiter.nodes, waiter.priority, false);
            // A waiter whose call has gone is removed by it before its receiver drops, so a
            // failed send only happens in a race with that; try the next one.
            if waiter.wake.send(Some(node.clone())).is_ok() {
                let now = crate::endpoint::now_ns();
                inner.handoffs.record(waiter.priority, now);
                return;
            }
        }
    }

    /// Wakes every waiter (a new routing table may have raised limits or added nodes).
    pub fn wake_all(&self) {
        let mut inner = self.lock();
        for waiter in inner.waiters.drain(..) {
            count(&waiter.nodes, waiter.priority, false);
            if let Some(node) = waiter.nodes.first() {
                let _ = waiter.wake.send(Some(node.clone()));
            }
        }
        self.waiting.store(0, Ordering::SeqCst);
    }
}

/// Counts a waiter of `priority` in (`true`) or out of the waiting count of each node it can
/// use; called under the queue's lock, so a node's count is exact whenever the lock is free.
fn count(nodes: &[Arc<NodeConn>], priority: Priority, join: bool) {
    for n in nodes {
        let c = &n.waiting[priority.index()];
        if join {
            c.fetch_add(1, Ordering::Relaxed);
        } else {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A waiter's registration: removes it from the queue when its wait ends, and passes on a
/// wake-up it received but will not use.
struct Registered<'a> {
    queue: &'a WaitQueue,
    ticket: u64,
    woken: oneshot::Receiver<Option<Arc<NodeConn>>>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        {
            let mut inner = self.queue.lock();
            if let Some(at) = inner.waiters.iter().position(|w| w.ticket == self.ticket) {
                if let Some(waiter) = inner.waiters.remove(at) {
                    count(&waiter.nodes, waiter.priority, false);
                }
                self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // Woken, but the wait ended another way (timed out at the same moment, the call was
        // cancelled, or the re-check found a slot): the freed slot goes to the next in line.
        if let Ok(Some(node)) = self.woken.try_recv() {
            self.queue.slot_freed(&node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: Priority = Priority::Normal;

    fn node(id: &str, limit: u32, queue: &Arc<WaitQueue>) -> Arc<NodeConn> {
        Arc::new(NodeConn::new(id, "127.0.0.1:1", "a", limit, queue.clone()).unwrap())
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_oldest_waiter_that_can_use_it() {
        let queue = Arc::new(WaitQueue::default());
        let a = node("a", 1, &queue);
        let b = node("b", 1, &queue);
        let slot_a = a.try_start_call().unwrap();
        let slot_b = b.try_start_call().unwrap();
        let wait = Duration::from_secs(30);
        // The oldest waiter can only use b; the second can use a or b; the third only a.
        let q = queue.clone();
        let (bb, ab, aa) = (vec![b.clone()], vec![a.clone(), b.clone()], vec![a.clone()]);
        let first =
            tokio::spawn(async move { q.wait(&mut Place::default(), N, bb, wait, None).await });
        wait_len(&queue, 1).await;
        let q = queue.clone();
        let second =
            tokio::spawn(async move { q.wait(&mut Place::default(), N, ab, wait, None).await });
        wait_len(&queue, 2).await;
        let q = queue.clone();
        let third =
            tokio::spawn(async move { q.wait(&mut Place::default(), N, aa, wait, None).await });
        wait_len(&queue, 3).await;
        // a frees: the first waiter cannot use it, the second (oldest that can) gets it.
        // Competitors: two waiters can use a, two can use b; the three never all compete.
        let (just_a, just_b) = ([a.clone()], [b.clone()]);
        assert_eq!(queue.waiting_for(&just_a, N), 2);
        assert_eq!(queue.waiting_for(&just_b, N), 2);
        assert_eq!(queue.waiting_for(&[a.clone(), b.clone()], N), 2);
        drop(slot_a);
        assert_eq!(second.await.unwrap(), Waited::Woken);
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.waiting_for(&just_a, N), 1);
        assert_eq!(queue.waiting_for(&just_b, N), 1);
        assert!(!first.is_finished() && !third.is_finished());
        drop(slot_b);
        assert_eq!(first.await.unwrap(), Waited::Woken);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.waiting_for(&just_b, N), 0);
        assert!(!third.is_finished());
        queue.wake_all();
        assert_eq!(third.await.unwrap(), Waited::Woken);
        assert!(queue.is_empty());
        assert_eq!(queue.waiting_for(&just_a, N), 0);
    }

    #[tokio::test]
    async fn a_wait_finds_a_slot_freed_before_it_registered() {
        let queue = Arc::new(WaitQueue::default());
        let a = node("a", 1, &queue);
        // Not full: the re-check after registering returns at once, and leaves no waiter.
        let got = queue
            .wait(
                &mut Place::default(),
                N,
                vec![a.clone()],
                Duration::from_secs(30),
                None,
            )
            .await;
        assert_eq!(got, Waited::Woken);
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn waits_time_out_and_the_queue_is_bounded() {
        let queue = Arc::new(WaitQueue::default());
        let a = node("a", 1, &queue);
        let _slot = a.try_start_call().unwrap();
        let got = queue
            .wait(
                &mut Place::default(),
                N,
                vec![a.clone()],
                Duration::from_millis(10),
                None,
            )
            .await;
        assert_eq!(got, Waited::TimedOut);
        assert!(queue.is_empty());
        assert_eq!(
            queue.waiting_for(std::slice::from_ref(&a), N),
            0,
            "a timed-out call leaves the count"
        );
        let mut waiting = Vec::new();
        for _ in 0..MAX_QUEUED_CALLS {
            let (q, a) = (queue.clone(), a.clone());
            waiting.push(tokio::spawn(async move {
                q.wait(
                    &mut Place::default(),
                    N,
                    vec![a],
                    Duration::from_secs(60),
                    None,
                )
                .await
            }));
        }
        wait_len(&queue, MAX_QUEUED_CALLS).await;
        let got = queue
            .wait(
                &mut Place::default(),
                N,
                vec![a.clone()],
                Duration::from_secs(60),
                None,
            )
            .await;
        assert_eq!(got, Waited::QueueFull);
        // A call already in line keeps its place when it queues again.
        let mut place = Place(Some(0));
        let again = tokio::time::timeout(
            Duration::from_millis(1),
            queue.wait(
                &mut place,
                N,
                vec![a.clone()],
                Duration::from_secs(60),
                None,
            ),
        )
        .await;
        assert!(again.is_err(), "a call with a place must be let back in");
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test]
    async fn a_wake_up_not_used_is_passed_on() {
        let queue = Arc::new(WaitQueue::default());
        let a = node("a", 1, &queue);
        let slot = a.try_start_call().unwrap();
        let q = queue.clone();
        let aa = vec![a.clone()];
        // The first waiter is woken but its call is dropped before it runs again.
        let first = async move {
            q.wait(&mut Place::default(), N, aa, Duration::from_secs(30), None)
                .await
        };
        let mut first = Box::pin(first);
        assert!(futures::poll!(first.as_mut()).is_pending());
        let q = queue.clone();
        let aa = vec![a.clone()];
        let second = tokio::spawn(async move {
            q.wait(&mut Place::default(), N, aa, Duration::from_secs(30), None)
                .await
        });
        wait_len(&queue, 2).await;
        drop(slot);
        assert_eq!(queue.len(), 1, "one waiter woken");
        drop(first);
        assert_eq!(second.await.unwrap(), Waited::Woken);
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn slots_go_to_the_highest_priority_first_and_the_oldest_within_it() {
        let queue = Arc::new(WaitQueue::default());
        let a = node("a", 1, &queue);
        let slot = a.try_start_call().unwrap();
        let wait = Duration::from_secs(30);
        // Arrivals: sheddable, normal, critical, normal, critical.
        let arrivals = [
            Priority::Sheddable,
            Priority::Normal,
            Priority::Critical,
            Priority::Normal,
            Priority::Critical,
        ];
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (i, p) in arrivals.into_iter().enumerate() {
            let (q, nodes, done) = (queue.clone(), vec![a.clone()], done.clone());
            tasks.push(tokio::spawn(async move {
                let got = q.wait(&mut Place::default(), p, nodes, wait, None).await;
                done.send((i, got)).unwrap();
            }));
            wait_len(&queue, i + 1).await;
        }
        // Ahead of a call of each priority: the calls at it or above.
        let just_a = [a.clone()];
        assert_eq!(queue.waiting_for(&just_a, Priority::Critical), 2);
        assert_eq!(queue.waiting_for(&just_a, Priority::Normal), 4);
        assert_eq!(queue.waiting_for(&just_a, Priority::Sheddable), 5);
        // Each freed slot wakes the next in line: critical (oldest first), normal, sheddable.
        drop(slot);
        let mut served = Vec::new();
        for _ in 0..arrivals.len() {
            let (i, got) = order.recv().await.unwrap();
            assert_eq!(got, Waited::Woken);
            served.push(i);
            // The woken call takes the slot and gives it back at once.
            drop(a.try_start_call().expect("the freed slot is free"));
        }
        assert_eq!(served, [2, 4, 1, 3, 0]);
        assert!(queue.is_empty());
        assert_eq!(queue.waiting_for(&just_a, Priority::Sheddable), 0);
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_full_queue_sheds_its_newest_lowest_call_for_a_higher_one() {
        let queue = Arc::new(WaitQueue::default());
        let a = node("a", 1, &queue);
        let _slot = a.try_start_call().unwrap();
        let wait = Duration::from_secs(60);
        let spawn = |p: Priority| {
            let (q, nodes) = (queue.clone(), vec![a.clone()]);
            tokio::spawn(async move { q.wait(&mut Place::default(), p, nodes, wait, None).await })
        };
        // Full: one sheddable call (the oldest), the rest normal.
        let oldest_sheddable = spawn(Priority::Sheddable);
        wait_len(&queue, 1).await;
        let mut normal = Vec::new();
        for _ in 1..MAX_QUEUED_CALLS {
            normal.push(spawn(Priority::Normal));
        }
        wait_len(&queue, MAX_QUEUED_CALLS).await;
        // Nothing below a sheddable call, nor below a normal one but sheddable ones: turned away.
        let got = queue
            .wait(
                &mut Place::default(),
                Priority::Sheddable,
                vec![a.clone()],
                wait,
                None,
            )
            .await;
        assert_eq!(got, Waited::QueueFull);
        // A critical call takes the sheddable call's place; the sheddable call learns it.
        let critical = spawn(Priority::Critical);
        assert_eq!(oldest_sheddable.await.unwrap(), Waited::Displaced);
        wait_len(&queue, MAX_QUEUED_CALLS).await;
        assert_eq!(
            queue.waiting_for(std::slice::from_ref(&a), Priority::Critical),
            1
        );
        assert_eq!(
            queue.waiting_for(std::slice::from_ref(&a), Priority::Sheddable),
            MAX_QUEUED_CALLS
        );
        // Now the queue holds nothing below normal: a normal call is turned away.
        let got = queue
            .wait(
                &mut Place::default(),
                Priority::Normal,
                vec![a.clone()],
                wait,
                None,
            )
            .await;
        assert_eq!(got, Waited::QueueFull);
        // The next critical call takes the place of the newest normal call.
        let second_critical = spawn(Priority::Critical);
        let newest_normal = normal.pop().unwrap();
        assert_eq!(newest_normal.await.unwrap(), Waited::Displaced);
        wait_len(&queue, MAX_QUEUED_CALLS).await;
        assert_eq!(
            queue.waiting_for(std::slice::from_ref(&a), Priority::Critical),
            2
        );
        assert!(normal.iter().all(|t| !t.is_finished()));
        // And the critical calls are served first.
        queue.slot_freed(&a);
        assert_eq!(critical.await.unwrap(), Waited::Woken);
        queue.slot_freed(&a);
        assert_eq!(second_critical.await.unwrap(), Waited::Woken);
        assert!(normal.iter().all(|t| !t.is_finished()));
        for t in normal {
            t.abort();
        }
    }

    #[tokio::test]
    async fn a_call_pushed_back_past_the_bound_is_shed_at_once() {
        let queue = Arc::new(WaitQueue::default());
        let a = node("a", 1, &queue);
        let _slot = a.try_start_call().unwrap();
        let wait = Duration::from_secs(60);
        // 10 slots a second: half a second of waiting (MAX_QUEUE_WAIT) is 5 calls in line.
        let rate = Some(10.0);
        let spawn = |p: Priority| {
            let (q, nodes) = (queue.clone(), vec![a.clone()]);
            tokio::spawn(async move { q.wait(&mut Place::default(), p, nodes, wait, rate).await })
        };
        let mut sheddable = Vec::new();
        for i in 0..5 {
            sheddable.push(spawn(Priority::Sheddable));
            wait_len(&queue, i + 1).await;
        }
        // A call of the same priority joins behind them and pushes no one back.
        let sixth = spawn(Priority::Sheddable);
        wait_len(&queue, 6).await;
        assert!(sheddable.iter().all(|t| !t.is_finished()));
        // A critical call goes ahead of all six: the newest two no longer fit in half a second.
        let critical = spawn(Priority::Critical);
        assert_eq!(sixth.await.unwrap(), Waited::Displaced);
        let fifth = sheddable.pop().unwrap();
        assert_eq!(fifth.await.unwrap(), Waited::Displaced);
        wait_len(&queue, 5).await;
        assert!(sheddable.iter().all(|t| !t.is_finished()));
        // Without a known drain rate, nothing is pushed out.
        let q = queue.clone();
        let nodes = vec![a.clone()];
        let blind = tokio::spawn(async move {
            q.wait(&mut Place::default(), Priority::Critical, nodes, wait, None)
                .await
        });
        wait_len(&queue, 6).await;
        assert!(sheddable.iter().all(|t| !t.is_finished()));
        queue.slot_freed(&a);
        assert_eq!(critical.await.unwrap(), Waited::Woken);
        for t in sheddable {
            t.abort();
        }
        blind.abort();
    }

    #[test]
    fn calls_can_count_only_on_the_slots_higher_ones_leave_them() {
        let mut h = Handoffs::default();
        for p in Priority::ALL {
            assert_eq!(h.rate_above(p), 0.0, "no hand-offs yet");
        }
        // Five seconds of hand-offs at 100 a second: 60 % critical, 30 % normal, 10 %
        // sheddable.
        for i in 0..500u64 {
            let p = match i % 10 {
                0..=5 => Priority::Critical,
                6..=8 => Priority::Normal,
                _ => Priority::Sheddable,
            };
            h.record(p, 1_000_000_000 + i * 10_000_000);
        }
        assert_eq!(h.rate_above(Priority::Critical), 0.0);
        let above_normal = h.rate_above(Priority::Normal);
        let above_sheddable = h.rate_above(Priority::Sheddable);
        assert!((above_normal - 60.0).abs() < 3.0, "{above_normal}");
        assert!((above_sheddable - 90.0).abs() < 4.0, "{above_sheddable}");
        // Critical calls stop queueing: within seconds the others count on every slot again,
        // whether or not any hand-off happens meanwhile.
        h.decay_to(15_000_000_000);
        assert!(h.rate_above(Priority::Sheddable) < 0.1);
        let queue = WaitQueue::default();
        assert_eq!(queue.rate_left_for(Priority::Sheddable, 150.0), 150.0);
    }

    #[test]
    fn the_drain_rate_is_little_s_law_over_the_nodes() {
        // Two nodes, 6 calls each, 20 ms: 600 slots a second.
        let r = drain_rate([(6, 20.0), (6, 20.0)]).unwrap();
        assert!((r - 600.0).abs() < 1e-9, "{r}");
        // A hung node (a minute's estimate) adds next to nothing; a slow one its share.
        let hung = drain_rate([(6, 20.0), (6, 20.0), (6, 60_000.0)]).unwrap();
        assert!(hung < 600.2, "{hung}");
        let slow = drain_rate([(6, 20.0), (6, 20.0), (6, 60.0)]).unwrap();
        assert!((slow - 700.0).abs() < 1e-9, "{slow}");
        // Nothing in flight, or nonsense estimates: unknown.
        assert_eq!(drain_rate([(0, 20.0)]), None);
        assert_eq!(drain_rate([(4, f64::NAN), (4, 0.0), (4, -1.0)]), None);
        assert_eq!(drain_rate([]), None);
    }

    async fn wait_len(queue: &WaitQueue, n: usize) {
        for _ in 0..10_000 {
            if queue.len() == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("queue never reached {n} waiters (has {})", queue.len());
    }
}
