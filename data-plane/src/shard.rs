//! The router's serving threads: one single-threaded tokio runtime per thread ("shard"), each
//! serving the client connections handed to it and holding its own connection to each node.
//!
//! A call to the router then runs start to finish on one thread: its client connection, its
//! handler, and the connection to the node it is forwarded to are all tasks of the same
//! runtime, so no thread wakes another along the way. On a work-stealing runtime the same call
//! crossed threads several times (a handler woke the connection task another worker polled, an
//! idle worker was woken to steal), each crossing a futex wake-up that costs tens of
//! microseconds on a virtual machine. This is how nginx and Envoy run too (a worker per core,
//! connections pinned to a worker, upstream pools per worker).
//!
//! Connections are dealt out round-robin as they are accepted (see `server.rs`); state shared
//! between shards (the routing table, in-flight counts, latency estimates) is lock-free.
//!
//! Opt-in busy polling (`RouterConfig::busy_poll`, `fulcrum router --busy-poll`): a serving
//! thread keeps polling its sockets for a while after each call instead of sleeping, so the
//! bytes of the next request or of the node's answer find it awake (see [`busy_poll`] for why
//! and what it costs).

use std::cell::Cell;
use std::future::Future;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

/// How often a serving thread's timer wakes it, whether or not anything else is due.
///
/// Why a thread wakes for nothing: a call arms timers (its deadline, its attempt's), and tokio
/// wakes its own thread through an `eventfd` write for every timer armed earlier than the
/// earliest one it knew of when it last went to sleep (it must recompute how long to sleep);
/// with no other timer pending that was every timer of every call — three `write` system calls
/// per call, and one more turn of the event loop, before the call was sent to its node (seen
/// with strace). With this timer pending, every timer later than it is armed without waking
/// anything. One second is shorter than the deadlines calls have (five seconds by default),
/// and a wake-up a second per thread costs nothing measurable.
const TICK: Duration = Duration::from_secs(1);

