"""A stock gRPC client (grpcio, from PyPI) uses a router's background calls the seed article's
way: submit, get a task id, poll until the task is done; then once more with one long poll.

The messages come from Fulcrum's .proto files at run time (a descriptor set protoc wrote), not
from code generated here, so nothing of Fulcrum's own is on the client side but its protocol.

With a second router (OTHER_ROUTER), a task submitted to the first is fetched, waited for and
deleted through the other, as a client behind a load balancer would (any router answers for
any router's task).

Usage: tasks_check.py ROUTER DESCRIPTOR_SET [OTHER_ROUTER]
"""

import struct
import sys
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

router, descriptors = sys.argv[1], sys.argv[2]
other_router = sys.argv[3] if len(sys.argv) > 3 else None
with open(descriptors, "rb") as f:
    files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
pool = descriptor_pool.DescriptorPool()
for file in files.file:
    pool.Add(file)


def message(name):
    descriptor = pool.FindMessageTypeByName(name)
    try:
        return message_factory.GetMessageClass(descriptor)
    except AttributeError:  # protobuf before 4.22
        return message_factory.MessageFactory(pool).GetPrototype(descriptor)


SubmitTaskRequest = message("fulcrum.v1.SubmitTaskRequest")
GetTaskRequest = message("fulcrum.v1.GetTaskRequest")
TaskRef = message("fulcrum.v1.TaskRef")
Task = message("fulcrum.v1.Task")
DeleteTaskResponse = message("fulcrum.v1.DeleteTaskResponse")
STATE = {v.name: v.number for v in Task.DESCRIPTOR.enum_types_by_name["State"].values}

def rpc(method, response, channel=grpc.insecure_channel(router)):
    return channel.unary_unary(
        f"/fulcrum.v1.Tasks/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


submit = rpc("SubmitTask", Task)
get = rpc("GetTask", Task)
delete = rpc("DeleteTask", DeleteTaskResponse)


def echo(values):
    request = SubmitTaskRequest()
    r = request.request
    r.model_name = "echo"
    tensor = r.inputs.add()
    tensor.name = "INPUT0"
    tensor.datatype = "FP32"
    tensor.shape.extend([1, len(values)])
    r.raw_input_contents.append(struct.pack(f"<{len(values)}f", *values))
    return request


def check_answer(task, values):
    assert task.state == STATE["SUCCEEDED"], task
    out = task.response.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("INPUT0", "FP32", [1, len(values)]), out
    got = struct.unpack(f"<{len(values)}f", task.response.raw_output_contents[0])
    assert list(got) == values, got
    assert task.headers["x-fulcrum-region"] == "a", dict(task.headers)


# The seed's loop: submit, then ask every 50 ms until done (bounded: 30 s).
values = [1.0, 2.0, 3.0, 4.0]
task = submit(echo(values), timeout=10)
assert "@" in task.task_id and task.model_name == "echo", task
end = time.monotonic() + 30
polls = 0
while True:
    polled = get(GetTaskRequest(task_id=task.task_id), timeout=10)
    polls += 1
    if polled.state != STATE["RUNNING"]:
        break
    assert time.monotonic() < end, "the task did not end in 30 s"
    time.sleep(0.05)
check_answer(polled, values)
delete(TaskRef(task_id=task.task_id), timeout=10)

# One long poll instead of the loop.
values = [5.0, 6.0]
task = submit(echo(values), timeout=10)
check_answer(get(GetTaskRequest(task_id=task.task_id, wait=True), timeout=20), values)

# Errors are gRPC statuses a stock client reads.
for task_id, code in [("nope", grpc.StatusCode.INVALID_ARGUMENT),
                      ("0" * 32 + "@" + task.task_id.split("@", 1)[1], grpc.StatusCode.NOT_FOUND)]:
    try:
        get(GetTaskRequest(task_id=task_id), timeout=10)
        raise AssertionError(f"{task_id!r} was answered")
    except grpc.RpcError as e:
        assert e.code() == code, (task_id, e.code(), e.details())
try:
    submit(SubmitTaskRequest(), timeout=10)
    raise AssertionError("a submission without a request was accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert "request is missing" in e.details(), e.details()

if other_router is not None:
    # Submitted to one router, answered by another: a long poll, then a delete, through it.
    via = grpc.insecure_channel(other_router)
    get_via, delete_via = rpc("GetTask", Task, via), rpc("DeleteTask", DeleteTaskResponse, via)
    values = [7.0, 8.0, 9.0]
    task = submit(echo(values), timeout=10)
    check_answer(get_via(GetTaskRequest(task_id=task.task_id, wait=True), timeout=20), values)
    delete_via(TaskRef(task_id=task.task_id), timeout=10)
    try:
        get(GetTaskRequest(task_id=task.task_id), timeout=10)
        raise AssertionError("a task deleted through the other router is still there")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
    print("ok: the other router answered for the task")

print(f"ok: polled {polls} times, long poll answered")
