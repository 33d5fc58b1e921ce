"""A small real model for MLServer: `Doubler` returns each FP32 input tensor times two, under the
input's own name, with the input's shape. Used by tests/tests/mlserver.rs, which writes an
MLServer model repository whose model-settings.json names `mlserver_model.Doubler` and puts this
folder on PYTHONPATH.

Inputs of any datatype other than FP32 are refused with MLServer's own `InferenceError` (gRPC
INVALID_ARGUMENT), so error mapping through a router can be checked against a real server.

A request carrying the gRPC metadata `x-test-tag` (MLServer hands a model its request's metadata
as `parameters.headers`) is answered with a response parameter `tag-seen` holding its value, and
with the response metadata `x-tag-echo` (MLServer sends a model's `parameters.headers` as
trailing metadata), so a client can check that metadata travels both ways through a router.

`predict_stream` answers every request of a stream (MLServer's default answers only the first),
so a `ModelStreamInfer` stream carries many requests, as Triton's does.
"""
from typing import AsyncIterator

import numpy as np

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, Parameters


class Doubler(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = []
        for inp in payload.inputs:
            if inp.datatype != "FP32":
                raise InferenceError(
                    f"doubler takes FP32 inputs; input {inp.name} is {inp.datatype}"
                )
            x = NumpyCodec.decode_input(inp)
            y = (x * 2).astype(np.float32).reshape(inp.shape)
            outputs.append(NumpyCodec.encode_output(inp.name, y))
        headers = (payload.parameters.headers if payload.parameters else None) or {}
        tag = headers.get("x-test-tag")
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=outputs,
            parameters=(Parameters(**{"tag-seen": tag}, headers={"x-tag-echo": tag})
                        if tag is not None else None),
        )

    async def predict_stream(
        self, payloads: AsyncIterator[InferenceRequest]
    ) -> AsyncIterator[InferenceResponse]:
        async for payload in payloads:
            yield await self.predict(payload)
