"""Calls a Fulcrum router in front of MLServer and node-sims with stock clients nobody here wrote:
tritonclient (Triton's Python client) and MLServer's own generated gRPC stubs. Checks every Open
Inference Protocol RPC that MLServer serves, through the router, against the real model's
answers (the `doubler` model of mlserver_model.py doubles its FP32 input) and against what
MLServer answers when called directly. (ServerLive, ServerReady and ServerMetadata are the
router's own answers; ModelReady, ModelMetadata, ModelInfer and ModelStreamInfer reach
MLServer.)

Usage: mlserver_check.py tritonclient|mlserver-stubs ROUTER MLSERVER_GRPC MLSERVER_NODE_ID

Model `doubler` is served only by MLServer (registered as MLSERVER_NODE_ID), model `echo` only
by node-sims. Exits non-zero with a message on the first wrong answer. The two clients run in
separate processes: their generated modules both register `inference.*` in protobuf's default
pool, which refuses the second.
"""
import queue
import struct
import sys

import grpc
import numpy as np

TIMEOUT = 10  # seconds, for every call: nothing here may hang


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def served_by(call):
    md = dict(call.initial_metadata())
    return md.get("x-fulcrum-node"), md.get("x-fulcrum-region")


def status_of(f):
    import tritonclient.grpc as tc

    try:
        f()
    except tc.InferenceServerException as e:
        return e.status(), e.message()
    except grpc.RpcError as e:
        return str(e.code()), e.details()
    return None, None


