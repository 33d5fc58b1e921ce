//! End-to-end tests of the simulated node over real gRPC connections on 127.0.0.1.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fulcrum_proto::fulcrum::v1::SimConfig;
use fulcrum_proto::fulcrum::v1::node_sim_control_client::NodeSimControlClient;
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use fulcrum_proto::inference::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
};
use prost::bytes::Bytes;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::*;

/// How long a test waits for a condition before failing: generous, since it only matters when
/// the test is failing anyway.
const PATIENCE: Duration = Duration::from_secs(10);

fn local() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

async fn start(config: NodeSimConfig) -> (RunningNodeSim, GrpcInferenceServiceClient<Channel>) {
    let node = spawn(config, local()).await.unwrap();
    let client = GrpcInferenceServiceClient::connect(node.url())
        .await
        .unwrap();
    (node, client)
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn fp32_input(name: &str, n: usize) -> InferInputTensor {
    InferInputTensor {
        name: name.to_string(),
        datatype: "FP32".to_string(),
        shape: vec![1, n as i64],
        ..InferInputTensor::default()
    }
}

fn raw_request(model: &str, id: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_string(),
        id: id.to_string(),
        inputs: vec![fp32_input("INPUT0", 2), fp32_input("INPUT1", 1)],
        raw_input_contents: vec![
            Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
            Bytes::from_static(&[9, 10, 11, 12]),
        ],
        ..ModelInferRequest::default()
    }
}

fn fast() -> NodeSimConfig {
    NodeSimConfig {
        name: "n1".into(),
        service_time: ServiceTime::Constant(Duration::ZERO),
        seed: Some(1),
        ..NodeSimConfig::default()
    }
}

#[tokio::test]
async fn echoes_raw_contents_unchanged() {
    let (node, mut client) = start(fast()).await;
    let response = client
        .model_infer(raw_request("echo", "call-1"))
        .await
        .unwrap();
    assert_eq!(
        response
            .metadata()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("n1")
    );
    let r = response.into_inner();
    assert_eq!(r.model_name, "echo");
    assert_eq!(r.model_version, "1");
    assert_eq!(r.id, "call-1");
    let names: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["INPUT0", "INPUT1"]);
    assert_eq!(r.outputs[0].datatype, "FP32");
    assert_eq!(r.outputs[0].shape, vec![1, 2]);
    assert!(r.outputs.iter().all(|o| o.contents.is_none()));
    assert_eq!(
        r.raw_output_contents,
        raw_request("echo", "").raw_input_contents
    );

    // Requested outputs: only those, in the requested order; a version is echoed.
    let mut request = raw_request("echo", "call-2");
    request.model_version = "7".into();
    request.outputs = vec![InferRequestedOutputTensor {
        name: "INPUT1".into(),
        ..InferRequestedOutputTensor::default()
    }];
    let r = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(r.model_version, "7");
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, "INPUT1");
    assert_eq!(
        r.raw_output_contents,
        vec![Bytes::from_static(&[9, 10, 11, 12])]
    );

    // An output the echo model cannot produce.
    let mut request = raw_request("echo", "call-3");
    request.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT0".into(),
        ..InferRequestedOutputTensor::default()
    }];
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // As many raw contents as inputs.
    let mut request = raw_request("echo", "call-4");
    request.raw_input_contents.pop();
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    assert_eq!(node.controls().served("echo"), 2);
    assert_eq!(node.controls().calls(), 4);
    node.stop().await;
}

#[tokio::test]
async fn echoes_typed_fp32_contents_unchanged() {
    let (node, mut client) = start(fast()).await;
    let contents = InferTensorContents {
        fp32_contents: vec![1.5, -2.25, f32::MAX],
        ..InferTensorContents::default()
    };
    let request = ModelInferRequest {
        model_name: "echo".into(),
        inputs: vec![InferInputTensor {
            contents: Some(contents.clone()),
            ..fp32_input("x", 3)
        }],
        ..ModelInferRequest::default()
    };
    let r = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(r.model_version, "1");
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, "x");
    assert_eq!(r.outputs[0].shape, vec![1, 3]);
    assert_eq!(r.outputs[0].contents, Some(contents));
    assert!(r.raw_output_contents.is_empty());
    node.stop().await;
}

