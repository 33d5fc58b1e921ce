//! Request batching end to end (real etcd, real gRPC, a node-sim): calls of a batching model
//! that arrive together reach the node as one call, merged along their first dimension, and
//! each gets exactly its own rows back with its own id (raw data or typed contents); a call
//! alone in its window goes alone; bad batching policies are refused and change nothing.

use fulcrum_proto::fulcrum::v1::ModelPolicy;
use fulcrum_proto::inference::model_infer_request::InferInputTensor;
use fulcrum_proto::inference::{InferTensorContents, ModelInferRequest};
use fulcrum_sim::node::NodeSimConfig;
use fulcrum_tests::infer::{assert_echoed, raw_f32};
use fulcrum_tests::scrape::metric;
use fulcrum_tests::stack::{self, oip, wait_ready};

/// A request of `rows` rows of `cols` FP32 values each, all from `seed`.
fn rows(id: &str, rows: i64, cols: i64, seed: f32) -> ModelInferRequest {
    let values: Vec<f32> = (0..rows * cols).map(|i| seed + i as f32).collect();
    ModelInferRequest {
        model_name: "echo".into(),
        id: id.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![rows, cols],
            ..Default::default()
        }],
        raw_input_contents: vec![raw_f32(&values).into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_arriving_together_reach_the_node_as_one() {
    let stack::OneNode {
        node,
        mut admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(
        NodeSimConfig {
            slots: 16,
            ..Default::default()
        },
        16,
    )
    .await;
    // A full batch leaves at once; the window (the longest allowed) only bounds the wait of
    // calls that come too late to fill it.
    let policy = ModelPolicy {
        model: "echo".into(),
        batch_max_size: 6,
        batch_window_us: 100_000,
        ..Default::default()
    };
    admin.set_model_policy(policy.clone()).await.unwrap();
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    wait_ready(router.addr).await;
    stack::wait_policies_applied(&admin, std::slice::from_ref(&policy)).await;
    let c = oip(router.addr).await;
    let before = node.controls().calls();

    // Six calls of 1 to 3 rows of 2 values, and two of rows of 3 values (another group).
    let mut requests: Vec<_> = (0..6)
        .map(|i| rows(&format!("two-{i}"), 1 + i % 3, 2, 100.0 * i as f32))
        .collect();
    requests.extend((0..2).map(|i| rows(&format!("three-{i}"), 2, 3, -50.0 * (i + 1) as f32)));
    let calls: Vec<_> = requests
        .iter()
        .cloned()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { c.model_infer(r).await })
        })
        .collect();
    let mut sizes = Vec::new();
    for (req, call) in requests.iter().zip(calls) {
        let resp = call.await.unwrap().unwrap();
        assert_echoed(req, resp.get_ref());
        assert_eq!(resp.get_ref().id, req.id);
        let size: usize = resp
            .metadata()
            .get("x-fulcrum-batch")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        sizes.push(size);
    }
    // The six of one group in one node call, the two of the other in another.
    assert_eq!(sizes, [6, 6, 6, 6, 6, 6, 2, 2]);
    assert_eq!(node.controls().calls() - before, 2);
    let sample = |name: &'static str| metric(metrics, name);
    assert_eq!(
        sample("fulcrum_router_batches_total{model=\"echo\"}").await,
        Some(2.0)
    );
    assert_eq!(
        sample("fulcrum_router_batched_calls_total{model=\"echo\"}").await,
        Some(8.0)
    );

    // A call alone in its window is sent alone.
    let one = rows("single", 1, 2, 7.0);
    let resp = c.clone().model_infer(one.clone()).await.unwrap();
    assert_echoed(&one, resp.get_ref());
    assert_eq!(resp.metadata().get("x-fulcrum-batch"), None);
    assert_eq!(node.controls().calls() - before, 3);

    // Typed contents batch too (never with raw ones): each call gets its own elements.
    let typed = |id: &str, values: Vec<f32>| {
        let mut r = rows(id, values.len() as i64 / 2, 2, 0.0);
        r.raw_input_contents.clear();
        r.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: values,
            ..Default::default()
        });
        r
    };
    let requests = [
        typed("typed-0", vec![1.0, 2.0]),
        typed("typed-1", vec![3.0, 4.0, 5.0, 6.0]),
    ];
    let calls: Vec<_> = requests
        .iter()
        .cloned()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { c.model_infer(r).await })
        })
        .collect();
    for (req, call) in requests.iter().zip(calls) {
        let resp = call.await.unwrap().unwrap();
        assert_eq!(resp.metadata().get("x-fulcrum-batch").unwrap(), "2");
        let out = resp.get_ref();
        assert_eq!(out.id, req.id);
        assert_eq!(out.outputs[0].shape, req.inputs[0].shape);
        assert_eq!(out.outputs[0].contents, req.inputs[0].contents);
    }
    assert_eq!(node.controls().calls() - before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batching_policies_are_refused_and_change_nothing() {
    let stack::OneNode {
        mut admin,
        etcd: _etcd,
        cp: _cp,
        ..
    } = stack::one_node(NodeSimConfig::default(), 4).await;
    let good = ModelPolicy {
        model: "echo".into(),
        batch_max_size: 16,
        batch_window_us: 2_000,
        ..Default::default()
    };
    let good = admin.set_model_policy(good).await.unwrap().into_inner();
    stack::assert_policies_refused(
        &admin,
        &good,
        vec![
            (
                ModelPolicy {
                    batch_max_size: 2_000,
                    ..good.clone()
                },
                "batch_max_size 2000 is above 1024",
            ),
            (
                ModelPolicy {
                    batch_window_us: 200_000,
                    ..good.clone()
                },
                "batch_window_us 200000 is above 100000",
            ),
            (
                ModelPolicy {
                    batch_max_size: 1,
                    ..good.clone()
                },
                "batch_window_us needs batch_max_size",
            ),
        ],
    )
    .await;
}
