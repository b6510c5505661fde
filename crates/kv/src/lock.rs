//! A lock built only on the KV (the classic lab's lock): the lock is a key whose value is the
//! holder's unique id, or empty when free. Acquire writes our id with a conditional put at the
//! version read; release writes empty at the version we hold. After a "maybe" answer the lock
//! re-reads the key to learn whether the put applied, so retries and lost replies never make
//! two holders.
//!
//! **With a lease** ([`Lock::with_lease`]): the claim attaches the key to the holder's lease
//! ([`KvOp::PutLease`]), so a holder that dies loses the lock when its lease expires; the
//! release deletes the key (missing means free, as empty does). A key created under a lease
//! starts at the version of the log index of its put, so the held version only grows from one
//! holder to the next, across deletions: a fencing token ([`Lock::version`]). If the lease is
//! gone when claiming, the step is [`LockStep::LeaseLost`].
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
    /// (Leased lock) the lease is gone (expired or revoked): the claim was refused. The lock
    /// is idle; grant a new lease to try again.
    LeaseLost,
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
    /// The lease the claim attaches the key to (`0`: none, the classic lock).
    lease: u64,
    /// The other owner's value seen by the last read that found the lock taken.
    holder: Option<Vec<u8>>,
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
            lease: 0,
            holder: None,
        }
    }

    /// A lock whose key is attached to lease `lease` while held (see the module's doc).
    pub fn with_lease(key: Vec<u8>, owner: Vec<u8>, lease: u64) -> Lock {
        let mut lock = Lock::new(key, owner);
        lock.lease = lease;
        lock
    }

    /// Sets the pause before re-reading a lock held by someone else.
    pub fn set_retry(&mut self, retry: Duration) {
        self.retry = retry;
    }

    /// The version of the key while we hold it (with a lease: a fencing token that grows from
    /// one holder to the next).
    pub fn version(&self) -> Option<u64> {
        match self.state {
            State::Held { version } => Some(version),
            _ => None,
        }
    }

    /// The lease the lock is held under (`0`: none).
    pub fn lease(&self) -> u64 {
        self.lease
    }

    /// The value of the other owner that held the lock at the last read, if it was taken.
    pub fn holder(&self) -> Option<&[u8]> {
        self.holder.as_deref()
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
        if self.lease != 0 {
            // Leased: delete the key (missing is free), which also detaches it from the lease.
            return LockStep::Run(KvOp::Delete {
                key: self.key.clone(),
                expected: Expected::Version(version),
            });
        }
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
                    self.holder = None;
                    LockStep::Acquired
                } else if value.is_empty() {
                    self.state = State::Claiming;
                    self.claim(version)
                } else {
                    self.holder = Some(value);
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
                self.holder = None;
                LockStep::Acquired
            }
            (State::Claiming, Outcome::Done(KvResult::LeaseNotFound { .. })) => {
                self.state = State::Idle;
                LockStep::LeaseLost
            }
            // Mismatch: someone else won; maybe: re-read to learn whether we did.
            (State::Claiming, _) => {
                self.state = State::Reading;
                self.read()
            }
            (State::Releasing, Outcome::Done(KvResult::Written { .. } | KvResult::Deleted)) => {
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
        if self.lease != 0 {
            return LockStep::Run(KvOp::PutLease {
                key: self.key.clone(),
                value: self.owner.clone(),
                expected: Expected::Version(version),
                lease: self.lease,
            });
        }
        LockStep::Run(KvOp::Put {
            key: self.key.clone(),
            value: self.owner.clone(),
            expected: Expected::Version(version),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(r: KvResult) -> Outcome {
        Outcome::Done(r)
    }

    /// The leased lock claims with the lease, reports the holder it waits for, hands the
    /// version out as the fencing token, releases by deleting, and reports a lost lease.
    #[test]
    fn leased_lock_claims_with_its_lease_and_releases_by_delete() {
        let mut l = Lock::with_lease(b"lock/x".to_vec(), b"me".to_vec(), 7);
        assert_eq!(
            l.acquire(),
            LockStep::Run(KvOp::Get {
                key: b"lock/x".to_vec()
            })
        );
        let step = l.on_outcome(done(KvResult::Found {
            value: b"other".to_vec(),
            version: 3,
        }));
        assert_eq!(step, LockStep::Wait(DEFAULT_LOCK_RETRY));
        assert_eq!(l.holder(), Some(&b"other"[..]));
        assert_eq!(
            l.on_wait_done(),
            LockStep::Run(KvOp::Get {
                key: b"lock/x".to_vec()
            })
        );
        let claim = l.on_outcome(done(KvResult::NoKey));
        assert_eq!(
            claim,
            LockStep::Run(KvOp::PutLease {
                key: b"lock/x".to_vec(),
                value: b"me".to_vec(),
                expected: Expected::Version(0),
                lease: 7,
            })
        );
        assert_eq!(
            l.on_outcome(done(KvResult::Written { version: 42 })),
            LockStep::Acquired
        );
        assert_eq!((l.version(), l.holder()), (Some(42), None));
        assert_eq!(
            l.release(),
            LockStep::Run(KvOp::Delete {
                key: b"lock/x".to_vec(),
                expected: Expected::Version(42),
            })
        );
        assert_eq!(l.on_outcome(done(KvResult::Deleted)), LockStep::Released);
        // Lease gone at claim time.
        l.acquire();
        l.on_outcome(done(KvResult::NoKey));
        assert_eq!(
            l.on_outcome(done(KvResult::LeaseNotFound { id: 7 })),
            LockStep::LeaseLost
        );
        assert!(!l.is_held());
    }
}
