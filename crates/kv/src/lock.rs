//! A lock built only on the KV (the classic lab's lock): the lock is a key whose value is the
//! holder's unique id, or empty when free. Acquire writes our id with a conditional put at the
//! version read; release writes empty at the version we hold. After a "maybe" answer the lock
//! re-reads the key to learn whether the put applied, so retries and lost replies never make
//! two holders.
//!
//! Sans-IO: [`Lock`] says which KV operation to run next ([`LockStep::Run`]); the driver runs
//! it with a [`crate::Clerk`] and feeds the [`crate::Outcome`] back.

use std::time::Duration;

use shoal_wire::kv::{Expected, KvOp, KvResult};

use crate::clerk::Outcome;

/// Default pause before re-reading a lock held by someone else.
pub const DEFAULT_LOCK_RETRY: Duration = Duration::from_millis(10);

/// What the lock's driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockStep {
    /// Run this KV operation and call [`Lock::on_outcome`] with its outcome.
    Run(KvOp),
    /// Wait this long, then call [`Lock::on_wait_done`].
    Wait(Duration),
    /// The lock is ours.
    Acquired,
    /// The lock is released.
    Released,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    /// Acquire: reading the key.
    Reading,
    /// Acquire: put of our id at this version in flight.
    Claiming,
    Held {
        version: u64,
    },
    /// Release: put of empty at the held version in flight.
    Releasing,
    /// Release: re-reading after a maybe.
    CheckingRelease,
}

/// One client's handle on a named lock.
#[derive(Debug)]
pub struct Lock {
    key: Vec<u8>,
    owner: Vec<u8>,
    state: State,
    retry: Duration,
}

impl Lock {
    /// A lock stored under `key`, held as `owner` (unique per client and lock handle; must not
    /// be empty).
    pub fn new(key: Vec<u8>, owner: Vec<u8>) -> Lock {
        assert!(!owner.is_empty(), "the empty owner means free");
        Lock {
            key,
            owner,
            state: State::Idle,
            retry: DEFAULT_LOCK_RETRY,
        }
    }

    /// Whether we hold the lock.
    pub fn is_held(&self) -> bool {
        matches!(self.state, State::Held { .. })
    }

    fn read(&mut self) -> LockStep {
        LockStep::Run(KvOp::Get {
            key: self.key.clone(),
        })
    }

    /// Begins acquiring.
    pub fn acquire(&mut self) -> LockStep {
        debug_assert_eq!(self.state, State::Idle);
        self.state = State::Reading;
        self.read()
    }

    /// Begins releasing (we must hold the lock).
    pub fn release(&mut self) -> LockStep {
        let State::Held { version } = self.state else {
            return LockStep::Released;
        };
        self.state = State::Releasing;
        LockStep::Run(KvOp::Put {
            key: self.key.clone(),
            value: Vec::new(),
            expected: Expected::Version(version),
        })
    }

    /// A [`LockStep::Wait`] is over.
    pub fn on_wait_done(&mut self) -> LockStep {
        match self.state {
            State::Reading => self.read(),
            State::CheckingRelease => self.read(),
            _ => LockStep::Wait(self.retry),
        }
    }

    /// The outcome of the last [`LockStep::Run`].
    pub fn on_outcome(&mut self, outcome: Outcome) -> LockStep {
        match (self.state, outcome) {
            (State::Reading, Outcome::Done(KvResult::Found { value, version })) => {
                if value == self.owner {
                    // An earlier claim (answered maybe) applied.
                    self.state = State::Held { version };
                    LockStep::Acquired
                } else if value.is_empty() {
                    self.state = State::Claiming;
                    self.claim(version)
                } else {
                    LockStep::Wait(self.retry)
                }
            }
            (State::Reading, Outcome::Done(KvResult::NoKey)) => {
                self.state = State::Claiming;
                self.claim(0)
            }
            (State::Reading, _) => LockStep::Wait(self.retry),
            (State::Claiming, Outcome::Done(KvResult::Written { version })) => {
                self.state = State::Held { version };
                LockStep::Acquired
            }
            // Mismatch: someone else won; maybe: re-read to learn whether we did.
            (State::Claiming, _) => {
                self.state = State::Reading;
                self.read()
            }
            (State::Releasing, Outcome::Done(KvResult::Written { .. })) => {
                self.state = State::Idle;
                LockStep::Released
            }
            (State::Releasing, _) => {
                self.state = State::CheckingRelease;
                self.read()
            }
            (State::CheckingRelease, Outcome::Done(KvResult::Found { value, version })) => {
                if value == self.owner {
                    // The release did not apply: try again at the current version.
                    self.state = State::Held { version };
                    self.release()
                } else {
                    self.state = State::Idle;
                    LockStep::Released
                }
            }
            (State::CheckingRelease, Outcome::Done(KvResult::NoKey)) => {
                self.state = State::Idle;
                LockStep::Released
            }
            (State::CheckingRelease, _) => LockStep::Wait(self.retry),
            (State::Idle | State::Held { .. }, _) => LockStep::Wait(self.retry),
        }
    }

    fn claim(&self, version: u64) -> LockStep {
        LockStep::Run(KvOp::Put {
            key: self.key.clone(),
            value: self.owner.clone(),
            expected: Expected::Version(version),
        })
    }
}
