//! Histories: the operations clients invoked, with their answers and times.

use std::collections::BTreeSet;

/// Identifies a client (a process, a session, a Jepsen `:process`). Only used for display: the
/// checker relates operations by their times, not by client.
pub type ClientId = u64;

/// A point in time, in any unit the recorder likes (nanoseconds, simulator ticks, line numbers),
/// as long as one history uses one clock. Operation `a` precedes `b` exactly when
/// `a` returned strictly before `b` was invoked; equal times are concurrent.
pub type Time = u64;

/// Identifies an operation of a [`History`]: its index in [`History::ops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub usize);

impl std::fmt::Display for OpId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<O> {
    /// The client got an answer.
    Returned {
        /// The answer.
        output: O,
        /// When the answer arrived.
        at: Time,
    },
    /// The outcome is unknown (timeout, crash, never answered): the operation may take effect at
    /// any point after its invocation, or never, and any answer is accepted. The checker places
    /// its return after every other event.
    Unknown,
    /// The operation is known not to have taken effect and has no answer to check (for example a
    /// write refused before it reached the system); the checker ignores it.
    Discarded,
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// Who invoked it.
    pub client: ClientId,
    /// What was asked.
    pub input: I,
    /// When it was invoked.
    pub invoked_at: Time,
    /// How it ended.
    pub outcome: Outcome<O>,
}

impl<I, O> Operation<I, O> {
    /// The answer, if there is one.
    pub fn output(&self) -> Option<&O> {
        match &self.outcome {
            Outcome::Returned { output, .. } => Some(output),
            Outcome::Unknown | Outcome::Discarded => None,
        }
    }

    /// When the answer arrived; `None` for an unknown or discarded outcome.
    pub fn returned_at(&self) -> Option<Time> {
        match &self.outcome {
            Outcome::Returned { at, .. } => Some(*at),
            Outcome::Unknown | Outcome::Discarded => None,
        }
    }
}

/// A finished history: every operation, in invocation order of recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History<I, O> {
    ops: Vec<Operation<I, O>>,
}

impl<I, O> History<I, O> {
    /// Every operation; [`OpId`] `i` is `ops()[i]`.
    pub fn ops(&self) -> &[Operation<I, O>] {
        &self.ops
    }

    /// The operation `id`, if it exists.
    pub fn op(&self, id: OpId) -> Option<&Operation<I, O>> {
        self.ops.get(id.0)
    }

    /// The number of operations (discarded ones included).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the history has no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl<I, O> From<Vec<Operation<I, O>>> for History<I, O> {
    fn from(ops: Vec<Operation<I, O>>) -> Self {
        History { ops }
    }
}

/// Errors of [`HistoryBuilder`]: the recorder misused it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The id was never returned by [`HistoryBuilder::invoke`].
    #[error("operation {0} does not exist")]
    UnknownOp(OpId),
    /// The operation was already completed or discarded.
    #[error("operation {0} was already completed or discarded")]
    AlreadyClosed(OpId),
    /// The answer is dated before the invocation.
    #[error("operation {op} returned at {returned_at}, before its invocation at {invoked_at}")]
    ReturnBeforeInvoke {
        /// The operation.
        op: OpId,
        /// Its invocation time.
        invoked_at: Time,
        /// The return time given.
        returned_at: Time,
    },
}

/// Records a history as it happens: [`invoke`](Self::invoke) when a client sends a request,
/// [`complete`](Self::complete) when it gets the answer. Operations still open at
/// [`build`](Self::build) have an unknown outcome.
#[derive(Debug, Clone)]
pub struct HistoryBuilder<I, O> {
    ops: Vec<Operation<I, O>>,
    open: BTreeSet<usize>,
}

impl<I, O> Default for HistoryBuilder<I, O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I, O> HistoryBuilder<I, O> {
    /// An empty history.
    pub fn new() -> Self {
        HistoryBuilder {
            ops: Vec::new(),
            open: BTreeSet::new(),
        }
    }

    /// Records that `client` invoked `input` at `time`; returns the operation's id.
    pub fn invoke(&mut self, client: ClientId, input: I, time: Time) -> OpId {
        let id = self.ops.len();
        self.ops.push(Operation {
            client,
            input,
            invoked_at: time,
            outcome: Outcome::Unknown,
        });
        self.open.insert(id);
        OpId(id)
    }

    /// Records that operation `id` answered `output` at `time`.
    pub fn complete(&mut self, id: OpId, output: O, time: Time) -> Result<(), HistoryError> {
        if let Some(op) = self.ops.get(id.0) {
            if time < op.invoked_at {
                return Err(HistoryError::ReturnBeforeInvoke {
                    op: id,
                    invoked_at: op.invoked_at,
                    returned_at: time,
                });
            }
        }
        let op = self.take_open(id)?;
        op.outcome = Outcome::Returned { output, at: time };
        Ok(())
    }

