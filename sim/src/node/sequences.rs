//! Triton's sequence semantics, as the simulated node keeps them: a request carrying a
//! `sequence_id` parameter (a non-zero integer or a non-empty string) belongs to a sequence
//! whose state lives on the server that saw its start. A request with `sequence_start` opens
//! (or restarts) it, one with `sequence_end` closes it, and a request of a sequence this node
//! never saw start is refused with INVALID_ARGUMENT and Triton's message, as Triton refuses
//! it. So a router that sends a sequence's requests to different nodes fails calls, as it
//! would in front of real Triton servers.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use fulcrum_proto::inference::ModelInferRequest;
use fulcrum_proto::inference::infer_parameter::ParameterChoice;
use tonic::Status;

/// Most sequences open at once on a node: bounds what clients can make it remember (a Triton
/// server is bounded by its sequence slots and idle timeout; the simulator has neither). Far
/// above what any test or benchmark opens.
const MAX_OPEN: usize = 65_536;

/// A sequence's id: Triton keeps integer and string ids apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Id {
    Int(u64),
    Str(String),
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Int(v) => write!(f, "{v}"),
            Id::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// What a request says about its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    model: String,
    id: Id,
    start: bool,
    end: bool,
}

impl Step {
    /// The sequence step `request` is, if it belongs to a sequence.
    pub(crate) fn of(request: &ModelInferRequest) -> Option<Self> {
        let choice = |name: &str| {
            request
                .parameters
                .get(name)
                .and_then(|p| p.parameter_choice.as_ref())
        };
        let id = match choice("sequence_id")? {
            ParameterChoice::Int64Param(v) if *v != 0 => Id::Int(*v as u64),
            ParameterChoice::Uint64Param(v) if *v != 0 => Id::Int(*v),
            ParameterChoice::StringParam(s) if !s.is_empty() => Id::Str(s.clone()),
            _ => return None,
        };
        let flag = |name| matches!(choice(name), Some(ParameterChoice::BoolParam(true)));
        Some(Self {
            model: request.model_name.clone(),
            id,
            start: flag("sequence_start"),
            end: flag("sequence_end"),
        })
    }
}

/// The sequences open on a node.
#[derive(Debug, Default)]
pub(crate) struct Sequences {
    open: Mutex<HashSet<(String, Id)>>,
}

impl Sequences {
    /// Applies `step` on node `node`: opens, continues or closes its sequence, or refuses it.
    pub(crate) fn apply(&self, node: &str, step: Step) -> Result<(), Status> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (step.model, step.id);
        if step.start {
            if !open.contains(&key) && open.len() >= MAX_OPEN {
                return Err(Status::resource_exhausted(format!(
                    "node {node} has {MAX_OPEN} sequences open, the most it keeps"
                )));
            }
            open.insert(key.clone());
        } else if !open.contains(&key) {
            return Err(Status::invalid_argument(format!(
                "inference request for sequence {} to model '{}' must specify the START flag \
                 on the first request of the sequence",
                key.1, key.0
            )));
        }
        if step.end {
            open.remove(&key);
        }
        Ok(())
    }

    /// How many sequences are open.
    pub(crate) fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_proto::inference::InferParameter;

    fn step(id: ParameterChoice, start: bool, end: bool) -> Option<Step> {
        let mut r = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        };
        let p = |c| InferParameter {
            parameter_choice: Some(c),
        };
        r.parameters.insert("sequence_id".into(), p(id));
        r.parameters.insert(
            "sequence_start".into(),
            p(ParameterChoice::BoolParam(start)),
        );
        r.parameters
            .insert("sequence_end".into(), p(ParameterChoice::BoolParam(end)));
        Step::of(&r)
    }

    #[test]
    fn a_sequence_opens_continues_and_closes() {
        let s = Sequences::default();
        let id = || ParameterChoice::Uint64Param(9);
        let err = s.apply("n", step(id(), false, false).unwrap()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .contains("sequence 9 to model 'm' must specify the START flag")
        );
        s.apply("n", step(id(), true, false).unwrap()).unwrap();
        s.apply("n", step(id(), false, false).unwrap()).unwrap();
        assert_eq!(s.len(), 1);
        s.apply("n", step(id(), false, true).unwrap()).unwrap();
        assert_eq!(s.len(), 0);
        assert!(s.apply("n", step(id(), false, false).unwrap()).is_err());
        // A string id is another sequence than the integer of the same digits.
        s.apply(
            "n",
            step(ParameterChoice::Int64Param(9), true, false).unwrap(),
        )
        .unwrap();
        let str9 = step(ParameterChoice::StringParam("9".into()), false, false).unwrap();
        assert!(s.apply("n", str9).is_err());
    }

    #[test]
    fn no_id_no_sequence() {
        assert_eq!(step(ParameterChoice::Int64Param(0), true, false), None);
        assert_eq!(
            step(ParameterChoice::StringParam(String::new()), true, false),
            None
        );
        assert_eq!(
            Step::of(&ModelInferRequest::default()),
            None,
            "no parameters"
        );
    }
}
