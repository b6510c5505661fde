//! Client histories: invoke/return events with virtual timestamps, recorded by client actors
//! through [`crate::Ctx::invoke`] and [`crate::Ctx::complete`], exposed as plain data for a
//! linearizability checker (which this crate does not depend on).

use std::any::Any;
use std::fmt::Debug;

use crate::{NodeId, SimTime};

/// Identifies one client operation in a simulation's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// One client operation, as recorded. `output`/`returned_at` are `None` for an operation that
/// never returned (the client crashed or gave up): a checker must treat it as possibly taking
/// effect at any time after `called_at`.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation<I, O> {
    /// The client node that invoked it.
    pub client: NodeId,
    /// Its id, unique in the simulation, in invocation order.
    pub op: OpId,
    /// What the client asked for.
    pub input: I,
    /// Virtual time of the invocation.
    pub called_at: SimTime,
    /// What the client got back, if it returned.
    pub output: Option<O>,
    /// Virtual time of the return, if it returned.
    pub returned_at: Option<SimTime>,
}

/// A value the history can hold: any `Debug + Clone + 'static` type, stored type-erased so
/// that `Sim` needs no extra type parameter.
pub(crate) trait HistoryValue: Debug {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Debug + 'static> HistoryValue for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

pub(crate) struct Record {
    pub(crate) client: NodeId,
    pub(crate) called_at: SimTime,
    pub(crate) input: Box<dyn HistoryValue>,
    pub(crate) output: Option<(SimTime, Box<dyn HistoryValue>)>,
}

/// Why the recorded history could not be read as the requested types.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// An input or output was recorded with another type.
    #[error("operation {op} was recorded with a {what} of another type than requested")]
    TypeMismatch {
        /// The operation.
        op: u64,
        /// "input" or "output".
        what: &'static str,
    },
}

#[derive(Default)]
pub(crate) struct History {
    pub(crate) records: Vec<Record>,
}

impl History {
    pub(crate) fn invoke(
        &mut self,
        client: NodeId,
        at: SimTime,
        input: Box<dyn HistoryValue>,
    ) -> OpId {
        let op = OpId(self.records.len() as u64);
        self.records.push(Record {
            client,
            called_at: at,
            input,
            output: None,
        });
        op
    }

    /// Records the return; false if the op is unknown, belongs to another client, or has
    /// already returned.
    pub(crate) fn complete(
        &mut self,
        client: NodeId,
        op: OpId,
        at: SimTime,
        output: Box<dyn HistoryValue>,
    ) -> bool {
        match self.records.get_mut(op.0 as usize) {
            Some(r) if r.client == client && r.output.is_none() => {
                r.output = Some((at, output));
                true
            }
            _ => false,
        }
    }

    pub(crate) fn typed<I: Clone + 'static, O: Clone + 'static>(
        &self,
    ) -> Result<Vec<Operation<I, O>>, HistoryError> {
        self.records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let op = i as u64;
                let input = (*r.input)
                    .as_any()
                    .downcast_ref::<I>()
                    .ok_or(HistoryError::TypeMismatch { op, what: "input" })?
                    .clone();
                let (output, returned_at) = match &r.output {
                    Some((at, o)) => (
                        Some(
                            (**o)
                                .as_any()
                                .downcast_ref::<O>()
                                .ok_or(HistoryError::TypeMismatch { op, what: "output" })?
                                .clone(),
                        ),
                        Some(*at),
                    ),
                    None => (None, None),
                };
                Ok(Operation {
                    client: r.client,
                    op: OpId(op),
                    input,
                    called_at: r.called_at,
                    output,
                    returned_at,
                })
            })
            .collect()
    }
}
