//! The simulated KV client actor: a [`Clerk`] driven by a workload ([`Work`]), recording every
//! operation's invoke and return in the simulator's history, and the checks on what clients
//! saw: the history against `shoal check`'s versioned-KV model ([`check_kv_history`]), lock
//! intervals, client-side violations.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_check::models::{Expected as CExpected, KvInput, KvOutput, VersionedKv};
use shoal_check::{check, Budget, HistoryBuilder, Verdict};
use shoal_kv::{Action, Clerk, ClerkConfig, Lock, LockStep, Outcome};
use shoal_sim::rand::Rng;
use shoal_sim::{Ctx, Failure, Node, OpId, Sim, SimTime};
use shoal_wire::kv::{Expected, KvMessage, KvOp, KvResult};

/// A simulated node's id.
pub type SimId = shoal_sim::NodeId;
/// The message type of every KV simulation (clients and servers).
pub type M = KvMessage;

/// Client timer tokens with this bit are the workload's own sleeps (clerk tokens never have it).
const SLEEP_BIT: u64 = 1 << 62;

/// The simulated node of server `id` (servers are the first nodes added: ids are sim ids + 1).
pub fn server_sim(id: u64) -> SimId {
    shoal_sim::NodeId((id - 1) as u32)
}

/// What a client actor does.
#[derive(Debug, Clone)]
pub enum Work {
    /// Runs these operations in order, once.
    Script(Vec<KvOp>),
    /// The lab's OneClientPut: put at the last known version, then get, on `keys` (random
    /// choice) until `until`.
    PutLoop {
        /// The keys.
        keys: Vec<String>,
        /// When to stop (after the current put's get).
        until: SimTime,
    },
    /// Lab 2 unreliable test: round `r` puts at version `r`, retrying while maybe.
    Rounds {
        /// The key.
        key: String,
        /// How many rounds.
        rounds: u64,
    },
    /// The lab's lock loop on lock `lock` and shared key `shared` until `until`.
    LockLoop {
        /// The lock's key.
        lock: String,
        /// The key written only under the lock.
        shared: String,
        /// When to stop trying to acquire.
        until: SimTime,
    },
    /// Sequential unconditional puts (speed test).
    Puts {
        /// The key.
        key: String,
        /// How many puts.
        count: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockPhase {
    Acquiring,
    CheckShared,
    PutMine,
    Sleeping,
    PutEmpty,
    Releasing,
}

/// The decisions of the lab's OneClientPut loop ([`Work::PutLoop`]), shared by the KV and the
/// sharded-KV client actors: put at the last version this client knows of a random key, then
/// get a random key, until the deadline.
#[derive(Debug, Clone, Default)]
pub struct PutLoop {
    /// Per key: last known version.
    versions: BTreeMap<String, u64>,
    after_put: bool,
    counter: u64,
}

impl PutLoop {
    /// The operation to run after `last` finished (`None` at the start), or `None` when the
    /// loop is over (`past_deadline` and the last put's get done). Values are unique per
    /// client (`client` and a counter), so the history shows which put a read saw.
    pub fn next(
        &mut self,
        rng: &mut impl Rng,
        client: u64,
        keys: &[String],
        past_deadline: bool,
        last: Option<&(KvOp, Outcome)>,
    ) -> Option<KvOp> {
        match last {
            Some((KvOp::Get { key }, Outcome::Done(r))) => {
                let v = match r {
                    KvResult::Found { version, .. } => *version,
                    _ => 0,
                };
                self.versions.insert(key_str(key), v);
            }
            Some((KvOp::Put { key, .. }, Outcome::Done(KvResult::Written { version }))) => {
                self.versions.insert(key_str(key), *version);
            }
            _ => {}
        }
        let key = keys[rng.gen_range(0..keys.len())].clone();
        if self.after_put {
            self.after_put = false;
            return Some(KvOp::Get {
                key: key.into_bytes(),
            });
        }
        if past_deadline {
            return None;
        }
        self.after_put = true;
        self.counter += 1;
        let version = self.versions.get(&key).copied().unwrap_or(0);
        let value = format!("{{\"id\":{client},\"v\":{}}}", self.counter);
        Some(KvOp::Put {
            key: key.into_bytes(),
            value: value.into_bytes(),
            expected: Expected::Version(version),
        })
    }
}

/// A client actor.
pub struct Client {
    clerk: Clerk,
    work: Work,
    current: Option<(Option<OpId>, KvOp)>,
    /// Every finished operation with its outcome, in order.
    pub results: Vec<(KvOp, Outcome)>,
    /// Puts answered `Written`.
    pub ok_puts: u64,
    /// Operations answered `Maybe` (the clerk gave up: unknown outcome).
    pub maybes: u64,
    /// The workload is done.
    pub finished: bool,
    /// The first thing this client saw that its workload forbids.
    pub violation: Option<String>,
    put_loop: PutLoop,
    round: u64,
    retrying: bool,
    // lock loop
    lock: Option<Lock>,
    phase: LockPhase,
    shared_version: u64,
    /// Lock loop: [acquired, released) in simulated ns of each time it held the lock.
    pub held: Vec<(u64, u64)>,
    acquired_at: u64,
    counter: u64,
}

impl Client {
    /// Client `client_id` (its sim id) of the servers `servers` (Raft ids), running `work`.
    pub fn new(client_id: u64, servers: Vec<u64>, work: Work) -> Client {
        let clerk = Clerk::new(ClerkConfig::new(client_id, servers)).expect("servers");
        Client {
            clerk,
            work,
            current: None,
            results: Vec::new(),
            ok_puts: 0,
            maybes: 0,
            finished: false,
            violation: None,
            put_loop: PutLoop::default(),
            round: 0,
            retrying: false,
            lock: None,
            phase: LockPhase::Acquiring,
            shared_version: 0,
            held: Vec::new(),
            acquired_at: 0,
            counter: 0,
        }
    }

    fn run(&mut self, ctx: &mut Ctx<'_, M>, op: KvOp) {
        let input = to_input(&op);
        let id = input.map(|i| ctx.invoke(i));
        self.current = Some((id, op.clone()));
        match self.clerk.start(op) {
            Ok(actions) => self.perform(ctx, actions),
            Err(e) => self.violation = Some(format!("clerk refused: {e}")),
        }
    }

    fn perform(&mut self, ctx: &mut Ctx<'_, M>, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { server, request } => {
                    ctx.send(server_sim(server), KvMessage::Request(request))
                }
                Action::SetTimer { after, token } => {
                    ctx.set_timer(after, token);
                }
                Action::Finished(outcome) => self.finished_op(ctx, outcome),
            }
        }
    }

    fn finished_op(&mut self, ctx: &mut Ctx<'_, M>, outcome: Outcome) {
        let Some((id, op)) = self.current.take() else {
            return;
        };
        // A refused oversized write stays open (unknown) in the history: the model has no
        // "too large" answer, and an open operation constrains nothing.
        if let Some(id) =
            id.filter(|_| !matches!(outcome, Outcome::Done(KvResult::TooLarge { .. })))
        {
            ctx.complete(id, to_output(&outcome));
        }
        if matches!(outcome, Outcome::Maybe) {
            self.maybes += 1;
        }
        if matches!(op, KvOp::Put { .. })
            && matches!(outcome, Outcome::Done(KvResult::Written { .. }))
        {
            self.ok_puts += 1;
        }
        self.results.push((op.clone(), outcome.clone()));
        self.next(ctx, Some((op, outcome)));
    }

    fn sleep(&mut self, ctx: &mut Ctx<'_, M>, d: Duration) {
        ctx.set_timer(d, SLEEP_BIT);
    }

    /// Decides the next operation after `last` finished (None: at start or after a sleep).
    fn next(&mut self, ctx: &mut Ctx<'_, M>, last: Option<(KvOp, Outcome)>) {
        match self.work.clone() {
            Work::Script(ops) => {
                let i = self.results.len();
                if i < ops.len() {
                    self.run(ctx, ops[i].clone());
                } else {
                    self.finished = true;
                }
            }
            Work::Puts { key, count } => {
                if self.counter < count {
                    self.counter += 1;
                    let op = KvOp::Put {
                        key: key.into_bytes(),
                        value: format!("{}", self.counter).into_bytes(),
                        expected: Expected::Any,
                    };
                    self.run(ctx, op);
                } else {
                    self.finished = true;
                }
            }
            Work::PutLoop { keys, until } => {
                let id = self.clerk.client_id();
                let past = ctx.now() >= until;
                match self
                    .put_loop
                    .next(ctx.rng(), id, &keys, past, last.as_ref())
                {
                    Some(op) => self.run(ctx, op),
                    None => self.finished = true,
                }
            }
            Work::Rounds { key, rounds } => {
                let k = key.clone().into_bytes();
                match &last {
                    None => {}
                    Some((KvOp::Put { .. }, Outcome::Maybe)) => {
                        self.retrying = true;
                    }
                    Some((KvOp::Put { .. }, Outcome::Done(r))) => {
                        if self.retrying && !matches!(r, KvResult::VersionMismatch) {
                            self.violation = Some(format!("a retried put answered {r:?}"));
                        }
                        if !self.retrying && !matches!(r, KvResult::Written { .. }) {
                            self.violation = Some(format!("first put answered {r:?}"));
                        }
                        self.run(ctx, KvOp::Get { key: k });
                        return;
                    }
                    Some((KvOp::Get { .. }, Outcome::Done(r))) => {
                        let want = KvResult::Found {
                            value: b"0".to_vec(),
                            version: self.round + 1,
                        };
                        if *r != want {
                            self.violation = Some(format!("round {}: get {r:?}", self.round));
                        }
                        self.round += 1;
                        self.retrying = false;
                    }
                    Some(other) => {
                        self.violation = Some(format!("unexpected {other:?}"));
                    }
                }
                if self.round >= rounds {
                    self.finished = true;
                    return;
                }
                let op = KvOp::Put {
                    key: k,
                    value: b"0".to_vec(),
                    expected: Expected::Version(self.round),
                };
                self.run(ctx, op);
            }
            Work::LockLoop {
                lock,
                shared,
                until,
            } => self.lock_next(ctx, last, lock, shared, until),
        }
    }

    fn lock_step(&mut self, ctx: &mut Ctx<'_, M>, step: LockStep) {
        match step {
            LockStep::Run(op) => self.run(ctx, op),
            LockStep::Wait(d) => self.sleep(ctx, d),
            LockStep::Acquired => {
                self.acquired_at = ctx.now().as_nanos();
                self.phase = LockPhase::CheckShared;
                self.next(ctx, None);
            }
            LockStep::Released => {
                self.phase = LockPhase::Acquiring;
                self.next(ctx, None);
            }
            LockStep::LeaseLost => {
                self.violation = Some("the lock loop holds no lease, yet lost one".into());
            }
        }
    }

    fn lock_next(
        &mut self,
        ctx: &mut Ctx<'_, M>,
        last: Option<(KvOp, Outcome)>,
        lock: String,
        shared: String,
        until: SimTime,
    ) {
        let me = format!("c{}", self.clerk.client_id()).into_bytes();
        match self.phase {
            LockPhase::Acquiring | LockPhase::Releasing => {
                let l = self
                    .lock
                    .get_or_insert_with(|| Lock::new(lock.into_bytes(), me.clone()));
                let step = match last {
                    Some((_, outcome)) => l.on_outcome(outcome),
                    None if self.phase == LockPhase::Acquiring && !l.is_held() => {
                        if ctx.now() >= until && self.current.is_none() {
                            self.finished = true;
                            return;
                        }
                        // Fresh start or wait over: on_wait_done re-reads when mid-acquire.
                        if self.held.len() as u64 == self.counter {
                            self.counter += 1;
                            l.acquire()
                        } else {
                            l.on_wait_done()
                        }
                    }
                    None => l.on_wait_done(),
                };
                self.lock_step(ctx, step);
            }
            LockPhase::CheckShared => match last {
                None => self.run(
                    ctx,
                    KvOp::Get {
                        key: shared.into_bytes(),
                    },
                ),
                Some((_, Outcome::Done(r))) => {
                    self.shared_version = match r {
                        KvResult::Found { value, version } => {
                            if !value.is_empty() {
                                self.violation = Some(format!(
                                    "two clients acquired the lock: shared key holds {:?}",
                                    String::from_utf8_lossy(&value)
                                ));
                            }
                            version
                        }
                        _ => 0,
                    };
                    self.phase = LockPhase::PutMine;
                    let op = KvOp::Put {
                        key: shared.into_bytes(),
                        value: me,
                        expected: Expected::Version(self.shared_version),
                    };
                    self.run(ctx, op);
                }
                Some(other) => self.violation = Some(format!("shared get: {other:?}")),
            },
            LockPhase::PutMine => {
                self.check_put(&last);
                self.phase = LockPhase::Sleeping;
                self.sleep(ctx, Duration::from_millis(10));
            }
            LockPhase::Sleeping => {
                self.phase = LockPhase::PutEmpty;
                let op = KvOp::Put {
                    key: shared.into_bytes(),
                    value: Vec::new(),
                    expected: Expected::Version(self.shared_version + 1),
                };
                self.run(ctx, op);
            }
            LockPhase::PutEmpty => {
                self.check_put(&last);
                self.held.push((self.acquired_at, ctx.now().as_nanos()));
                self.phase = LockPhase::Releasing;
                let step = self
                    .lock
                    .as_mut()
                    .map(|l| l.release())
                    .unwrap_or(LockStep::Released);
                self.lock_step(ctx, step);
            }
        }
    }

    fn check_put(&mut self, last: &Option<(KvOp, Outcome)>) {
        if let Some((_, o)) = last {
            if !matches!(o, Outcome::Maybe | Outcome::Done(KvResult::Written { .. })) {
                self.violation = Some(format!("put of the shared key under the lock: {o:?}"));
            }
        }
    }
}

