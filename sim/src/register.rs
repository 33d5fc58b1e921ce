//! Self-registration of a simulated node (`fulcrum node-sim --register CONTROL`): the node puts
//! itself in the control plane's registry and reports its load, as a real server's sidecar
//! would.
//!
//! A [`Registrar`] opens `fulcrum.v1.Registration/Register` on a control-plane replica, sends
//! the node's spec, then a `NodeReport` every [`REPORT_INTERVAL`] from the node's counters (calls
//! in flight, calls queued, slots in use). The control plane keeps the node registered while the
//! stream lives and the reports come. When the stream breaks (the replica died or shut down, the
//! network failed), the registrar registers again, with the next replica of its list, after a
//! jittered exponential backoff.
//!
//! [`Registrar::stop`] says goodbye: the node closes its side of the stream and the control plane
//! removes it at once. Dropping the registrar, or aborting it, is a crash: the stream breaks
//! without goodbye.

use std::collections::HashMap;
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::registration_client::RegistrationClient;
use fulcrum_proto::fulcrum::v1::{NodeMessage, NodeReport, NodeSpec, node_message};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Endpoint;

use crate::node::SimControls;

/// Time between two load reports. Routers report their view every half second too, so the two
/// views age alike; it is also well under a third of the control plane's lease TTL (5 s by
/// default), since the reports are the node's heartbeat.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// First pause before registering again after a failure: short, because a broken stream usually
/// means a replica went away and another one is ready.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between two attempts: a node refused (its id taken) or without a reachable
/// control plane tries every few seconds without hammering it.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Connect timeout: control-plane replicas are in the same or the other data center, a
/// connection takes milliseconds; two seconds rides out a lost SYN.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the control plane may take to answer the registration (a few store reads and
/// writes, which etcd does in milliseconds; its own store timeout is three seconds).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings on the registration connection, so that a control plane that vanished without
/// closing it (host down, partition) is noticed in seconds and the node registers elsewhere
/// before its lease runs out.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a goodbye waits for the control plane to confirm (it revokes one lease).
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reports queued for sending: if the connection cannot take them, newer ones replace them
/// (a report is dropped, never delayed).
const REPORT_BUFFER: usize = 2;

/// Where and as what a node registers.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterConfig {
    /// Control-plane replicas (`host:port`), tried in turn.
    pub control: Vec<String>,
    /// What the node registers as.
    pub spec: NodeSpec,
    /// Time between two load reports.
    pub report_interval: Duration,
    /// The control plane's stream token, sent as `authorization: Bearer <token>` (none: the
    /// control plane must trust the node's address, loopback). A refused token
    /// (UNAUTHENTICATED) is retried like a broken stream: the control plane's token may be
    /// about to change.
    pub token: Option<String>,
}

impl RegisterConfig {
    /// Registers `spec` with the replicas `control`, reporting every [`REPORT_INTERVAL`].
    pub fn new(control: Vec<String>, spec: NodeSpec) -> Self {
        Self {
            control,
            spec,
            report_interval: REPORT_INTERVAL,
            token: None,
        }
    }
}

/// Where a registrar stands.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistrationState {
    /// Not registered, yet or any more: connecting, or waiting to try again after `last_error`.
    Connecting {
        /// Why the last attempt failed or the last registration ended.
        last_error: Option<String>,
    },
    /// Registered through the replica at `control`.
    Registered {
        /// The replica holding the registration.
        control: String,
        /// Store revision of the registration.
        revision: u64,
        /// The lease TTL the control plane granted.
        lease_ttl: Duration,
    },
    /// Refused for good (the spec is invalid): the registrar has stopped.
    Refused(String),
    /// Stopped after a goodbye.
    Stopped,
}

/// Why a registrar stopped on its own.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegisterError {
    /// No control-plane address was given.
    #[error("no control-plane address to register with")]
    NoControl,
    /// The control plane refused the spec; registering again would not help.
    #[error("the control plane refused the registration: {0}")]
    Refused(String),
    /// The registrar's task failed.
    #[error("the registration task failed: {0}")]
    Task(String),
}

/// A node registering itself and reporting its load, on a tokio task. Dropping it aborts the
/// task: to the control plane, a crash.
#[derive(Debug)]
pub struct Registrar {
    state: watch::Receiver<RegistrationState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RegisterError>>>,
}

