"""Calls Fulcrum routers with tritonclient, a stock Open Inference Protocol client nobody here
wrote, and checks every answer. Usage: tritonclient_check.py ROUTER_A ROUTER_B

Exits non-zero with a message on the first wrong answer.
"""
import queue
import sys

import grpc
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def served_by(call):
    md = dict(call.initial_metadata())
    return md.get("x-fulcrum-node"), md.get("x-fulcrum-region")


def check_router(url, region):
    c = tc.InferenceServerClient(url)
    check(c.is_server_live(), f"{url}: ServerLive")
    check(c.is_server_ready(), f"{url}: ServerReady")
    check(c.is_model_ready("echo"), f"{url}: ModelReady(echo)")
    check(not c.is_model_ready("no-such-model"), f"{url}: ModelReady(unknown) must be false")
    meta = c.get_server_metadata(as_json=True)
    check(meta["name"] == "fulcrum", f"{url}: ServerMetadata {meta}")
    mmeta = c.get_model_metadata("echo", as_json=True)
    check(mmeta["name"] == "echo", f"{url}: ModelMetadata {mmeta}")
    # The model repository index: the models the router routes, and their state.
    index = c.get_model_repository_index(as_json=True).get("models", [])
    check([(m["name"], m.get("state")) for m in index] == [("cached", "READY"), ("echo", "READY")],
          f"{url}: RepositoryIndex {index}")

    # Triton's ModelConfig: a node serving the model answers, and its configuration arrives as
    # the node encoded it (tritonclient decodes Triton's full ModelConfig message).
    cfg = c.get_model_config("echo", as_json=True).get("config", {})
    check(cfg.get("name") == "echo" and cfg.get("platform") == "fulcrum-sim",
          f"{url}: ModelConfig {cfg}")
    check([(t["name"], t["data_type"], t["dims"]) for t in cfg.get("input", [])]
          == [("*", "TYPE_STRING", ["-1"])], f"{url}: ModelConfig inputs {cfg}")
    try:
        c.get_model_config("no-such-model")
        check(False, f"{url}: ModelConfig of an unknown model answered")
    except tc.InferenceServerException as e:
        check(e.status() == "StatusCode.NOT_FOUND", f"{url}: ModelConfig(unknown) gave {e.status()}")
    # What acts on one server's own state is refused, saying so (never an empty UNIMPLEMENTED).
    for call in (lambda: c.get_inference_statistics("echo"), lambda: c.load_model("echo"),
                 lambda: c.get_system_shared_memory_status(), lambda: c.get_log_settings()):
        try:
            call()
            check(False, f"{url}: a node-local Triton call answered")
        except tc.InferenceServerException as e:
            check(e.status() == "StatusCode.UNIMPLEMENTED" and "call a node directly" in e.message(),
                  f"{url}: node-local call gave {e.status()} {e.message()!r}")

    # ModelInfer, raw contents (tritonclient's own encoding), several datatypes at once.
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.array([[1, -2, 3]], dtype=np.int64)
    s = np.array([b"hello", b"", "wörld".encode()], dtype=np.object_)
    inputs = [tc.InferInput("x", list(x.shape), "FP32"),
              tc.InferInput("y", list(y.shape), "INT64"),
              tc.InferInput("s", list(s.shape), "BYTES")]
    for i, v in zip(inputs, [x, y, s]):
        i.set_data_from_numpy(v)
    r = c.infer("echo", inputs)
    check(np.array_equal(r.as_numpy("x"), x), f"{url}: FP32 echo")
    check(np.array_equal(r.as_numpy("y"), y), f"{url}: INT64 echo")
    check(list(r.as_numpy("s")) == list(s), f"{url}: BYTES echo")

    # Triton sequences (a stateful model's requests sharing a sequence_id, integer or string):
    # node-sims keep Triton's semantics (a step of a sequence a node never saw start is refused
    # INVALID_ARGUMENT), so every step must reach the node that saw the sequence start.
    for step in range(3):
        for sid in list(range(1, 9)) + ["conv-a", "conv-b"]:
            r = c.infer("echo", inputs, sequence_id=sid, sequence_start=step == 0,
                        sequence_end=step == 2)
            check(np.array_equal(r.as_numpy("x"), x), f"{url}: sequence {sid} step {step}")

    # Compressed requests, as tritonclient sends them when asked (Triton takes both): the
    # router decompresses them and answers.
    for alg in ("gzip", "deflate"):
        r = c.infer("echo", inputs, compression_algorithm=alg)
        check(np.array_equal(r.as_numpy("x"), x) and list(r.as_numpy("s")) == list(s),
              f"{url}: {alg}-compressed echo")

    # Call priorities, as tritonclient sends any header: each one is served; one that is not a
    # priority is refused INVALID_ARGUMENT, naming what it was given.
    for p in ("critical", "normal", "sheddable"):
        r = c.infer("echo", inputs, headers={"fulcrum-priority": p})
        check(np.array_equal(r.as_numpy("x"), x), f"{url}: echo at priority {p}")
    try:
        c.infer("echo", inputs, headers={"fulcrum-priority": "urgent"})
        check(False, f"{url}: priority 'urgent' answered")
    except tc.InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT" and '"urgent"' in e.message(),
              f"{url}: priority 'urgent' gave {e.status()} {e.message()!r}")

    # ModelInfer with typed contents, through tritonclient's generated stubs, reading the
    # routing metadata.
    stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(url))
    req = pb.ModelInferRequest(model_name="echo", id="typed")
    t = req.inputs.add(name="v", datatype="FP32", shape=[2, 2])
    t.contents.fp32_contents.extend([1.5, -2.0, 3.25, 0.0])
    _, call = stub.ModelConfig.with_call(pb.ModelConfigRequest(name="echo"), timeout=5)
    node, reg = served_by(call)
    check(reg == region, f"{url}: ModelConfig served by {node} in region {reg}, expected {region}")
    resp, call = stub.ModelInfer.with_call(req, timeout=5)
    out = resp.outputs[0]
    check(out.name == "v" and list(out.shape) == [2, 2], f"{url}: typed output {out}")
    check(list(out.contents.fp32_contents) == [1.5, -2.0, 3.25, 0.0], f"{url}: typed echo")
    check(resp.id == "typed", f"{url}: request id echoed")
    node, reg = served_by(call)
    check(reg == region, f"{url}: served by {node} in region {reg}, expected region {region}")

    # Response caching (model `cached`'s policy keeps answers): the same tensors under another
    # id are answered from the router's cache, with the caller's own id (which the router
    # appends to the cached bytes: the stock parser must take the last value).
    first = pb.ModelInferRequest(model_name="cached", id="first")
    first.inputs.add(name="v", datatype="FP32", shape=[2]).contents.fp32_contents.extend([7.0, 8.0])
    r1, call = stub.ModelInfer.with_call(first, timeout=5)
    check(dict(call.initial_metadata()).get("x-fulcrum-cache") == "miss", f"{url}: first call stored")
    second = pb.ModelInferRequest()
    second.CopyFrom(first)
    second.id = "second"
    r2, call = stub.ModelInfer.with_call(second, timeout=5)
    md = dict(call.initial_metadata())
    check(md.get("x-fulcrum-cache") == "hit" and "x-fulcrum-node" not in md, f"{url}: hit {md}")
    check(r2.id == "second" and r2.outputs == r1.outputs, f"{url}: cached answer {r2}")
    r = c.infer("cached", inputs, request_id="via-tritonclient")
    r = c.infer("cached", inputs, request_id="again")
    check(r.get_response().id == "again" and np.array_equal(r.as_numpy("x"), x),
          f"{url}: tritonclient reads a cached answer")

    # Errors come back as the right gRPC status.
    try:
        c.infer("no-such-model", inputs)
        check(False, f"{url}: unknown model answered")
    except tc.InferenceServerException as e:
        check(e.status() == "StatusCode.NOT_FOUND", f"{url}: unknown model gave {e.status()}")
    bad = pb.ModelInferRequest(model_name="echo")
    bad.inputs.add(name="v", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.0])
    try:
        stub.ModelInfer(bad, timeout=5)
        check(False, f"{url}: mismatched tensor answered")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{url}: bad tensor gave {e.code()}")

    # ModelStreamInfer through tritonclient's streaming API, its requests gzip-compressed.
    answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)),
                   compression_algorithm="gzip")
    for k in range(5):
        c.async_stream_infer("echo", inputs, request_id=str(k))
    ids = set()
    for _ in range(5):
        result, error = answers.get(timeout=10)
        check(error is None, f"{url}: stream error {error}")
        check(np.array_equal(result.as_numpy("x"), x), f"{url}: stream echo")
        ids.add(result.get_response().id)
    check(ids == {str(k) for k in range(5)}, f"{url}: stream ids {ids}")
    c.stop_stream()
    c.close()
    print(f"ok: {url} (region {region})")


if __name__ == "__main__":
    check_router(sys.argv[1], "a")
    check_router(sys.argv[2], "b")