    /// Records that operation `id` certainly did not take effect and has no answer to check (for
    /// example a request refused before it reached the system). Do not use it for timeouts: leave
    /// those open (or call [`unknown`](Self::unknown)).
    pub fn discard(&mut self, id: OpId) -> Result<(), HistoryError> {
        let op = self.take_open(id)?;
        op.outcome = Outcome::Discarded;
        Ok(())
    }

    /// Records that operation `id` will never get an answer (timeout, crash): its outcome is
    /// unknown. Same as leaving it open, but closes it so a second answer is an error.
    pub fn unknown(&mut self, id: OpId) -> Result<(), HistoryError> {
        self.take_open(id)?;
        Ok(())
    }

    /// Whether operation `id` is still waiting for its answer.
    pub fn is_open(&self, id: OpId) -> bool {
        self.open.contains(&id.0)
    }

    /// The history so far; open operations have an unknown outcome.
    pub fn build(self) -> History<I, O> {
        History { ops: self.ops }
    }

    fn take_open(&mut self, id: OpId) -> Result<&mut Operation<I, O>, HistoryError> {
        if id.0 >= self.ops.len() {
            return Err(HistoryError::UnknownOp(id));
        }
        if !self.open.remove(&id.0) {
            return Err(HistoryError::AlreadyClosed(id));
        }
        Ok(&mut self.ops[id.0])
    }
}

/// A [`HistoryBuilder`] that many threads or tasks can record into at once (real clients each
/// holding a clone). Times must still come from one clock, for example `Instant`s converted to
/// nanoseconds since a common start.
#[derive(Debug)]
pub struct SharedHistoryBuilder<I, O> {
    inner: std::sync::Arc<std::sync::Mutex<HistoryBuilder<I, O>>>,
}

impl<I, O> Clone for SharedHistoryBuilder<I, O> {
    fn clone(&self) -> Self {
        SharedHistoryBuilder {
            inner: std::sync::Arc::clone(&self.inner),
        }
    }
}

impl<I, O> Default for SharedHistoryBuilder<I, O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I, O> SharedHistoryBuilder<I, O> {
    /// An empty history.
    pub fn new() -> Self {
        SharedHistoryBuilder {
            inner: std::sync::Arc::new(std::sync::Mutex::new(HistoryBuilder::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HistoryBuilder<I, O>> {
        // A recorder that panicked mid-call leaves the builder consistent (each call is one
        // push or one field write), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`HistoryBuilder::invoke`].
    pub fn invoke(&self, client: ClientId, input: I, time: Time) -> OpId {
        self.lock().invoke(client, input, time)
    }

    /// See [`HistoryBuilder::complete`].
    pub fn complete(&self, id: OpId, output: O, time: Time) -> Result<(), HistoryError> {
        self.lock().complete(id, output, time)
    }

    /// See [`HistoryBuilder::discard`].
    pub fn discard(&self, id: OpId) -> Result<(), HistoryError> {
        self.lock().discard(id)
    }

    /// See [`HistoryBuilder::unknown`].
    pub fn unknown(&self, id: OpId) -> Result<(), HistoryError> {
        self.lock().unknown(id)
    }

    /// The history recorded so far (a copy; recording may go on).
    pub fn snapshot(&self) -> History<I, O>
    where
        I: Clone,
        O: Clone,
    {
        History {
            ops: self.lock().ops.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_rejects_misuse() {
        let mut b: HistoryBuilder<u8, u8> = HistoryBuilder::new();
        let id = b.invoke(1, 0, 10);
        assert_eq!(
            b.complete(id, 0, 5),
            Err(HistoryError::ReturnBeforeInvoke {
                op: id,
                invoked_at: 10,
                returned_at: 5
            })
        );
        assert!(b.is_open(id));
        b.complete(id, 0, 11).unwrap();
        assert_eq!(b.complete(id, 0, 12), Err(HistoryError::AlreadyClosed(id)));
        assert_eq!(b.discard(OpId(7)), Err(HistoryError::UnknownOp(OpId(7))));
        let open = b.invoke(2, 1, 12);
        let history = b.build();
        assert_eq!(
            history.op(open).map(|op| &op.outcome),
            Some(&Outcome::Unknown)
        );
    }

    #[test]
    fn shared_builder_records_from_threads() {
        let shared: SharedHistoryBuilder<u64, u64> = SharedHistoryBuilder::new();
        std::thread::scope(|s| {
            for client in 0..4u64 {
                let shared = shared.clone();
                s.spawn(move || {
                    let id = shared.invoke(client, client, client);
                    shared.complete(id, client, client + 10).unwrap();
                });
            }
        });
        let history = shared.snapshot();
        assert_eq!(history.len(), 4);
        assert!(history.ops().iter().all(|op| op.returned_at().is_some()));
    }
}
