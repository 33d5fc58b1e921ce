//! Request validation at the router: a request whose tensors cannot be right is refused with
//! INVALID_ARGUMENT here, instead of costing a node a round trip (or confusing it).
//!
//! The rules are the Open Inference Protocol's: every input has a name, a known datatype and a
//! shape of non-negative dimensions; its data is given either in `raw_input_contents` (one entry
//! per input, in order, little-endian, BYTES elements prefixed by a 4-byte little-endian length)
//! or in the typed `contents` field that matches the datatype — never both — and holds exactly
//! as many elements as the shape says.

use fulcrum_proto::inference::model_infer_request::InferInputTensor;
use fulcrum_proto::inference::{InferTensorContents, ModelInferRequest};

/// Largest element count accepted for one tensor. Bounds the shape product so it cannot
/// overflow; real tensors are far smaller than this (the message size limit binds first).
const MAX_ELEMENTS: u64 = 1 << 40;

/// Up to this many inputs, duplicate names are found by comparing every pair (at most 120
/// short string comparisons, cheaper than building a hash set); past it, with a hash set.
const PAIRWISE_INPUTS: usize = 16;

/// Size in bytes of one element of a fixed-size datatype; `None` for BYTES.
fn element_size(datatype: &str) -> Result<Option<usize>, String> {
    Ok(Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        "BYTES" => return Ok(None),
        other => return Err(format!("unknown datatype {other:?}")),
    }))
}

/// Number of elements a typed `contents` holds for `datatype`, or an error when the datatype has
/// no typed field (FP16, BF16) or another field is filled.
fn typed_len(datatype: &str, c: &InferTensorContents) -> Result<usize, String> {
    let lens = [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ];
    let field = match datatype {
        "BOOL" => "bool_contents",
        "INT8" | "INT16" | "INT32" => "int_contents",
        "INT64" => "int64_contents",
        "UINT8" | "UINT16" | "UINT32" => "uint_contents",
        "UINT64" => "uint64_contents",
        "FP32" => "fp32_contents",
        "FP64" => "fp64_contents",
        "BYTES" => "bytes_contents",
        other => {
            return Err(format!(
                "datatype {other} has no typed contents; send it in raw_input_contents"
            ));
        }
    };
    if let Some((other, _)) = lens.iter().find(|(f, n)| *f != field && *n > 0) {
        return Err(format!(
            "datatype {datatype} carries its data in {field}, not {other}"
        ));
    }
    Ok(lens
        .iter()
        .find(|(f, _)| *f == field)
        .map_or(0, |(_, n)| *n))
}

fn element_count(input: &InferInputTensor) -> Result<u64, String> {
    let mut n: u64 = 1;
    for &d in &input.shape {
        if d < 0 {
            return Err(format!("shape {:?} has a negative dimension", input.shape));
        }
        n = n
            .checked_mul(d as u64)
            .filter(|n| *n <= MAX_ELEMENTS)
            .ok_or_else(|| format!("shape {:?} is too large", input.shape))?;
    }
    Ok(n)
}

/// Counts the length-prefixed BYTES elements in raw data, or says why it is malformed.
fn raw_bytes_elements(raw: &[u8]) -> Result<u64, String> {
    let mut rest = raw;
    let mut n = 0u64;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err("BYTES data ends inside an element's 4-byte length".into());
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(format!(
                "BYTES element {n} claims {len} bytes but only {} remain",
                tail.len()
            ));
        }
        rest = &tail[len..];
        n += 1;
    }
    Ok(n)
}

/// Checks one `ModelInferRequest`; the error says exactly what is wrong.
pub fn check_infer_request(req: &ModelInferRequest) -> Result<(), String> {
    if req.model_name.is_empty() {
        return Err("model_name is required".into());
    }
    if req.inputs.is_empty() {
        return Err("the request has no inputs".into());
    }
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(format!(
            "raw_input_contents has {} entries for {} inputs; it needs one per input",
            req.raw_input_contents.len(),
            req.inputs.len()
        ));
    }
    // Duplicate names: the few inputs of a usual request are compared pairwise (no hash set
    // built on every call); a hash set only past PAIRWISE_INPUTS, where pairs grow quadratically.
    let mut names = (req.inputs.len() > PAIRWISE_INPUTS).then(std::collections::HashSet::new);
    for (i, input) in req.inputs.iter().enumerate() {
        let what = |msg: String| format!("input {:?}: {msg}", input.name);
        if input.name.is_empty() {
            return Err(format!("input #{i} has no name"));
        }
        let repeated = match &mut names {
            Some(names) => !names.insert(input.name.as_str()),
            None => req.inputs[..i].iter().any(|p| p.name == input.name),
        };
        if repeated {
            return Err(what("the name is used twice".into()));
        }
        let size = element_size(&input.datatype).map_err(what)?;
        let expected = element_count(input).map_err(what)?;
        if raw {
            if input.contents.as_ref().is_some_and(has_any) {
                return Err(what(
                    "data is given both in raw_input_contents and in contents".into(),
                ));
            }
            let data = &req.raw_input_contents[i];
            match size {
                Some(size) => {
                    let want = expected * size as u64;
                    if data.len() as u64 != want {
                        return Err(what(format!(
                            "shape {:?} of {} needs {want} bytes of raw data, got {}",
                            input.shape,
                            input.datatype,
                            data.len()
                        )));
                    }
                }
                None => {
                    let got = raw_bytes_elements(data).map_err(what)?;
                    if got != expected {
                        return Err(what(format!(
                            "shape {:?} needs {expected} BYTES elements, raw data has {got}",
                            input.shape
                        )));
                    }
                }
            }
        } else {
            let got = match &input.contents {
                Some(c) => typed_len(&input.datatype, c).map_err(what)? as u64,
                None if expected > 0 => {
                    return Err(what(
                        "has no data: send it in raw_input_contents or in contents".into(),
                    ));
                }
                None => 0,
            };
            if got != expected {
                return Err(what(format!(
                    "shape {:?} needs {expected} elements, contents has {got}",
                    input.shape
                )));
            }
        }
    }
    Ok(())
}

