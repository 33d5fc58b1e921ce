//! Building Open Inference Protocol requests and reading Fulcrum's response metadata.

use fulcrum_proto::inference::model_infer_request::InferInputTensor;
use fulcrum_proto::inference::{ModelInferRequest, ModelInferResponse};
use tonic::metadata::MetadataMap;

/// Little-endian bytes of `values`, as `raw_input_contents` carries FP32 data.
pub fn raw_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A `ModelInferRequest` for `model` with one FP32 input `INPUT0` of shape `[1, n]` in raw form.
pub fn echo_request(model: &str, values: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        id: "test".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, values.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw_f32(values).into()],
        ..Default::default()
    }
}

/// Asserts that `resp` echoes `req`'s raw input tensors exactly.
pub fn assert_echoed(req: &ModelInferRequest, resp: &ModelInferResponse) {
    assert_eq!(resp.outputs.len(), req.inputs.len(), "one output per input");
    for (i, (out, inp)) in resp.outputs.iter().zip(&req.inputs).enumerate() {
        assert_eq!(out.name, inp.name);
        assert_eq!(out.datatype, inp.datatype);
        assert_eq!(out.shape, inp.shape);
        assert_eq!(
            resp.raw_output_contents[i], req.raw_input_contents[i],
            "tensor {i} data"
        );
    }
}

/// `(node, region)` from Fulcrum's response metadata.
pub fn served_by(md: &MetadataMap) -> (String, String) {
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (get("x-fulcrum-node"), get("x-fulcrum-region"))
}
