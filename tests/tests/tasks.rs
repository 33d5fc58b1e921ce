//! Background calls end to end (real etcd, real gRPC, node-sims, routers): a submitted task
//! runs at once and its answer is fetched, or waited for in one long poll; a long task can be
//! cancelled (its node call is reset) or ends FAILED at its own deadline; what `ModelInfer`
//! would refuse is refused at submission and starts nothing; a full router refuses
//! RESOURCE_EXHAUSTED; a task is held by its router, and any other router answers for it by
//! asking that one (found in the control plane's directory); it belongs to its submitter when
//! the router checks tokens.

use std::time::Duration;

use fulcrum_data_plane::auth::NewToken;
use fulcrum_data_plane::tasks::TaskLimits;
use fulcrum_proto::fulcrum::v1::tasks_client::TasksClient;
use fulcrum_proto::fulcrum::v1::{GetTaskRequest, SubmitTaskRequest, Task, TaskRef, task};
use fulcrum_sim::node::NodeSimConfig;
use fulcrum_tests::infer::{assert_echoed, echo_request};
use fulcrum_tests::scrape::metric;
use fulcrum_tests::stack::{self, wait_ready};
use tonic::Code;
use tonic::transport::Channel;

async fn tasks(addr: std::net::SocketAddr) -> TasksClient<Channel> {
    TasksClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the router's Tasks service")
}

fn submit(values: &[f32], timeout_ms: u64) -> SubmitTaskRequest {
    SubmitTaskRequest {
        request: Some(echo_request("echo", values)),
        timeout_ms,
    }
}

fn get(task: &Task, wait: bool) -> GetTaskRequest {
    GetTaskRequest {
        task_id: task.task_id.clone(),
        wait,
    }
}

fn of(task: &Task) -> TaskRef {
    TaskRef {
        task_id: task.task_id.clone(),
    }
}

/// `message` with `authorization: Bearer <t>`.
fn as_caller<T>(t: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    r
}

/// Waits until every one of `routers` holds a table and node `a-1` serves `echo` in it.
async fn ready(
    admin: &fulcrum_proto::fulcrum::v1::admin_client::AdminClient<Channel>,
    routers: &[&stack::Running],
) {
    for r in routers {
        wait_ready(r.addr).await;
    }
    stack::wait_serving(admin, "a-1", "echo").await;
}

/// Waits (at most 10 s) until `node` has `n` calls in flight.
async fn in_flight_at(node: &fulcrum_sim::node::RunningNodeSim, n: u64, what: &str) {
    fulcrum_tests::eventually(what, Duration::from_secs(10), || {
        let now = node.controls().in_flight();
        async move { (now == n).then_some(()) }
    })
    .await;
}

