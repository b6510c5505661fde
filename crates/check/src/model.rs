//! The [`Model`] trait: a sequential specification the checker linearizes against.

use std::fmt;
use std::hash::Hash;

/// A sequential specification of an object: its initial state and what each operation does.
///
/// The checker looks for an order of the history's operations, consistent with real time, in
/// which every operation is legal according to this model. Models may be nondeterministic (an
/// operation can lead to several states, for example a put that "maybe" applied), which is why
/// [`Model::step`] pushes successors rather than returning one.
///
/// A model must be a pure function of its arguments: the checker caches transitions.
pub trait Model {
    /// What a client asks (for example "write 3").
    type Input: Clone + fmt::Debug;
    /// What the object answered (for example "ok", or the value read).
    type Output: Clone + fmt::Debug;
    /// The object's state. Hashed and compared by the search's cache, so keep it small.
    type State: Clone + Eq + Hash + fmt::Debug;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// Pushes onto `next` every state the object can be in after `input` is applied in `state`
    /// and answers `output`; pushes nothing if that answer is impossible in `state`.
    ///
    /// `output` is `None` for an operation whose outcome is unknown (it timed out or was never
    /// answered): any answer is accepted, so push every state the input can lead to.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
        next: &mut Vec<Self::State>,
    );

    /// Whether the operation never changes the state: in every state where it is legal, its only
    /// successor is that same state (a read, a cas that failed, a put refused with a version
    /// mismatch). The search then linearizes it as soon as it is legal, without trying the other
    /// orders (a sound partial-order reduction: see `docs/checker.md`). Answering `true` for an
    /// operation that can change the state makes verdicts wrong; the default `false` is always
    /// safe, only slower.
    fn is_read_only(&self, _input: &Self::Input, _output: Option<&Self::Output>) -> bool {
        false
    }

    /// The partition (usually the key) an operation belongs to, when operations of different
    /// partitions never affect each other. Returning `Some` lets the checker check each
    /// partition on its own (P-compositionality, Herlihy & Wing 1990, and Horn & Kroening 2015),
    /// which is exponentially cheaper. `None` (the default) puts every operation in one partition.
    /// A model that returns `Some` must keep working when checked as one partition (its state
    /// then covers every key).
    fn partition_key(&self, _input: &Self::Input) -> Option<String> {
        None
    }

    /// A short human description of an operation, for explanations and the HTML timeline.
    fn describe_op(&self, input: &Self::Input, output: Option<&Self::Output>) -> String {
        match output {
            Some(output) => format!("{input:?} -> {output:?}"),
            None => format!("{input:?} -> ?"),
        }
    }

    /// Approximate bytes a state occupies, heap included, for [`Budget::memory_bytes`]
    /// (default: its inline size only; override when states own strings or collections).
    ///
    /// [`Budget::memory_bytes`]: crate::Budget::memory_bytes
    fn state_bytes(&self, _state: &Self::State) -> usize {
        std::mem::size_of::<Self::State>()
    }

    /// A short human description of a state, for explanations.
    fn describe_state(&self, state: &Self::State) -> String {
        format!("{state:?}")
    }
}
