//! `fulcrum task`: background calls at a router (`fulcrum.v1.Tasks`): submit one, fetch or wait
//! for it, cancel it, delete it. A tool for trying the service and for operators; applications
//! call the service from their own gRPC clients.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fulcrum_proto::fulcrum::v1::tasks_client::TasksClient;
use fulcrum_proto::fulcrum::v1::{GetTaskRequest, SubmitTaskRequest, Task, TaskRef, task};
use fulcrum_proto::inference::ModelInferRequest;
use fulcrum_proto::inference::model_infer_request::InferInputTensor;
use tonic::transport::Channel;

use crate::cmd::status_error;

/// Flags of `fulcrum task`.
#[derive(Debug, Args)]
pub(crate) struct TaskArgs {
    /// The router, host:port.
    #[arg(long, default_value = "127.0.0.1:7001")]
    router: String,
    /// A request header every call carries, `NAME=VALUE` (repeatable): `authorization=Bearer
    /// <token>` for a router that checks tokens, `fulcrum-priority=sheddable`, ...
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = crate::cmd::load::parse_header)]
    headers: Vec<(String, String)>,
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Start a call in the background: one FP32 input `INPUT0` of shape [1, n]. Prints the
    /// task's id (with --wait, the task once it ended).
    Submit {
        /// The model to call.
        #[arg(long)]
        model: String,
        /// The input's values, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        values: Vec<f32>,
        /// The task's deadline, from submission (0: the model's timeout).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Wait for the task to end, and show it.
        #[arg(long)]
        wait: bool,
    },
    /// Show a task; with --wait, once it ended.
    Get {
        /// The task's id, as submit printed it.
        id: String,
        /// Wait for it to end (one long poll after another).
        #[arg(long)]
        wait: bool,
    },
    /// Stop a running task.
    Cancel {
        /// The task's id.
        id: String,
    },
    /// Forget a task (stopping it first if it runs).
    Delete {
        /// The task's id.
        id: String,
    },
}

/// How long each of `--wait`'s long polls may take: the router's own default for a call
/// without a deadline, so a proxy between that cuts idle calls at 30 s never sees one.
const POLL: Duration = Duration::from_secs(20);

struct Client {
    tasks: TasksClient<Channel>,
    headers: Vec<(String, String)>,
}

impl Client {
    fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(message);
        for (name, value) in &self.headers {
            let name: tonic::metadata::MetadataKey<_> = name
                .parse()
                .with_context(|| format!("{name:?} is not a header name"))?;
            let value = value
                .parse()
                .with_context(|| format!("the value of {name} is not a header value"))?;
            r.metadata_mut().append(name, value);
        }
        Ok(r)
    }

    /// The task once it ended: long polls until then.
    async fn wait(&mut self, id: &str) -> anyhow::Result<Task> {
        loop {
            let mut r = self.request(GetTaskRequest {
                task_id: id.to_owned(),
                wait: true,
            })?;
            // The router answers a little before this deadline, with the task as it is then.
            r.set_timeout(POLL + Duration::from_secs(1));
            let task = self
                .tasks
                .get_task(r)
                .await
                .map_err(status_error)?
                .into_inner();
            if task.state() != task::State::Running {
                return Ok(task);
            }
        }
    }
}

pub(crate) async fn run(args: TaskArgs) -> anyhow::Result<()> {
    let uri = format!("http://{}", args.router);
    let tasks = TasksClient::connect(uri)
        .await
        .with_context(|| format!("connecting to the router at {}", args.router))?
        .max_decoding_message_size(usize::MAX);
    let mut c = Client {
        tasks,
        headers: args.headers,
    };
    let task = match args.command {
        TaskCommand::Submit {
            model,
            values,
            timeout,
            wait,
        } => {
            let request = SubmitTaskRequest {
                request: Some(request(&model, &values)),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            };
            let task = c
                .tasks
                .submit_task(c.request(request)?)
                .await
                .map_err(status_error)?
                .into_inner();
            if !wait {
                outln!("{}", task.task_id);
                return Ok(());
            }
            c.wait(&task.task_id).await?
        }
        TaskCommand::Get { id, wait: true } => c.wait(&id).await?,
        TaskCommand::Get { id, wait: false } => {
            let r = c.request(GetTaskRequest {
                task_id: id,
                wait: false,
            })?;
            c.tasks
                .get_task(r)
                .await
                .map_err(status_error)?
                .into_inner()
        }
        TaskCommand::Cancel { id } => {
            let r = c.request(TaskRef { task_id: id })?;
            c.tasks
                .cancel_task(r)
                .await
                .map_err(status_error)?
                .into_inner()
        }
        TaskCommand::Delete { id } => {
            let r = c.request(TaskRef {
                task_id: id.clone(),
            })?;
            c.tasks.delete_task(r).await.map_err(status_error)?;
            outln!("deleted {id}");
            return Ok(());
        }
    };
    show(&task)
}

/// One FP32 input `INPUT0` of shape [1, n].
fn request(model: &str, values: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_owned(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![1, i64::try_from(values.len()).unwrap_or(i64::MAX)],
            ..InferInputTensor::default()
        }],
        raw_input_contents: vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..ModelInferRequest::default()
    }
}

/// Prints a task; an error (and so a non-zero exit) for one that failed or was cancelled.
fn show(task: &Task) -> anyhow::Result<()> {
    outln!("task    {}", task.task_id);
    outln!("model   {}", task.model_name);
    outln!("state   {}", task.state().as_str_name());
    if task.ended_unix_ms > 0 {
        outln!(
            "took    {} ms",
            task.ended_unix_ms.saturating_sub(task.submitted_unix_ms)
        );
    }
    let mut headers: Vec<_> = task.headers.iter().collect();
    headers.sort();
    for (name, value) in headers {
        outln!("{name}: {value}");
    }
    if let Some(response) = &task.response {
        for (i, output) in response.outputs.iter().enumerate() {
            let raw = response.raw_output_contents.get(i);
            let values = match (output.datatype.as_str(), raw) {
                ("FP32", Some(raw)) => format!(
                    "{:?}",
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect::<Vec<_>>()
                ),
                (_, Some(raw)) => format!("{} bytes", raw.len()),
                (_, None) => "(typed contents)".to_owned(),
            };
            outln!(
                "output  {} {} {:?} = {values}",
                output.name,
                output.datatype,
                output.shape
            );
        }
    }
    match task.state() {
        task::State::Failed | task::State::Cancelled => anyhow::bail!(
            "task {} ended {}: {} {}",
            task.task_id,
            task.state().as_str_name(),
            tonic::Code::from(task.error_code).description(),
            task.error_message
        ),
        _ => Ok(()),
    }
}