impl Registrar {
    /// Starts registering `config.spec`, reporting the load of the node `controls` belongs to.
    pub fn spawn(config: RegisterConfig, controls: SimControls) -> Self {
        let (state_tx, state) = watch::channel(RegistrationState::Connecting { last_error: None });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(config, controls, state_tx, stopped));
        Self {
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Where the registration stands now.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// A receiver of every state change.
    pub fn watch(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Waits until the registrar stops on its own: only when the control plane refuses the spec
    /// for good (it otherwise keeps registering again until stopped).
    pub async fn wait(&mut self) -> Result<(), RegisterError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let result = task.await;
        self.task = None;
        result.unwrap_or_else(|e| Err(RegisterError::Task(e.to_string())))
    }

    /// Says goodbye (the control plane removes the node at once) and waits for the task to end.
    pub async fn stop(mut self) -> Result<(), RegisterError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait().await
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How one registration attempt ended.
enum Session {
    /// Stopped with a goodbye.
    Stopped,
    /// Refused, or the stream broke; `registered` if it had been accepted.
    Ended {
        status: tonic::Status,
        registered: bool,
    },
}

async fn run(
    config: RegisterConfig,
    controls: SimControls,
    state: watch::Sender<RegistrationState>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), RegisterError> {
    if config.control.is_empty() {
        return Err(RegisterError::NoControl);
    }
    let mut backoff = INITIAL_BACKOFF;
    for control in config.control.iter().cycle() {
        let (status, registered) =
            match session(control, &config, &controls, &state, &mut stop).await {
                Session::Stopped => {
                    state.send_replace(RegistrationState::Stopped);
                    return Ok(());
                }
                Session::Ended { status, registered } => (status, registered),
            };
        let why = format!("{control}: {:?}: {}", status.code(), status.message());
        if !registered && status.code() == Code::InvalidArgument {
            tracing::error!(node = %config.spec.id, error = %why, "registration refused");
            state.send_replace(RegistrationState::Refused(why.clone()));
            return Err(RegisterError::Refused(why));
        }
        if registered {
            tracing::warn!(node = %config.spec.id, error = %why, "registration ended; registering again");
            backoff = INITIAL_BACKOFF;
        } else {
            tracing::warn!(node = %config.spec.id, error = %why, "cannot register; trying again");
        }
        state.send_replace(RegistrationState::Connecting {
            last_error: Some(why),
        });
        // Full jitter between half the backoff and all of it, so that the nodes of a dead
        // replica do not all come back at once.
        let pause = rand::rng().random_range(backoff / 2..=backoff);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = &mut stop => {
                state.send_replace(RegistrationState::Stopped);
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Ok(())
}

/// The node's report now.
fn report(controls: &SimControls) -> NodeMessage {
    let load = controls.load();
    let metrics = HashMap::from([
        ("busy_slots".to_owned(), load.busy_slots as f64),
        ("calls_total".to_owned(), controls.calls() as f64),
    ]);
    NodeMessage {
        message: Some(node_message::Message::Report(NodeReport {
            in_flight: u32::try_from(controls.in_flight()).unwrap_or(u32::MAX),
            queue_depth: u32::try_from(load.queued).unwrap_or(u32::MAX),
            utilization: load.utilization(),
            metrics,
        })),
    }
}

/// One registration: connect, register, report until the stream ends or the registrar stops.
async fn session(
    control: &str,
    config: &RegisterConfig,
    controls: &SimControls,
    state: &watch::Sender<RegistrationState>,
    stop: &mut oneshot::Receiver<()>,
) -> Session {
    let ended = |status: tonic::Status, registered| Session::Ended { status, registered };
    let endpoint = match Endpoint::from_shared(format!("http://{control}")) {
        Ok(e) => e
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true),
        Err(e) => {
            return ended(
                tonic::Status::invalid_argument(format!("bad control-plane address: {e}")),
                false,
            );
        }
    };
    let (tx, rx) = mpsc::channel(REPORT_BUFFER);
    let spec = NodeMessage {
        message: Some(node_message::Message::Spec(config.spec.clone())),
    };
    // The channel is new and has room.
    let _ = tx.try_send(spec);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &config.token {
        match format!("Bearer {token}").parse() {
            Ok(value) => {
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => {
                return ended(
                    tonic::Status::invalid_argument(
                        "the stream token is not a valid header value (visible ASCII only)",
                    ),
                    false,
                );
            }
        }
    }
    let open = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
        let mut inbound = RegistrationClient::new(channel)
            .register(request)
            .await?
            .into_inner();
        let accepted = inbound.message().await?.ok_or_else(|| {
            tonic::Status::unavailable("the control plane closed the stream without an answer")
        })?;
        Ok::<_, tonic::Status>((inbound, accepted))
    };
    let (mut inbound, accepted) = tokio::select! {
        opened = tokio::time::timeout(REGISTER_TIMEOUT, open) => match opened {
            Ok(Ok(o)) => o,
            Ok(Err(status)) => return ended(status, false),
            Err(_) => {
                return ended(tonic::Status::deadline_exceeded("no answer to the registration"), false);
            }
        },
        // Whatever was under way is dropped: the control plane sees the stream break.
        _ = &mut *stop => return Session::Stopped,
    };
    if !accepted.accepted {
        return ended(tonic::Status::unknown("registration not accepted"), false);
    }
    tracing::info!(node = %config.spec.id, %control, revision = accepted.revision,
        lease_ttl_s = accepted.lease_ttl_seconds, "registered");
    state.send_replace(RegistrationState::Registered {
        control: control.to_owned(),
        revision: accepted.revision,
        lease_ttl: Duration::from_secs(accepted.lease_ttl_seconds.into()),
    });
    let mut ticker = tokio::time::interval(config.report_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => match tx.try_send(report(controls)) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return ended(tonic::Status::unavailable("the registration stream closed"), true);
                }
            },
            message = inbound.message() => match message {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return ended(
                        tonic::Status::unavailable("the control plane ended the registration"),
                        true,
                    );
                }
                Err(status) => return ended(status, true),
            },
            _ = &mut *stop => {
                // Goodbye: close our side, and give the control plane a moment to confirm.
                drop(tx);
                let confirmed = tokio::time::timeout(GOODBYE_TIMEOUT, async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                if confirmed.is_err() {
                    tracing::warn!(node = %config.spec.id, "the control plane did not confirm the goodbye");
                }
                return Session::Stopped;
            }
        }
    }
}