/// A `GetTask` with `wait` whose call has `deadline`.
fn wait_at_most(task: &Task, deadline: Duration) -> tonic::Request<GetTaskRequest> {
    let mut r = tonic::Request::new(get(task, true));
    r.set_timeout(deadline);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_in_the_background_and_its_answer_is_fetched() {
    let stack::OneNode {
        node,
        admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 8).await;
    let (router, metrics) = stack::router_with_metrics("a", cp.addr).await;
    ready(&admin, &[&router]).await;
    let mut c = tasks(router.addr).await;

    let submitted = c
        .submit_task(submit(&[1.0, 2.0, 3.0], 0))
        .await
        .expect("submitted")
        .into_inner();
    let (hex, holder) = submitted
        .task_id
        .split_once('@')
        .expect("id names its router");
    assert_eq!(hex.len(), 32, "{}", submitted.task_id);
    assert!(holder.starts_with("router-a-"), "{holder}");
    assert_eq!(submitted.model_name, "echo");
    assert!(submitted.submitted_unix_ms > 0);

    // One long poll brings the answer: the node's, echoing the request.
    let done = c
        .get_task(wait_at_most(&submitted, Duration::from_secs(20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), task::State::Succeeded, "{done:?}");
    assert_echoed(
        &echo_request("echo", &[1.0, 2.0, 3.0]),
        done.response.as_ref().expect("the answer"),
    );
    // How it was served, as a ModelInfer answer's headers would say.
    assert_eq!(
        done.headers.get("x-fulcrum-node").map(String::as_str),
        Some("a-1"),
        "{:?}",
        done.headers
    );
    assert_eq!(
        done.headers.get("x-fulcrum-region").map(String::as_str),
        Some("a")
    );
    assert!(done.ended_unix_ms >= done.submitted_unix_ms);
    assert!(done.expires_unix_ms > done.ended_unix_ms);
    assert_eq!(node.controls().calls(), 1, "one call reached the node");
    // Fetching again answers the same, without another call.
    let again = c
        .get_task(get(&submitted, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, done);
    assert_eq!(node.controls().calls(), 1);
    // Cancelling an ended task changes nothing.
    let cancelled = c.cancel_task(of(&submitted)).await.unwrap().into_inner();
    assert_eq!(cancelled.state(), task::State::Succeeded);

    // The router counts it: as a task, and as a call of its model.
    let m = |name: &'static str| metric(metrics, name);
    assert_eq!(m("fulcrum_router_tasks_submitted_total").await, Some(1.0));
    assert_eq!(
        m("fulcrum_router_tasks_ended_total{state=\"succeeded\"}").await,
        Some(1.0)
    );
    assert_eq!(m("fulcrum_router_tasks{state=\"ended\"}").await, Some(1.0));
    assert_eq!(
        m("fulcrum_router_requests_total{model=\"echo\",code=\"OK\"}").await,
        Some(1.0)
    );
    assert!(m("fulcrum_router_task_bytes").await.unwrap() > 0.0);

    // Deleted, it is gone and its memory freed.
    c.delete_task(of(&submitted)).await.unwrap();
    let e = c.get_task(get(&submitted, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no task"), "{}", e.message());
    assert_eq!(m("fulcrum_router_tasks{state=\"ended\"}").await, Some(0.0));
    assert_eq!(m("fulcrum_router_task_bytes").await, Some(0.0));
    let e = c.delete_task(of(&submitted)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_is_waited_for_then_cancelled_or_ends_at_its_deadline() {
    let stack::OneNode {
        node,
        admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 8).await;
    let router = stack::router("a", cp.addr, None).await;
    ready(&admin, &[&router]).await;
    let mut c = tasks(router.addr).await;
    // Every call hangs at the node until its caller gives up.
    node.controls().set_hang_ratio(1.0).await.unwrap();

    let long = c
        .submit_task(submit(&[4.0], 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long.state(), task::State::Running);
    in_flight_at(&node, 1, "the task's call at the node").await;
    // A long poll that ends before the task answers it as it is: still running, no error.
    let waited = c
        .get_task(wait_at_most(&long, Duration::from_millis(300)))
        .await
        .expect("a long poll's deadline is not an error")
        .into_inner();
    assert_eq!(waited.state(), task::State::Running);
    assert_eq!(waited.ended_unix_ms, 0);

    // Cancelled: it says so, and its call to the node is reset.
    let cancelled = c.cancel_task(of(&long)).await.unwrap().into_inner();
    assert_eq!(cancelled.state(), task::State::Cancelled);
    assert_eq!(cancelled.error_code, Code::Cancelled as i32);
    in_flight_at(&node, 0, "the node's call reset").await;
    let later = c.get_task(get(&long, false)).await.unwrap().into_inner();
    assert_eq!(later.state(), task::State::Cancelled);

    // A task's own deadline ends it, FAILED as ModelInfer would have failed: the submitting
    // call's deadline (short) does not bound it, its timeout_ms does.
    let mut short = tonic::Request::new(submit(&[5.0], 300));
    short.set_timeout(Duration::from_secs(5));
    let short = c.submit_task(short).await.unwrap().into_inner();
    let ended = c
        .get_task(wait_at_most(&short, Duration::from_secs(20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.state(), task::State::Failed, "{ended:?}");
    assert_eq!(ended.error_code, Code::DeadlineExceeded as i32, "{ended:?}");
    // As ModelInfer says it: the node awaited ("deadline of … exceeded waiting for node a-1",
    // or the node's own "did not answer within", whichever timer fired first).
    assert!(
        ended.error_message.contains("a-1"),
        "{}",
        ended.error_message
    );
    assert!(ended.response.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_and_ids_are_refused_and_change_nothing() {
    let stack::OneNode {
        node,
        admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 8).await;
    // This router may hold one task.
    let router = stack::router_configured("a", &[cp.addr], |c| {
        c.task_limits = TaskLimits {
            max_tasks: 1,
            ..TaskLimits::default()
        };
    })
    .await;
    let other = stack::router("a", cp.addr, None).await;
    ready(&admin, &[&router, &other]).await;
    let mut c = tasks(router.addr).await;

    let mut mismatched = echo_request("echo", &[1.0, 2.0]);
    mismatched.inputs[0].shape = vec![1, 3];
    let mut bad_priority = tonic::Request::new(submit(&[1.0], 0));
    bad_priority
        .metadata_mut()
        .insert("fulcrum-priority", "urgent".parse().unwrap());
    let cases: Vec<(tonic::Request<SubmitTaskRequest>, Code, &str)> = vec![
        (
            tonic::Request::new(SubmitTaskRequest::default()),
            Code::InvalidArgument,
            "request is missing",
        ),
        (
            tonic::Request::new(SubmitTaskRequest {
                request: Some(mismatched),
                timeout_ms: 0,
            }),
            Code::InvalidArgument,
            "INPUT0",
        ),
        (
            tonic::Request::new(SubmitTaskRequest {
                request: Some(echo_request("nope", &[1.0])),
                timeout_ms: 0,
            }),
            Code::NotFound,
            "\"nope\"",
        ),
        (bad_priority, Code::InvalidArgument, "not a priority"),
        (
            tonic::Request::new(submit(&[1.0], 3_600_001)),
            Code::InvalidArgument,
            "longest a task may take",
        ),
    ];
    for (request, code, says) in cases {
        let e = c.submit_task(request).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(says), "{says:?} in {}", e.message());
    }

    // Ids that are not ids, or name no task here.
    let task_id = |id: &str| GetTaskRequest {
        task_id: id.into(),
        wait: false,
    };
    let e = c.get_task(task_id("42")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a task id"), "{}", e.message());
    let e = c
        .get_task(task_id(&format!("{}@router-b-1", "0".repeat(32))))
        .await
        .unwrap_err();
    // A router nobody knows of: not in the control plane's directory.
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message()
            .contains("router \"router-b-1\", which holds the task, is not connected"),
        "{}",
        e.message()
    );
    assert_eq!(node.controls().calls(), 0, "nothing was started");

    // The one task this router may hold, running; a second is refused, and starts nothing.
    node.controls().set_hang_ratio(1.0).await.unwrap();
    let held = c.submit_task(submit(&[1.0], 0)).await.unwrap().into_inner();
    let e = c.submit_task(submit(&[2.0], 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("may hold 1"), "{}", e.message());
    // Deleting it makes room (and stops its call), through another router too.
    tasks(other.addr)
        .await
        .delete_task(of(&held))
        .await
        .unwrap();
    let e = c.get_task(get(&held, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    node.controls().set_hang_ratio(0.0).await.unwrap();
    let next = c.submit_task(submit(&[3.0], 0)).await.unwrap().into_inner();
    let done = c
        .get_task(wait_at_most(&next, Duration::from_secs(20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), task::State::Succeeded, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_a_task_belongs_to_its_submitter() {
    const SECRET: &str = "a secret of the task tests, 32+ bytes";
    let stack::OneNode {
        node: _node,
        admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 8).await;
    // Kept to the end: the router reads its secrets file again every few seconds.
    let check = stack::token_check(SECRET);
    let (auth, also) = (check.auth.clone(), check.auth.clone());
    let router = stack::router_configured("a", &[cp.addr], move |c| c.auth = Some(auth)).await;
    let other = stack::router_configured("a", &[cp.addr], move |c| c.auth = Some(also)).await;
    stack::wait_serving(&admin, "a-1", "echo").await;
    let token = |sub: &str, models: Option<Vec<String>>| {
        NewToken {
            subject: sub.into(),
            valid_for: Duration::from_secs(600),
            models,
            ..Default::default()
        }
        .sign_hs256(SECRET.as_bytes())
        .unwrap()
    };
    let (alice, bob) = (token("alice", None), token("bob", None));
    let mut c = tasks(router.addr).await;
    // Until the router holds a table with the node routable (`wait_serving` cannot tell that
    // a router that has not reached the control plane's status yet is behind), a task fails
    // UNAVAILABLE; submitted again until one succeeds.
    let submitted = fulcrum_tests::eventually("alice's task", Duration::from_secs(20), || {
        let mut c = c.clone();
        let alice = alice.clone();
        async move {
            let t = c
                .submit_task(as_caller(&alice, submit(&[1.0], 0)))
                .await
                .ok()?
                .into_inner();
            let done = c
                .get_task(as_caller(&alice, get(&t, true)))
                .await
                .ok()?
                .into_inner();
            (done.state() == task::State::Succeeded).then_some(t)
        }
    })
    .await;
    // Bob is told there is no such task, and cannot cancel or delete it.
    let e = c
        .get_task(as_caller(&bob, get(&submitted, false)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .delete_task(as_caller(&bob, of(&submitted)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Without a token nothing is served at all.
    let e = c.get_task(get(&submitted, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Through another router, the same: the caller's token goes with the call to the holder.
    let mut via = tasks(other.addr).await;
    let e = fulcrum_tests::eventually(
        "an answer through the other router",
        Duration::from_secs(20),
        || {
            let mut v = via.clone();
            let r = as_caller(&bob, get(&submitted, false));
            async move {
                match v.get_task(r).await {
                    Err(e)
                        if e.code() == Code::NotFound && !e.message().contains("not connected") =>
                    {
                        Some(e)
                    }
                    _ => None,
                }
            }
        },
    )
    .await;
    assert!(e.message().contains("no task"), "{}", e.message());
    let fetched = via
        .get_task(as_caller(&alice, get(&submitted, false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.state(), task::State::Succeeded);
    // Alice still has it.
    let kept = c
        .get_task(as_caller(&alice, get(&submitted, false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.state(), task::State::Succeeded);
    // A token that does not list the model cannot submit a task of it.
    let scoped = token("carol", Some(vec!["other-*".into()]));
    let e = c
        .submit_task(as_caller(&scoped, submit(&[1.0], 0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("may not call model"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_router_answers_for_a_task_another_one_holds() {
    let stack::OneNode {
        node,
        admin,
        cp,
        etcd: _etcd,
    } = stack::one_node(NodeSimConfig::default(), 8).await;
    let holder = stack::router("a", cp.addr, None).await;
    let other = stack::router("b", cp.addr, None).await;
    ready(&admin, &[&holder, &other]).await;
    let (mut at_holder, mut elsewhere) = (tasks(holder.addr).await, tasks(other.addr).await);

    // Submitted at one router, waited for and fetched at the other.
    let submitted = at_holder
        .submit_task(submit(&[7.0, 8.0], 0))
        .await
        .unwrap()
        .into_inner();
    let done = fulcrum_tests::eventually(
        "the task through the other router",
        Duration::from_secs(20),
        || {
            let mut c = elsewhere.clone();
            let r = wait_at_most(&submitted, Duration::from_secs(10));
            // Until the holder is in the directory (its stream is up).
            async move { c.get_task(r).await.ok() }
        },
    )
    .await
    .into_inner();
    assert_eq!(done.state(), task::State::Succeeded, "{done:?}");
    assert_echoed(
        &echo_request("echo", &[7.0, 8.0]),
        done.response.as_ref().unwrap(),
    );
    assert_eq!(node.controls().calls(), 1);

    // A long task cancelled through the other router: its call at the node is reset.
    node.controls().set_hang_ratio(1.0).await.unwrap();
    let long = at_holder
        .submit_task(submit(&[1.0], 60_000))
        .await
        .unwrap()
        .into_inner();
    let cancelled = elsewhere.cancel_task(of(&long)).await.unwrap().into_inner();
    assert_eq!(cancelled.state(), task::State::Cancelled, "{cancelled:?}");
    in_flight_at(&node, 0, "the node's call reset").await;
    // Deleted through it: gone at the holder.
    elsewhere.delete_task(of(&submitted)).await.unwrap();
    let e = at_holder
        .get_task(get(&submitted, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The holder stops: its tasks are gone, and the other router says so (at first, perhaps,
    // that it cannot reach it; then that it is no longer connected to the control plane).
    holder.stop().await;
    let e = fulcrum_tests::eventually("the holder unlisted", Duration::from_secs(60), || {
        let mut c = elsewhere.clone();
        let r = get(&long, false);
        async move {
            match c.get_task(r).await {
                Err(e) if e.code() == Code::NotFound => Some(e),
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                    assert!(e.message().contains("cannot be reached"), "{}", e.message());
                    None
                }
                Ok(t) => panic!("a stopped router's task answered: {t:?}"),
            }
        }
    })
    .await;
    assert!(e.message().contains("is not connected"), "{}", e.message());
}
