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

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

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
    /// single-threaded runtime of its own until it returns or the shard is dropped.
    pub(crate) fn start<F, Fut>(index: usize, count: usize, serve: F) -> std::io::Result<Self>
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
