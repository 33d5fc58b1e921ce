//! `fulcrum.v1.Tasks`: `ModelInfer` calls made in the background ([`crate::tasks`] keeps them).
//!
//! `SubmitTask` checks what `ModelInfer` would refuse at once (a malformed request, a model the
//! caller's token does not list, a model no node serves, a `fulcrum-priority` that is not one)
//! and refuses it the same way, starting nothing; otherwise it starts the call as
//! [`super::infer::model_infer`] makes any `ModelInfer` call, with the submitting call's request
//! headers (priority, the keys of rate limits, caches and canaries), and answers the task at
//! once. The submitting call's own deadline does not bound the task: `timeout_ms` does, else
//! the model's timeout.
//!
//! The call runs on the serving thread that took the submission, like the calls of its
//! connection; `CancelTask` and `DeleteTask` stop it from any thread (its node call is reset).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_proto::fulcrum::v1::tasks_client::TasksClient;
use fulcrum_proto::fulcrum::v1::tasks_server::{Tasks, TasksServer};
use fulcrum_proto::fulcrum::v1::{
    DeleteTaskResponse, GetTaskRequest, SubmitTaskRequest, Task as TaskMessage, TaskRef, task,
};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::deadline;
use super::infer::{self, RawInferRequest};
use crate::auth::Caller;
use crate::error::{PeerError, RouteError, TaskError};
use crate::peers::Peers;
use crate::priority::Priority;
use crate::router::RouterState;
use crate::tasks::{MAX_TIMEOUT, Outcome, Task};
use crate::validate;

/// How long `GetTask` with `wait` holds a call that brings no deadline: shorter than the idle
/// timeouts of the load balancers and proxies commonly between a caller and a router (30 s and
/// up), so the long poll answers before one of them cuts it.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);

/// The `fulcrum.v1.Tasks` service of a router.
#[derive(Debug, Clone)]
pub struct TaskService {
    state: Arc<RouterState>,
}