def with_tritonclient(router, mlserver, ml_node):
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    c = tc.InferenceServerClient(router)
    direct = tc.InferenceServerClient(mlserver)

    # Health and readiness, as a load balancer or tritonclient's users ask them.
    check(c.is_server_live(client_timeout=TIMEOUT), "ServerLive")
    check(c.is_server_ready(client_timeout=TIMEOUT), "ServerReady")
    check(c.is_model_ready("doubler", client_timeout=TIMEOUT), "ModelReady(doubler), on MLServer")
    check(c.is_model_ready("echo", client_timeout=TIMEOUT), "ModelReady(echo), on node-sims")
    check(not c.is_model_ready("no-such-model", client_timeout=TIMEOUT),
          "ModelReady(unknown) must be false")
    print("ok: ServerLive, ServerReady, ModelReady")

    # ModelMetadata as tritonclient sees it (Triton's protocol has no `parameters` in it; the
    # MLServer-stubs mode checks those).
    meta = c.get_model_metadata("doubler", as_json=True, client_timeout=TIMEOUT)
    check(meta == direct.get_model_metadata("doubler", as_json=True, client_timeout=TIMEOUT),
          f"ModelMetadata(doubler) via router differs from MLServer's: {meta}")
    check(meta["name"] == "doubler" and meta["platform"] == "fulcrum-test"
          and meta["versions"] == ["doubler/1"], f"ModelMetadata(doubler) {meta}")
    check([(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
          == [("x", "FP32", ["-1", "-1"])], f"ModelMetadata(doubler) inputs {meta['inputs']}")
    echo_meta = c.get_model_metadata("echo", as_json=True, client_timeout=TIMEOUT)
    check(echo_meta["name"] == "echo", f"ModelMetadata(echo) {echo_meta}")
    print("ok: ModelMetadata")

    # Triton's ModelConfig: MLServer does not implement it; the router asks MLServer and passes
    # its answer on (the same status as calling MLServer directly), promptly.
    via = status_of(lambda: c.get_model_config("doubler", client_timeout=TIMEOUT))
    own = status_of(lambda: direct.get_model_config("doubler", client_timeout=TIMEOUT))
    check(via[0] == own[0] == "StatusCode.UNIMPLEMENTED",
          f"ModelConfig(doubler) via router {via}, MLServer directly {own}")
    print("ok: ModelConfig")

    # ModelInfer with raw contents, as tritonclient sends them: the real model's answers.
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = c.infer("doubler", [inp], request_id="raw-1", client_timeout=TIMEOUT)
    check(np.array_equal(r.as_numpy("x"), 2 * x), f"doubler: {r.as_numpy('x')} for {x}")
    check(r.get_response().id == "raw-1", "doubler: request id")
    check(r.get_response().model_name == "doubler", "doubler: model name")
    e = c.infer("echo", [inp], client_timeout=TIMEOUT)
    check(np.array_equal(e.as_numpy("x"), x), "echo (node-sim) answers its input")

    # The caller's metadata reaches the model through the router (MLServer hands it to the
    # model, which answers with what it saw), as it does when MLServer is called directly.
    def tag_seen(client):
        r = client.infer("doubler", [inp], headers={"x-test-tag": "t-1"}, client_timeout=TIMEOUT)
        p = r.get_response().parameters.get("tag-seen")
        return p.string_param if p is not None else None
    check(tag_seen(direct) == "t-1", f"MLServer directly saw tag {tag_seen(direct)!r}")
    check(tag_seen(c) == "t-1", f"MLServer through the router saw tag {tag_seen(c)!r}")
    # ... and the metadata the model answers with reaches the caller (MLServer sends it as
    # trailing metadata; a router may pass a unary answer's trailers on with its headers).
    def echoed(target):
        s = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(target))
        req = pb.ModelInferRequest(model_name="doubler")
        req.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
        _, call = s.ModelInfer.with_call(req, timeout=TIMEOUT, metadata=[("x-test-tag", "t-2")])
        return (dict(call.initial_metadata()) | dict(call.trailing_metadata())).get("x-tag-echo")
    check(echoed(mlserver) == "t-2", f"MLServer directly answered tag {echoed(mlserver)!r}")
    check(echoed(router) == "t-2", f"MLServer through the router answered tag {echoed(router)!r}")

    # The same request through the router and directly get the same answer, field for field.
    stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(router))
    raw = pb.ModelInferRequest(model_name="doubler", id="cmp")
    raw.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    raw.raw_input_contents.append(np.array([1, -2, 3.5, 0], dtype=np.float32).tobytes())
    via, call = stub.ModelInfer.with_call(raw, timeout=TIMEOUT)
    want = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(mlserver)).ModelInfer(
        raw, timeout=TIMEOUT)
    check(via == want, f"ModelInfer via router {via} != MLServer's {want}")
    check(served_by(call) == (ml_node, "a"), f"doubler served by {served_by(call)}")

    # Typed contents: MLServer answers in typed contents too.
    typed = pb.ModelInferRequest(model_name="doubler", id="typed")
    typed.inputs.add(name="v", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
        [1.5, -2.0, 0.25])
    resp = stub.ModelInfer(typed, timeout=TIMEOUT)
    out = resp.outputs[0]
    check(out.name == "v" and list(out.shape) == [1, 3] and out.datatype == "FP32",
          f"typed output {out}")
    check(list(out.contents.fp32_contents) == [3.0, -4.0, 0.5], f"typed doubling {out}")
    check(resp.id == "typed", "typed: request id")

    # Both models, interleaved: each is served by its own kind of node.
    for k in range(10):
        model = "doubler" if k % 2 == 0 else "echo"
        _, call = stub.ModelInfer.with_call(
            pb.ModelInferRequest(model_name=model, inputs=raw.inputs,
                                 raw_input_contents=raw.raw_input_contents), timeout=TIMEOUT)
        node, region = served_by(call)
        check(region == "a", f"{model} served in region {region}")
        check((node == ml_node) == (model == "doubler"), f"{model} served by {node}")
    print("ok: ModelInfer (raw and typed contents, MLServer and node-sims behind one router)")

    # Errors: MLServer's own (the model refuses INT64) pass through with their code and
    # message; the router's own checks answer before any node is asked.
    y = tc.InferInput("y", [1, 2], "INT64")
    y.set_data_from_numpy(np.array([[1, 2]], dtype=np.int64))
    got = status_of(lambda: c.infer("doubler", [y], client_timeout=TIMEOUT))
    want = status_of(lambda: direct.infer("doubler", [y], client_timeout=TIMEOUT))
    check(want[0] == "StatusCode.INVALID_ARGUMENT", f"MLServer itself gave {want}")
    check(got == want, f"model error via router {got}, from MLServer {want}")
    got = status_of(lambda: c.infer("no-such-model", [inp], client_timeout=TIMEOUT))
    check(got[0] == "StatusCode.NOT_FOUND", f"unknown model gave {got}")
    bad = pb.ModelInferRequest(model_name="doubler")
    bad.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.0])
    got = status_of(lambda: stub.ModelInfer(bad, timeout=TIMEOUT))
    check(got[0] == "StatusCode.INVALID_ARGUMENT", f"mismatched tensor gave {got}")
    print("ok: errors (MLServer's INVALID_ARGUMENT passed through, NOT_FOUND, INVALID_ARGUMENT)")

    # ModelStreamInfer through tritonclient's streaming API: MLServer streams bare
    # ModelInferResponse messages; the router turns them into Triton's ModelStreamInferResponse.
    # One client stream carries both models (MLServer and a node-sim) and a refused request.
    answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)),
                   stream_timeout=TIMEOUT, headers={"x-test-tag": "s-1"})
    for k in range(5):
        c.async_stream_infer("doubler", [inp], request_id=f"d{k}")
        c.async_stream_infer("echo", [inp], request_id=f"e{k}")
    doubled, echoed = [], set()
    for _ in range(10):
        result, error = answers.get(timeout=TIMEOUT)
        check(error is None, f"stream error {error}")
        rid = result.get_response().id
        if result.get_response().model_name == "doubler":
            check(np.array_equal(result.as_numpy("x"), 2 * x), f"stream doubler answer {rid}")
            seen = result.get_response().parameters.get("tag-seen")
            check(seen is not None and seen.string_param == "s-1",
                  f"stream metadata did not reach MLServer's model: {seen}")
            doubled.append(rid)
        else:
            check(np.array_equal(result.as_numpy("x"), x), f"stream echo answer {rid}")
            echoed.add(rid)
    # MLServer stamps every answer of a stream with the id of the stream's first request.
    check(len(doubled) == 5 and set(doubled) <= {f"d{k}" for k in range(5)},
          f"stream doubler ids {doubled}")
    check(echoed == {f"e{k}" for k in range(5)}, f"stream echo ids {echoed}")

    # A request MLServer refuses ends its upstream stream (MLServer aborts the whole stream):
    # the error comes back in-band, and the next request is served on a new upstream.
    c.async_stream_infer("doubler", [y], request_id="bad")
    result, error = answers.get(timeout=TIMEOUT)
    check(error is not None and "INT64" in str(error), f"stream refusal {result} {error}")
    for k in range(3):
        c.async_stream_infer("doubler", [inp], request_id=f"again{k}")
        result, error = answers.get(timeout=TIMEOUT)
        check(error is None, f"stream after a refusal: {error}")
        check(np.array_equal(result.as_numpy("x"), 2 * x), "stream after a refusal: answer")
    c.stop_stream()
    print("ok: ModelStreamInfer (tritonclient stream over MLServer and node-sims, in-band errors)")
    c.close()
    direct.close()


