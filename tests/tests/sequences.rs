//! Triton sequences through a router: every request of a sequence reaches the node that holds
//! it (node-sims keep Triton's sequence semantics: a step of a sequence a node never saw start
//! is refused), whatever the weights do; a drained node finishes its sequences and starts no
//! new ones; a sequence whose node fails fails loudly on its next step, and new ones go on.

use std::collections::{HashMap, HashSet};

use fulcrum_proto::fulcrum::v1::{DrainNodeRequest, HealthState, WeightOverrideRequest};
use fulcrum_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fulcrum_proto::inference::infer_parameter::ParameterChoice;
use fulcrum_proto::inference::{InferParameter, ModelInferRequest};
use fulcrum_sim::node::{NodeSimConfig, spawn};
use fulcrum_tests::infer::{echo_request, served_by};
use fulcrum_tests::stack::{self, admin, oip, register, spec, wait_applied, wait_ready};
use tonic::Code;
use tonic::transport::Channel;

/// Step `step` of sequence `id`, of `steps` in all.
fn step(id: u64, step: usize, steps: usize) -> ModelInferRequest {
    let mut r = echo_request("echo", &[id as f32, step as f32]);
    let p = |c| InferParameter {
        parameter_choice: Some(c),
    };
    r.parameters
        .insert("sequence_id".into(), p(ParameterChoice::Uint64Param(id)));
    r.parameters.insert(
        "sequence_start".into(),
        p(ParameterChoice::BoolParam(step == 0)),
    );
    r.parameters.insert(
        "sequence_end".into(),
        p(ParameterChoice::BoolParam(step + 1 == steps)),
    );
    r
}

/// Sends step `k` of every sequence in `ids`; returns the node each was served by.
async fn steps(
    c: &mut GrpcInferenceServiceClient<Channel>,
    ids: &[u64],
    k: usize,
    of: usize,
) -> HashMap<u64, Result<String, tonic::Status>> {
    let mut out = HashMap::new();
    for &id in ids {
        let answer = c.model_infer(step(id, k, of)).await;
        out.insert(id, answer.map(|r| served_by(r.metadata()).0));
    }
    out
}

/// Asserts that every step `k` in `answers` succeeded on its sequence's node in `node_of`
/// (recording it there on a sequence's first step).
fn same_nodes(
    node_of: &mut HashMap<u64, String>,
    k: usize,
    answers: HashMap<u64, Result<String, tonic::Status>>,
) {
    for (id, a) in answers {
        let node = a.unwrap_or_else(|s| panic!("sequence {id} step {k}: {s:?}"));
        let first = node_of.entry(id).or_insert_with(|| node.clone());
        assert_eq!(*first, node, "sequence {id} moved at step {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_stays_on_its_node_through_weight_changes_and_drains_and_fails_loudly_when_it_fails()
 {
    let cp = stack::control_plane("memory:").await;
    let mut admin = admin(cp.addr).await;
    let mut nodes = HashMap::new();
    for (id, region) in [("a-1", "a"), ("a-2", "a"), ("a-3", "a"), ("b-1", "b")] {
        let config = NodeSimConfig {
            name: id.into(),
            slots: 16,
            ..Default::default()
        };
        let n = spawn(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        register(&mut admin, spec(id, n.addr, region, &["echo"], 16)).await;
        nodes.insert(id, n);
    }
    let router = stack::router("a", cp.addr, None).await;
    wait_ready(router.addr).await;
    // Every node of region a routable first: a router ready with one of them would put every
    // sequence on it (it happened once in a full test run, 2026-12-08).
    for id in ["a-1", "a-2", "a-3"] {
        stack::wait_serving(&admin, id, "echo").await;
    }
    let mut c = oip(router.addr).await;

    // Twelve sequences of four steps, interleaved step by step.
    let ids: Vec<u64> = (1..=12).collect();
    let mut node_of: HashMap<u64, String> = HashMap::new();
    for k in 0..2 {
        same_nodes(&mut node_of, k, steps(&mut c, &ids, k, 4).await);
    }
    let used: HashSet<&String> = node_of.values().collect();
    assert!(used.len() >= 2, "12 sequences all on one node: {node_of:?}");
    assert!(
        node_of.values().all(|n| n.starts_with("a-")),
        "a sequence left the router's region: {node_of:?}"
    );

    // The control plane moves the weights (an override on the busiest node): a load balancer
    // would shift calls, but no sequence moves.
    let busiest = node_of
        .values()
        .max_by_key(|n| node_of.values().filter(|m| m == n).count())
        .unwrap()
        .clone();
    admin
        .set_weight_override(WeightOverrideRequest {
            id: busiest.clone(),
            weight: Some(0.5),
        })
        .await
        .unwrap();
    wait_applied(&admin, &busiest, |n| n.weight_override == Some(0.5)).await;
    for k in 2..4 {
        same_nodes(&mut node_of, k, steps(&mut c, &ids, k, 4).await);
    }
    // Every sequence ended where it started.
    for (id, n) in &nodes {
        assert_eq!(n.controls().open_sequences(), 0, "{id} has sequences open");
    }

    // New sequences; the node of some of them is drained after their first step. A drained
    // node finishes the sequences it holds (their next steps still reach it) and starts no new
    // ones.
    let ids: Vec<u64> = (101..=112).collect();
    let mut node_of = HashMap::new();
    same_nodes(&mut node_of, 0, steps(&mut c, &ids, 0, 3).await);
    let drained = node_of[&101].clone();
    admin
        .drain_node(DrainNodeRequest {
            id: drained.clone(),
            drain: true,
        })
        .await
        .unwrap();
    wait_applied(&admin, &drained, |n| n.drained).await;
    same_nodes(&mut node_of, 1, steps(&mut c, &ids, 1, 3).await);
    let new: Vec<u64> = (201..=212).collect();
    let mut new_nodes = HashMap::new();
    same_nodes(&mut new_nodes, 0, steps(&mut c, &new, 0, 2).await);
    assert!(
        new_nodes.values().all(|n| *n != drained),
        "a sequence started on the drained node {drained}: {new_nodes:?}"
    );
    same_nodes(&mut node_of, 2, steps(&mut c, &ids, 2, 3).await);
    same_nodes(&mut new_nodes, 1, steps(&mut c, &new, 1, 2).await);
    assert_eq!(
        nodes[drained.as_str()].controls().open_sequences(),
        0,
        "the drained node's sequences all ended there"
    );

    // A node that fails takes its sequences with it: their next step goes to another node,
    // which refuses it for want of a start (as a Triton server would): a loud failure, not a
    // silently wrong answer. The other sequences go on, and a new sequence starts fine.
    let ids: Vec<u64> = (301..=312).collect();
    let mut node_of = HashMap::new();
    same_nodes(&mut node_of, 0, steps(&mut c, &ids, 0, 3).await);
    let failing = node_of[&301].clone();
    nodes[failing.as_str()].controls().set_healthy(false).await;
    wait_applied(&admin, &failing, |n| {
        n.endpoint
            .as_ref()
            .is_some_and(|e| e.health() == HealthState::Unhealthy)
    })
    .await;
    for (id, answer) in steps(&mut c, &ids, 1, 3).await {
        if node_of[&id] == failing {
            let s = answer.expect_err("a step reached a node without its sequence");
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert!(s.message().contains("START flag"), "{}", s.message());
        } else {
            assert_eq!(answer.expect("an unmoved sequence"), node_of[&id]);
        }
    }
    let fresh = steps(&mut c, &[301], 0, 3).await.remove(&301).unwrap();
    assert_ne!(fresh.expect("a restarted sequence"), failing);
}