impl TaskService {
    /// The service, as a tonic server, for the router with `state`.
    pub fn server(state: Arc<RouterState>) -> TasksServer<Self> {
        let limit = state.max_message_size;
        // Answers carry a model's answer: as large as `ModelInfer`'s may be.
        TasksServer::new(Self { state })
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

/// The caller's identity, when the router checks tokens: tasks belong to their submitter.
fn owner(extensions: &http::Extensions) -> Option<String> {
    extensions
        .get::<Arc<Caller>>()
        .map(|c| String::from_utf8_lossy(c.id.as_bytes()).into_owned())
}

#[tonic::async_trait]
impl Tasks for TaskService {
    async fn submit_task(
        &self,
        request: Request<SubmitTaskRequest>,
    ) -> Result<Response<TaskMessage>, Status> {
        let (mut metadata, extensions, submit) = request.into_parts();
        let message = submit.request.ok_or(TaskError::MissingRequest)?;
        let timeout = Duration::from_millis(submit.timeout_ms);
        if timeout > MAX_TIMEOUT {
            return Err(TaskError::BadTimeout(submit.timeout_ms).into());
        }
        // What `ModelInfer` would refuse at once is refused now, before a task exists.
        validate::check_infer_request(&message).map_err(RouteError::InvalidRequest)?;
        self.state.check_model(&extensions, &message.model_name)?;
        {
            let table = self.state.table.load();
            let route = table
                .models
                .get(&message.model_name)
                .ok_or_else(|| RouteError::UnknownModel(message.model_name.clone()))?;
            Priority::of(metadata.as_ref(), route.settings.priority)?;
        }
        let bytes = Bytes::from(message.encode_to_vec());
        let task =
            self.state
                .tasks
                .admit(&message.model_name, owner(&extensions), bytes.len() as u64)?;
        // The task's deadline is its own, not the submitting call's.
        set_deadline(&mut metadata, timeout);
        let call = Request::from_parts(metadata, extensions, RawInferRequest { bytes, message });
        let (state, running) = (self.state.clone(), task.clone());
        let handle = tokio::spawn(async move {
            let result = infer::model_infer(&state, call).await;
            let (outcome, headers) = Outcome::of(result);
            state.tasks.end(&running, outcome, headers);
        });
        task.set_abort(handle.abort_handle());
        tracing::debug!(task = %task.id, model = %task.model, "task submitted");
        Ok(Response::new(to_message(&task)))
    }

    async fn get_task(
        &self,
        request: Request<GetTaskRequest>,
    ) -> Result<Response<TaskMessage>, Status> {
        if let Some(peer) = self.holder(&request, &request.get_ref().task_id).await? {
            return peer.answer(peer.client().get_task(peer.request(&request)).await);
        }
        let owner = owner(request.extensions());
        let wait = request
            .get_ref()
            .wait
            .then(|| deadline::budget(request.metadata(), DEFAULT_WAIT));
        let task = self
            .state
            .tasks
            .get(&request.get_ref().task_id, owner.as_deref())?;
        if let Some(budget) = wait {
            // Not ended by then: answered as it is, RUNNING (a long poll's "not yet").
            let _ = tokio::time::timeout(budget, task.wait()).await;
        }
        Ok(Response::new(to_message(&task)))
    }

    async fn cancel_task(
        &self,
        request: Request<TaskRef>,
    ) -> Result<Response<TaskMessage>, Status> {
        if let Some(peer) = self.holder(&request, &request.get_ref().task_id).await? {
            return peer.answer(peer.client().cancel_task(peer.request(&request)).await);
        }
        let owner = owner(request.extensions());
        let task = self
            .state
            .tasks
            .cancel(&request.get_ref().task_id, owner.as_deref())?;
        Ok(Response::new(to_message(&task)))
    }

    async fn delete_task(
        &self,
        request: Request<TaskRef>,
    ) -> Result<Response<DeleteTaskResponse>, Status> {
        if let Some(peer) = self.holder(&request, &request.get_ref().task_id).await? {
            return peer.answer(peer.client().delete_task(peer.request(&request)).await);
        }
        let owner = owner(request.extensions());
        self.state
            .tasks
            .delete(&request.get_ref().task_id, owner.as_deref())?;
        Ok(Response::new(DeleteTaskResponse {}))
    }
}

/// The request header naming the router that passed a call on to the router holding its task:
/// a router that gets such a call answers it itself, so calls never go round in circles.
pub const FORWARDED_HEADER: &str = "x-fulcrum-forwarded-by";

/// The router holding a task, and how to reach it.
struct Holder {
    id: String,
    address: String,
    channel: Channel,
    peers: Arc<Peers>,
    this: String,
}

impl TaskService {
    /// The router holding task `id`, when it is another router and this call may be passed on
    /// to it (not itself passed on already: that one is answered here, NOT_FOUND).
    async fn holder<T>(&self, request: &Request<T>, id: &str) -> Result<Option<Holder>, Status> {
        let Some(peers) = &self.state.peers else {
            return Ok(None);
        };
        let Some(holder) = self.state.tasks.holder_elsewhere(id) else {
            return Ok(None);
        };
        if request.metadata().contains_key(FORWARDED_HEADER) {
            return Ok(None);
        }
        let (address, channel) = peers.channel(holder).await?;
        Ok(Some(Holder {
            id: holder.to_owned(),
            address,
            channel,
            peers: peers.clone(),
            this: self.state.tasks.router_id().to_owned(),
        }))
    }
}

impl Holder {
    fn client(&self) -> TasksClient<Channel> {
        // As large as a router's answers may be: the holder bounds them.
        TasksClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// The caller's `original` request as this router passes it on: with the caller's token
    /// (the holder checks it, and that the task is its caller's), its deadline, and this
    /// router's id.
    fn request<M: Clone>(&self, original: &Request<M>) -> Request<M> {
        let mut forwarded = Request::new(original.get_ref().clone());
        let headers = forwarded.metadata_mut().as_mut();
        let from = original.metadata().as_ref();
        // The token this router verified (it took it off the call), else whatever the caller
        // sent, for a holder that checks tokens when this router does not.
        let bearer = match original.extensions().get::<Arc<Caller>>() {
            Some(caller) => Some(caller.bearer.clone()),
            None => from.get(http::header::AUTHORIZATION).cloned(),
        };
        if let Some(b) = bearer {
            headers.insert(http::header::AUTHORIZATION, b);
        }
        if let Some(v) = from.get(fulcrum_grpc_h2::timeout::GRPC_TIMEOUT) {
            headers.insert(fulcrum_grpc_h2::timeout::GRPC_TIMEOUT, v.clone());
        }
        if let Ok(v) = http::HeaderValue::from_str(&self.this) {
            headers.insert(http::HeaderName::from_static(FORWARDED_HEADER), v);
        }
        forwarded
    }

    /// The holder's answer, as the caller gets it: its own status passed on as it is; a call
    /// that did not reach it, UNAVAILABLE saying so (and its address is looked up again next
    /// time).
    fn answer<M>(&self, answer: Result<Response<M>, Status>) -> Result<Response<M>, Status> {
        match answer {
            Err(status) if std::error::Error::source(&status).is_some() => {
                self.peers.forget(&self.id);
                Err(PeerError::Unreachable {
                    router: self.id.clone(),
                    address: self.address.clone(),
                    why: status.message().to_owned(),
                }
                .into())
            }
            answer => answer.map(|r| Response::new(r.into_inner())),
        }
    }
}

/// Replaces the submitting call's `grpc-timeout` with the task's own (none: the model's
/// timeout applies).
fn set_deadline(metadata: &mut MetadataMap, timeout: Duration) {
    metadata
        .as_mut()
        .remove(fulcrum_grpc_h2::timeout::GRPC_TIMEOUT);
    if !timeout.is_zero() {
        super::forward::set_grpc_timeout(metadata, timeout);
    }
}

/// A task as `GetTask` answers it.
fn to_message(task: &Task) -> TaskMessage {
    let mut message = TaskMessage {
        task_id: task.id.clone(),
        model_name: task.model.clone(),
        state: task::State::Running.into(),
        submitted_unix_ms: task.submitted_unix_ms,
        ..Default::default()
    };
    let Some(ended) = task.ended() else {
        return message;
    };
    message.ended_unix_ms = ended.ended_unix_ms;
    message.headers = ended.headers.clone().into_iter().collect();
    message.expires_unix_ms = ended.expires_unix_ms;
    let state = match &ended.outcome {
        Outcome::Succeeded(response) => {
            message.response = Some(response.clone());
            task::State::Succeeded
        }
        Outcome::Failed { code, message: m } => {
            message.error_code = *code as i32;
            message.error_message.clone_from(m);
            task::State::Failed
        }
        Outcome::Cancelled => {
            message.error_code = tonic::Code::Cancelled as i32;
            message.error_message = "cancelled by CancelTask".to_owned();
            task::State::Cancelled
        }
    };
    message.state = state.into();
    message
}