def with_mlserver_stubs(router, mlserver, ml_node):
    """MLServer's own client stubs know its extra fields (`parameters` in ModelMetadataResponse
    and its TensorMetadata): through the router, every field MLServer sends must arrive."""
    from mlserver.grpc import dataplane_pb2 as mpb
    from mlserver.grpc import dataplane_pb2_grpc as mpbg

    ml_stub = mpbg.GRPCInferenceServiceStub(grpc.insecure_channel(router))
    ml_direct = mpbg.GRPCInferenceServiceStub(grpc.insecure_channel(mlserver))
    req = mpb.ModelMetadataRequest(name="doubler")
    via, call = ml_stub.ModelMetadata.with_call(req, timeout=TIMEOUT)
    want = ml_direct.ModelMetadata(req, timeout=TIMEOUT)
    check(via == want, f"ModelMetadata via router {via} != MLServer's {want}")
    check(via.parameters["content_type"].string_param == "np",
          f"ModelMetadata parameters lost: {via}")
    check(via.inputs[0].parameters["content_type"].string_param == "np",
          f"ModelMetadata tensor parameters lost: {via}")
    check(served_by(call) == (ml_node, "a"), f"ModelMetadata served by {served_by(call)}")

    infer = mpb.ModelInferRequest(model_name="doubler", id="stubs")
    t = infer.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    t.parameters["content_type"].string_param = "np"
    infer.raw_input_contents.append(struct.pack("<2f", 1.0, -2.0))
    via, call = ml_stub.ModelInfer.with_call(infer, timeout=TIMEOUT)
    check(via == ml_direct.ModelInfer(infer, timeout=TIMEOUT),
          f"ModelInfer via router differs from MLServer's: {via}")
    check(via.raw_output_contents[0] == struct.pack("<2f", 2.0, -4.0),
          f"doubled (MLServer stubs): {via}")
    check(served_by(call) == (ml_node, "a"), f"ModelInfer served by {served_by(call)}")
    print("ok: MLServer stubs: ModelMetadata with parameters, ModelInfer")


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:5]
    {"tritonclient": with_tritonclient, "mlserver-stubs": with_mlserver_stubs}[mode](*args)