thread_local! {
    /// On a serving thread: its index and the number of serving threads of its router.
    static CURRENT: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
    /// On a serving thread: whether a call started or ended since the busy poller last looked.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    /// On a serving thread: the busy poller, while it waits for the next call.
    static POLLER: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// Marks the calling serving thread busy: a call started or was answered on it. A thread that
/// busy-polls (`RouterConfig::busy_poll`) keeps polling its sockets for that long after the
/// last mark. Costs a thread-local store when nothing waits on it.
pub(crate) fn mark_busy() {
    BUSY.with(|b| b.set(true));
    if let Some(w) = POLLER.with(Cell::take) {
        w.wake();
    }
}

/// The busy poller of a serving thread: from a call's start or answer until `window` has gone
/// by with neither, it yields to the runtime again and again, so the thread polls its sockets
/// (`epoll_wait` with no timeout) rather than going to sleep; then it waits for the next mark.
///
/// Why: on a virtual machine, waking a thread that sleeps costs tens of microseconds when the
/// wake-up crosses CPUs (an inter-processor interrupt to a halted virtual CPU and a VM exit),
/// and a call through the router pays two (the client's request, the node's answer). A thread
/// that is polling is not woken: the bytes are simply there at its next poll. On the
/// benchmark machine (2 vCPUs, guest halt-polling off) a 200 µs window cut the router's added
/// p50 from about 100 µs to about 36 µs for sequential calls, and roughly halved it at 1,000
/// and 5,000 calls/s (`bench/README.md`).
///
/// Each turn also gives the CPU up to the kernel (`sched_yield`): a process woken onto this
/// CPU (the node's server, the client) then runs at once rather than waiting for the
/// scheduler to preempt a thread that never sleeps. Without it, polling made calls *slower*
/// at 1,000 calls/s on two CPUs shared with the client and the node.
///
/// The price is CPU: a thread polls all through a call and `window` after it, so at low rates
/// it uses a core's share it would not have (about one core for back-to-back sequential
/// calls, where the router alone used a third of one). Other tasks of the thread run first:
/// the poller only yields.
async fn busy_poll(window: Duration) {
    loop {
        std::future::poll_fn(|cx| {
            if BUSY.with(|b| b.replace(false)) {
                Poll::Ready(())
            } else {
                POLLER.with(|p| p.set(Some(cx.waker().clone())));
                Poll::Pending
            }
        })
        .await;
        let mut last = Instant::now();
        loop {
            tokio::task::yield_now().await;
            std::thread::yield_now();
            if BUSY.with(|b| b.replace(false)) {
                last = Instant::now();
            } else if last.elapsed() >= window {
                break;
            }
        }
    }
}

/// The calling thread's shard index and the shard count, if it is a serving thread.
pub fn current() -> Option<(usize, usize)> {
    CURRENT.with(Cell::get)
}

/// Serving threads to start when the configuration says 0: one per core this process may run
/// on (its CPU affinity and quota), so a router pinned to one core runs one.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// A running serving thread.
#[derive(Debug)]
pub(crate) struct Shard {
    /// Accepted client connections for this shard to serve.
    conns: mpsc::UnboundedSender<std::net::TcpStream>,
    /// Sent (or dropped) to begin a graceful stop.
    stop: Option<oneshot::Sender<()>>,
    /// Dropped to stop at once, cutting calls in flight.
    _kill: oneshot::Sender<()>,
    /// The thread's server result.
    done: Option<oneshot::Receiver<Result<(), tonic::transport::Error>>>,
}

impl Shard {
    /// Starts serving thread `index` of `count`, running `serve(connections, stop)` on a
    /// single-threaded runtime of its own until it returns or the shard is dropped; with a
    /// `busy_poll` window, the thread polls its sockets that long after each call rather than
    /// sleeping (see [`busy_poll`]).
    pub(crate) fn start<F, Fut>(
        index: usize,
        count: usize,
        busy_poll: Duration,
        serve: F,
    ) -> std::io::Result<Self>
    where
        F: FnOnce(mpsc::UnboundedReceiver<std::net::TcpStream>, oneshot::Receiver<()>) -> Fut
            + Send
            + 'static,
        Fut: Future<Output = Result<(), tonic::transport::Error>>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (conns, conns_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let (kill, kill_rx) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("fulcrum-router-{index}"))
            .spawn(move || {
                CURRENT.with(|c| c.set(Some((index, count))));
                let result = runtime.block_on(async move {
                    tokio::spawn(async {
                        let mut tick = tokio::time::interval(TICK);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tick.tick().await;
                        }
                    });
                    if !busy_poll.is_zero() {
                        tokio::spawn(self::busy_poll(busy_poll));
                    }
                    tokio::select! {
                        r = serve(conns_rx, stop_rx) => r,
                        _ = kill_rx => Ok(()),
                    }
                });
                // Dropping the runtime here ends the shard's connections and tasks.
                drop(runtime);
                let _ = done_tx.send(result);
            })?;
        Ok(Self {
            conns,
            stop: Some(stop),
            _kill: kill,
            done: Some(done),
        })
    }

    /// Hands an accepted connection to the shard; gives it back if the shard has stopped.
    pub(crate) fn serve(&self, conn: std::net::TcpStream) -> Result<(), std::net::TcpStream> {
        self.conns.send(conn).map_err(|e| e.0)
    }

    /// Begins a graceful stop: no new connections, calls in flight finish.
    pub(crate) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until the shard's server has returned.
    pub(crate) async fn finished(&mut self) -> Result<(), tonic::transport::Error> {
        match self.done.take() {
            Some(done) => done.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU time the calling thread has used, in clock ticks (Linux: `/proc/thread-self/stat`).
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("read own stat");
        // Fields after the command name (which is in parentheses and may hold spaces): state
        // is the first, utime the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// The poller spins while calls keep marking the thread busy and sleeps once `window` has
    /// gone by without one: CPU use over 400 ms of each, with wide margins (a spinning thread
    /// uses up to 40 ticks, a sleeping one none; the bars allow a machine shared with other
    /// tests).
    #[test]
    fn the_busy_poller_spins_only_while_calls_come() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (idle, busy, after) = runtime.block_on(async {
            tokio::spawn(busy_poll(Duration::from_millis(20)));
            let span = Duration::from_millis(400);
            let t0 = thread_cpu_ticks();
            tokio::time::sleep(span).await;
            let idle = thread_cpu_ticks() - t0;
            let t0 = thread_cpu_ticks();
            let end = Instant::now() + span;
            while Instant::now() < end {
                mark_busy();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let busy = thread_cpu_ticks() - t0;
            // Past the window, then quiet again.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t0 = thread_cpu_ticks();
            tokio::time::sleep(span).await;
            (idle, busy, thread_cpu_ticks() - t0)
        });
        assert!(idle <= 3, "the poller used {idle} ticks with no calls");
        assert!(
            busy >= 8,
            "the poller used only {busy} ticks while calls came"
        );
        assert!(
            after <= 3,
            "the poller used {after} ticks after the calls stopped"
        );
    }
}