impl Node<M> for Client {
    fn on_start(&mut self, ctx: &mut Ctx<'_, M>) {
        self.next(ctx, None);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, M>, _from: SimId, msg: M) {
        if let KvMessage::Reply(r) = msg {
            let actions = self.clerk.on_reply(r);
            self.perform(ctx, actions);
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, M>, token: u64) {
        if token == SLEEP_BIT {
            self.next(ctx, None);
        } else {
            let actions = self.clerk.on_timer(token);
            self.perform(ctx, actions);
        }
    }
}

fn key_str(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

/// The versioned-KV model's input for `op` (`None`: outside the model, not recorded).
pub fn to_input(op: &KvOp) -> Option<KvInput> {
    let exp = |e: &Expected| match e {
        Expected::Any => CExpected::Any,
        Expected::Version(v) => CExpected::Version(*v),
    };
    match op {
        KvOp::Get { key } => Some(KvInput::Get { key: key_str(key) }),
        KvOp::Put {
            key,
            value,
            expected,
        } => Some(KvInput::Put {
            key: key_str(key),
            value: key_str(value),
            expected: exp(expected),
        }),
        KvOp::Delete { key, expected } => Some(KvInput::Delete {
            key: key_str(key),
            expected: exp(expected),
        }),
        // Lease operations are outside the versioned-KV model (an expiry deletes keys no
        // client asked to): lease tests keep their keys apart and check them on their own.
        KvOp::Scan { .. }
        | KvOp::Register
        | KvOp::Status
        | KvOp::LeaseGrant { .. }
        | KvOp::LeaseKeepAlive { .. }
        | KvOp::LeaseRevoke { .. }
        | KvOp::LeaseList
        | KvOp::PutLease { .. }
        | KvOp::LeaseExpire { .. }
        | KvOp::LeaseCheckpoint { .. }
        | KvOp::Snapshot
        | KvOp::MemberList
        | KvOp::MemberAdd { .. }
        | KvOp::MemberPromote { .. }
        | KvOp::MemberRemove { .. }
        | KvOp::MemberAddresses { .. } => None,
    }
}

/// The versioned-KV model's output for an outcome.
pub fn to_output(o: &Outcome) -> KvOutput {
    match o {
        Outcome::Maybe => KvOutput::Maybe,
        Outcome::Done(r) => match r {
            KvResult::Found { value, version } => KvOutput::Found {
                value: key_str(value),
                version: *version,
            },
            KvResult::NoKey => KvOutput::NoKey,
            KvResult::Written { version } => KvOutput::Written { version: *version },
            KvResult::Deleted => KvOutput::Deleted,
            KvResult::VersionMismatch => KvOutput::VersionMismatch,
            // Refused writes change nothing: like a mismatch for the model.
            KvResult::TooLarge { .. }
            | KvResult::Scanned { .. }
            | KvResult::Stale
            | KvResult::Registered { .. }
            | KvResult::SessionExpired
            | KvResult::Status(_)
            | KvResult::LeaseGranted { .. }
            | KvResult::LeaseKept { .. }
            | KvResult::LeaseNotFound { .. }
            | KvResult::LeaseRevoked { .. }
            | KvResult::Leases { .. }
            | KvResult::Refused { .. }
            | KvResult::Snapshot { .. }
            | KvResult::Members { .. } => KvOutput::VersionMismatch,
        },
    }
}

/// What [`check_kv_history`] found in a history it did not reject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryCheck {
    /// Operations in the history (completed or not).
    pub ops: usize,
    /// `Some(reason)` if the checker gave up within its budget (no verdict), `None` if the
    /// history is linearizable.
    pub gave_up: Option<String>,
}

/// Checks the recorded history against the versioned-KV model (the model of `shoal check
/// --model kv`) within `budget`; a violation is an `Err` carrying the trace tail. A step
/// budget ([`Budget::steps`]) gives the same answer on every machine; a time budget does not.
pub fn check_kv_history<Msg: shoal_sim::Message>(
    sim: &Sim<Msg>,
    budget: Budget,
) -> Result<HistoryCheck, Failure> {
    let ops = sim
        .history::<KvInput, KvOutput>()
        .map_err(|e| sim.failure(e.to_string()))?;
    let mut b = HistoryBuilder::new();
    let n = ops.len();
    for op in ops {
        let id = b.invoke(u64::from(op.client.0), op.input, op.called_at.as_nanos());
        if let (Some(out), Some(at)) = (op.output, op.returned_at) {
            b.complete(id, out, at.as_nanos())
                .map_err(|e| sim.failure(e.to_string()))?;
        }
    }
    match check(&VersionedKv, &b.build(), budget) {
        Verdict::Linearizable => Ok(HistoryCheck {
            ops: n,
            gave_up: None,
        }),
        Verdict::Unknown(r) => Ok(HistoryCheck {
            ops: n,
            gave_up: Some(format!("{r:?}")),
        }),
        Verdict::NotLinearizable(e) => Err(sim.failure(format!("history not linearizable: {e:?}"))),
    }
}

/// Clients' results, summed: (ok puts, maybes).
pub fn put_counts(sim: &Sim<M>, clients: &[SimId]) -> (u64, u64) {
    clients
        .iter()
        .filter_map(|&c| sim.node::<Client>(c))
        .fold((0, 0), |(o, m), c| (o + c.ok_puts, m + c.maybes))
}

/// First client violation, if any.
pub fn client_violation(sim: &Sim<M>, clients: &[SimId]) -> Result<(), Failure> {
    for &c in clients {
        if let Some(v) = sim.node::<Client>(c).and_then(|c| c.violation.clone()) {
            return Err(sim.failure(format!("client {c}: {v}")));
        }
    }
    Ok(())
}

/// Whether every client finished its workload.
pub fn all_finished(sim: &Sim<M>, clients: &[SimId]) -> bool {
    clients
        .iter()
        .all(|&c| sim.node::<Client>(c).is_some_and(|c| c.finished))
}

/// Lock intervals of different clients never overlap (never two holders).
pub fn check_lock_intervals(sim: &Sim<M>, clients: &[SimId]) -> Result<u64, Failure> {
    let mut all: Vec<(u64, u64, SimId)> = Vec::new();
    for &c in clients {
        if let Some(n) = sim.node::<Client>(c) {
            all.extend(n.held.iter().map(|&(a, b)| (a, b, c)));
        }
    }
    all.sort();
    for w in all.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(sim.failure(format!(
                "two holders: {} held [{}, {}) and {} from {}",
                w[0].2, w[0].0, w[0].1, w[1].2, w[1].0
            )));
        }
    }
    Ok(all.len() as u64)
}