#[tokio::test]
async fn unknown_model_is_not_found_and_metadata_is_reported() {
    let (node, mut client) = start(fast()).await;
    let status = client
        .model_infer(raw_request("resnet", "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "model resnet is not served by node n1");
    assert_eq!(
        status
            .metadata()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("n1")
    );

    let ready = |name: &str| ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(
        !client
            .model_ready(ready("resnet"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        client
            .model_ready(ready("echo"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );

    let status = client
        .model_metadata(ModelMetadataRequest {
            name: "resnet".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "echo".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["1"]);
    assert_eq!(meta.platform, "fulcrum-sim");
    assert_eq!(meta.inputs.len(), 1);
    assert_eq!(meta.inputs[0].name, "*");
    assert_eq!(meta.outputs[0].shape, vec![-1]);

    let server = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.name, "n1");
    assert_eq!(server.version, env!("CARGO_PKG_VERSION"));
    assert!(server.extensions.is_empty());
    node.stop().await;
}

async fn health(url: &str) -> ServingStatus {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

#[tokio::test]
async fn unhealthy_via_configure_rpc() {
    let (node, mut client) = start(fast()).await;
    let mut control = NodeSimControlClient::connect(node.url()).await.unwrap();
    assert_eq!(health(&node.url()).await, ServingStatus::Serving);

    let reply = control
        .configure(SimConfig {
            healthy: Some(false),
            ..SimConfig::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply,
        SimConfig {
            healthy: Some(false),
            error_ratio: Some(0.0),
            hang_ratio: Some(0.0),
            stall_ms: Some(0),
        }
    );
    assert!(
        !client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let status = client
        .model_infer(raw_request("echo", "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(health(&node.url()).await, ServingStatus::NotServing);
    assert!(!node.controls().settings().healthy);

    // And back, through the in-process handle.
    node.controls().set_healthy(true).await;
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert_eq!(health(&node.url()).await, ServingStatus::Serving);
    client.model_infer(raw_request("echo", "y")).await.unwrap();
    node.stop().await;
}

#[tokio::test]
async fn invalid_ratio_is_rejected_and_nothing_changes() {
    let (node, _client) = start(fast()).await;
    let mut control = NodeSimControlClient::connect(node.url()).await.unwrap();
    for bad in [1.5, -0.1, f64::NAN] {
        let status = control
            .configure(SimConfig {
                healthy: Some(false),
                error_ratio: Some(bad),
                hang_ratio: Some(0.5),
                stall_ms: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
    }
    let now = control
        .configure(SimConfig::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        now,
        SimConfig {
            healthy: Some(true),
            error_ratio: Some(0.0),
            hang_ratio: Some(0.0),
            stall_ms: Some(0),
        }
    );
    assert_eq!(health(&node.url()).await, ServingStatus::Serving);
    node.stop().await;
}

#[tokio::test]
async fn a_stall_holds_every_call_until_it_ends() {
    let (node, client) = start(fast()).await;
    let mut control = NodeSimControlClient::connect(node.url()).await.unwrap();

    // Too long a stall is refused, and nothing changes.
    let status = control
        .configure(SimConfig {
            stall_ms: Some(600_001),
            healthy: Some(false),
            ..SimConfig::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("stall"), "{status:?}");
    let now = control.configure(SimConfig::default()).await.unwrap();
    assert_eq!(now.get_ref().stall_ms, Some(0));
    assert_eq!(now.get_ref().healthy, Some(true));

    // A stall of ten minutes: a call that takes no time at all cannot finish within 300 ms.
    let now = control
        .configure(SimConfig {
            stall_ms: Some(600_000),
            ..SimConfig::default()
        })
        .await
        .unwrap();
    assert!(now.get_ref().stall_ms.unwrap() > 500_000, "{now:?}");
    let mut stalled_client = client.clone();
    let stalled = stalled_client.model_infer(raw_request("echo", "stalled"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stalled)
            .await
            .is_err(),
        "a call finished during a stall"
    );
    assert_eq!(node.controls().served("echo"), 0);

    // A call in service when the stall ends finishes then; a stall of zero ends it.
    let mut waiting_client = client.clone();
    let waiting =
        tokio::spawn(async move { waiting_client.model_infer(raw_request("echo", "w")).await });
    let controls = node.controls();
    wait_until("the call waits in the stall", || controls.in_flight() == 1).await;
    let now = control
        .configure(SimConfig {
            stall_ms: Some(0),
            ..SimConfig::default()
        })
        .await
        .unwrap();
    assert_eq!(now.get_ref().stall_ms, Some(0));
    waiting.await.unwrap().unwrap();
    client
        .clone()
        .model_infer(raw_request("echo", "after"))
        .await
        .unwrap();
    assert_eq!(node.controls().served("echo"), 2);
    node.stop().await;
}

#[tokio::test]
async fn full_node_rejects_with_resource_exhausted() {
    let config = NodeSimConfig {
        slots: 1,
        queue: 0,
        // Far longer than the test: the first call is surely still in service when the second
        // arrives, and the test cancels it rather than waiting.
        service_time: ServiceTime::Constant(Duration::from_secs(600)),
        ..fast()
    };
    let (node, client) = start(config).await;
    let controls = node.controls();
    let mut first_client = client.clone();
    let first =
        tokio::spawn(async move { first_client.model_infer(raw_request("echo", "first")).await });
    wait_until("the first call is in service", || controls.in_flight() == 1).await;

    let status = client
        .clone()
        .model_infer(raw_request("echo", "second"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "node n1 is overloaded: 1 slots busy, 0 queued"
    );

    // Cancelling the first call frees its slot.
    first.abort();
    wait_until("the cancelled call has left", || controls.in_flight() == 0).await;
    assert_eq!(controls.served("echo"), 0);
    node.stop().await;
}

#[tokio::test]
async fn queued_calls_wait_for_a_slot() {
    let config = NodeSimConfig {
        slots: 1,
        queue: 1,
        service_time: ServiceTime::Constant(Duration::from_millis(20)),
        ..fast()
    };
    let (node, client) = start(config).await;
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { c.model_infer(raw_request("echo", &i.to_string())).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(node.controls().served("echo"), 2);
    node.stop().await;
}

#[tokio::test]
async fn injected_failures_and_hangs() {
    let (node, mut client) = start(fast()).await;
    let controls = node.controls();

    controls.set_error_ratio(1.0).await.unwrap();
    let status = client
        .model_infer(raw_request("echo", "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "injected failure");

    controls.set_error_ratio(0.0).await.unwrap();
    controls.set_hang_ratio(1.0).await.unwrap();
    let mut request = tonic::Request::new(raw_request("echo", "y"));
    request.set_timeout(Duration::from_millis(100));
    let status = client.model_infer(request).await.unwrap_err();
    // tonic's client reports its own expired deadline as CANCELLED "Timeout expired".
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    wait_until("the hanging call has been dropped", || {
        controls.in_flight() == 0
    })
    .await;

    controls.set_hang_ratio(0.0).await.unwrap();
    client.model_infer(raw_request("echo", "z")).await.unwrap();
    assert_eq!(controls.served("echo"), 1);
    assert!(controls.set_hang_ratio(2.0).await.is_err());
    node.stop().await;
}

#[tokio::test]
async fn stream_round_trip() {
    let (node, mut client) = start(fast()).await;
    let requests = vec![
        raw_request("echo", "s1"),
        raw_request("echo", "s2"),
        raw_request("resnet", "s3"),
    ];
    let response = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap();
    assert_eq!(
        response
            .metadata()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("n1")
    );
    let mut stream = response.into_inner();
    let mut ok = BTreeSet::new();
    let mut failed = BTreeSet::new();
    while let Some(item) = stream.message().await.unwrap() {
        let r = item.infer_response.unwrap();
        if item.error_message.is_empty() {
            assert_eq!(
                r.raw_output_contents,
                raw_request("echo", "").raw_input_contents
            );
            ok.insert(r.id);
        } else {
            assert_eq!(item.error_message, "model resnet is not served by node n1");
            assert_eq!(r.model_name, "resnet");
            failed.insert(r.id);
        }
    }
    assert_eq!(ok, BTreeSet::from(["s1".to_string(), "s2".to_string()]));
    assert_eq!(failed, BTreeSet::from(["s3".to_string()]));
    node.stop().await;
}

#[tokio::test]
async fn invalid_config_is_rejected() {
    for config in [
        NodeSimConfig { slots: 0, ..fast() },
        NodeSimConfig {
            error_ratio: 2.0,
            ..fast()
        },
        NodeSimConfig {
            name: String::new(),
            ..fast()
        },
    ] {
        assert!(NodeSim::new(config.clone()).is_err());
        let err = spawn(config, local()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_against_a_node() {
    let node = spawn(
        NodeSimConfig {
            service_time: ServiceTime::Constant(Duration::from_millis(1)),
            // Room for every call of the run at once: the test is about the generator's
            // accounting, and a starved machine (CI shares its cores) must not turn it into an
            // overload test (4 slots and 64 queued were once exceeded at 200 calls/s).
            slots: 256,
            ..fast()
        },
        local(),
    )
    .await
    .unwrap();
    let report = crate::load::run(crate::load::LoadConfig {
        target: node.addr.to_string(),
        rps: 200.0,
        duration: Duration::from_secs(1),
        ..crate::load::LoadConfig::default()
    })
    .await
    .unwrap();
    println!("{report}");
    assert_eq!(report.sent, 200, "{report}");
    assert_eq!(report.sent, report.ok, "{report}");
    assert!(report.errors.is_empty(), "{report}");
    assert_eq!(report.dropped, 0, "{report}");
    assert_eq!(report.nodes.values().sum::<u64>(), report.ok, "{report}");
    assert_eq!(report.nodes.get("n1"), Some(&report.ok), "{report}");
    assert_eq!(report.regions.get("unknown"), Some(&report.ok), "{report}");
    assert_eq!(node.controls().served("echo"), report.ok);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisson_arrivals_are_seeded_and_the_timeline_accounts_for_every_answer() {
    let node = spawn(fast(), local()).await.unwrap();
    let run = |seed| {
        crate::load::run(crate::load::LoadConfig {
            target: node.addr.to_string(),
            rps: 400.0,
            duration: Duration::from_millis(500),
            arrivals: crate::load::Arrivals::Poisson { seed },
            timeline: Some(Duration::from_millis(100)),
            ..crate::load::LoadConfig::default()
        })
    };
    let first = run(7).await.unwrap();
    let again = run(7).await.unwrap();
    let other = run(8).await.unwrap();
    println!("{first}");
    // The count of a Poisson process is random, but the same for the same seed; 200 expected,
    // standard deviation 14: another seed giving the very same count is unlikely, and any count
    // outside 100..300 would mean the gaps are not of mean 1/rps.
    assert_eq!(first.sent, again.sent);
    assert!((100..300).contains(&first.sent), "{first}");
    assert!((100..300).contains(&other.sent), "{other}");
    assert_eq!(first.ok, first.sent, "{first}");
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    assert!(first.started_unix_us > 0 && first.started_unix_us < now_us);
    // Every answered call is in exactly one bucket; buckets are 100 ms apart.
    let in_timeline: u64 = first
        .timeline
        .iter()
        .map(|b| b.ok.values().sum::<u64>() + b.failed)
        .sum();
    assert_eq!(in_timeline, first.sent);
    assert!(first.timeline.len() <= 5, "{:?}", first.timeline);
    for (i, b) in first.timeline.iter().enumerate() {
        assert_eq!(b.t_ms, i as u64 * 100);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_counts_hangs_as_deadlines_and_sheds_beyond_max_in_flight() {
    let node = spawn(
        NodeSimConfig {
            hang_ratio: 1.0,
            ..fast()
        },
        local(),
    )
    .await
    .unwrap();
    let report = crate::load::run(crate::load::LoadConfig {
        target: node.url(),
        rps: 100.0,
        duration: Duration::from_millis(300),
        timeout: Duration::from_millis(300),
        max_in_flight: 5,
        connections: 1,
        ..crate::load::LoadConfig::default()
    })
    .await
    .unwrap();
    println!("{report}");
    assert_eq!(report.sent + report.dropped, 30, "{report}");
    assert!(report.sent >= 5, "{report}");
    assert_eq!(report.ok, 0, "{report}");
    assert_eq!(report.errors.len(), 1, "{report}");
    assert_eq!(
        report.errors.get("DEADLINE_EXCEEDED"),
        Some(&report.sent),
        "{report}"
    );
    assert!(report.nodes.is_empty(), "{report}");
    let controls = node.controls();
    wait_until("the hanging calls have been dropped", || {
        controls.in_flight() == 0
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_sends_each_call_when_the_previous_one_has_ended() {
    // One slot and no queue: a second call in flight would be refused, so a run without
    // errors sent one call at a time.
    let node = spawn(
        NodeSimConfig {
            slots: 1,
            queue: 0,
            service_time: ServiceTime::Constant(Duration::from_millis(1)),
            ..fast()
        },
        local(),
    )
    .await
    .unwrap();
    let report = crate::load::run(crate::load::LoadConfig {
        target: node.addr.to_string(),
        // Unused in a closed loop: a schedule at this rate would send one call.
        rps: 1.0,
        duration: Duration::from_millis(500),
        closed_loop: Some(1),
        connections: 1,
        ..crate::load::LoadConfig::default()
    })
    .await
    .unwrap();
    println!("{report}");
    assert!(report.errors.is_empty(), "{report}");
    assert_eq!(report.ok, report.sent, "{report}");
    // Paced by answers, not by the rate: more than the schedule's one call, and no more than
    // the node can serve one after another (1 ms each) in the run's 500 ms.
    assert!((5..=500).contains(&report.sent), "{report}");
    assert_eq!(node.controls().served("echo"), report.sent);
    assert_eq!(report.closed_loop, Some(1));
    assert_eq!(report.target_rps, 0.0);
    assert!(
        report.to_string().contains("closed loop, 1 caller(s)"),
        "{report}"
    );
    node.stop().await;
}