fn has_any(c: &InferTensorContents) -> bool {
    !(c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    fn raw_req(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "echo".into(),
            inputs,
            raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_fixed_size() {
        let ok = raw_req(vec![input("x", "FP32", &[2, 3])], vec![vec![0; 24]]);
        check_infer_request(&ok).unwrap();
        let short = raw_req(vec![input("x", "FP32", &[2, 3])], vec![vec![0; 20]]);
        let err = check_infer_request(&short).unwrap_err();
        assert!(
            err.contains("needs 24 bytes") && err.contains("got 20"),
            "{err}"
        );
        let missing = raw_req(
            vec![input("x", "FP32", &[1]), input("y", "FP32", &[1])],
            vec![vec![0; 4]],
        );
        assert!(
            check_infer_request(&missing)
                .unwrap_err()
                .contains("one per input")
        );
    }

    #[test]
    fn raw_bytes_elements_are_counted() {
        let mut data = Vec::new();
        for s in [&b"ab"[..], b"", b"xyz"] {
            data.extend_from_slice(&(s.len() as u32).to_le_bytes());
            data.extend_from_slice(s);
        }
        check_infer_request(&raw_req(
            vec![input("s", "BYTES", &[3])],
            vec![data.clone()],
        ))
        .unwrap();
        assert!(
            check_infer_request(&raw_req(
                vec![input("s", "BYTES", &[2])],
                vec![data.clone()]
            ))
            .is_err()
        );
        data.truncate(data.len() - 1);
        let err =
            check_infer_request(&raw_req(vec![input("s", "BYTES", &[3])], vec![data])).unwrap_err();
        assert!(err.contains("claims"), "{err}");
    }

    #[test]
    fn typed_contents() {
        let mut x = input("x", "INT32", &[4]);
        x.contents = Some(InferTensorContents {
            int_contents: vec![1, 2, 3, 4],
            ..Default::default()
        });
        let mut req = raw_req(vec![x.clone()], vec![]);
        check_infer_request(&req).unwrap();
        req.inputs[0].shape = vec![5];
        assert!(
            check_infer_request(&req)
                .unwrap_err()
                .contains("needs 5 elements")
        );
        // The wrong typed field for the datatype.
        x.datatype = "FP32".into();
        assert!(
            check_infer_request(&raw_req(vec![x], vec![]))
                .unwrap_err()
                .contains("fp32_contents")
        );
        // FP16 cannot be typed.
        let mut h = input("h", "FP16", &[1]);
        h.contents = Some(InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        });
        let err = check_infer_request(&raw_req(vec![h], vec![])).unwrap_err();
        assert!(err.contains("raw_input_contents"), "{err}");
        // No data at all.
        let e = input("e", "FP32", &[2]);
        assert!(
            check_infer_request(&raw_req(vec![e], vec![]))
                .unwrap_err()
                .contains("no data")
        );
    }

    #[test]
    fn structural_errors() {
        assert!(
            check_infer_request(&raw_req(vec![], vec![]))
                .unwrap_err()
                .contains("no inputs")
        );
        let bad_type = raw_req(vec![input("x", "FLOAT", &[1])], vec![vec![0; 4]]);
        assert!(
            check_infer_request(&bad_type)
                .unwrap_err()
                .contains("unknown datatype")
        );
        let neg = raw_req(vec![input("x", "FP32", &[-1])], vec![vec![]]);
        assert!(check_infer_request(&neg).unwrap_err().contains("negative"));
        let huge = raw_req(
            vec![input("x", "FP32", &[i64::MAX, i64::MAX])],
            vec![vec![]],
        );
        assert!(
            check_infer_request(&huge)
                .unwrap_err()
                .contains("too large")
        );
        let mut no_model = raw_req(vec![input("x", "FP32", &[1])], vec![vec![0; 4]]);
        no_model.model_name.clear();
        assert!(check_infer_request(&no_model).is_err());
    }

    #[test]
    fn a_name_used_twice_is_found_among_few_inputs_and_many() {
        for count in [2, PAIRWISE_INPUTS, PAIRWISE_INPUTS + 1, 3 * PAIRWISE_INPUTS] {
            let names: Vec<String> = (0..count).map(|i| format!("in{i}")).collect();
            let inputs = |names: &[String]| -> Vec<InferInputTensor> {
                names.iter().map(|n| input(n, "FP32", &[1])).collect()
            };
            let raw = vec![vec![0; 4]; count];
            assert_eq!(
                check_infer_request(&raw_req(inputs(&names), raw.clone())),
                Ok(()),
                "{count} distinct names"
            );
            // The last input repeats the first one's name.
            let mut repeated = names.clone();
            repeated[count - 1] = names[0].clone();
            let err = check_infer_request(&raw_req(inputs(&repeated), raw)).unwrap_err();
            assert!(
                err.contains("used twice") && err.contains("in0"),
                "{count}: {err}"
            );
        }
    }
}
