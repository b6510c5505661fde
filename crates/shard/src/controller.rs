//! The shard controller, sans-IO: keeps the configurations in its store (a Shoal KV cluster,
//! laid out as [`crate::layout`] says) and drives the migrations of each change at the groups.
//!
//! One controller at a time drives: it holds the lock [`LOCK_KEY`] under a lease it keeps
//! alive every third of the TTL. The fence against a stale controller (one whose lease ran out
//! unnoticed) is not the lock but the conditional put of [`LATEST_KEY`] at the version read:
//! two controllers can never both install N+1, and a controller whose put fails reloads,
//! re-checks its lease and only then retries the operation against the new latest. A
//! controller whose attempt was installed but that lost the lock before finishing it (another
//! controller drove the change and went on) reads the history when it runs the operation
//! again: finding its attempt there, it reports that number instead of applying it twice.
//!
//! The protocol, in order: grant a lease and acquire the lock; load the latest record
//! (creating configuration 0 when the store is empty) and make sure it is in the history;
//! finish an incomplete change (adopt, then the moves); then run the submitted operations one
//! at a time, each one a new record (conditional put), its history entry, its migrations and
//! the put that marks it complete.
//!
//! Driving configuration N: every group of N-1 ∪ N adopts N-1; each move with an old owner
//! is copied while the shard serves (`CopyStart`, then `ExportChunk` of the live shard at the
//! old owner, `StageRound` at the new owner, a few in flight), then in **delta rounds** the keys
//! written meanwhile are copied again (`CopyRound`, `ExportDelta`, `StageRound`) while that
//! shrinks them; every group adopts N (one configuration at a time, in order, read from the
//! history); then each move is frozen at the old owner, its remaining chunks copied, installed
//! at the new owner from the staged copy and the tail (the keys written since the last round
//! began), and deleted at the old one, at most [`ControllerConfig::max_parallel_moves`] at
//! once (see `docs/sharding.md`, "Copying while the shard serves" and "Delta rounds"). Every step is idempotent at the group, so
//! a new controller simply replays the change from the start.
//!
//! Timer tokens: the store clerk's tokens and the controller's own share one space, told apart
//! by a kind in bits 56..63 (bit 63 is left to the clerk's backoff flag).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use shoal_kv::{Action, Clerk, ClerkConfig, Lock, LockStep, Outcome};
use shoal_wire::kv::{Expected, KvOp, KvReply, KvRequest, KvResult};
use shoal_wire::shard::{
    ControlOp, ControlReply, ControlRequest, ControlStatus, DeltaChunk, ShardChunk, FROZEN_ROUND,
};

use crate::layout::{config_key, Record, LATEST_KEY, LOCK_KEY};
use crate::{apply, diff, Config, Gid, Op, ShardMove, NO_GROUP};

/// Settings of a controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This controller's id as the lock's holder: unique among the controllers running at once
    /// (a restarted controller may reuse its name: it re-attaches the lock to its new lease).
    pub name: Vec<u8>,
    /// The KV client id of the store clerk.
    pub client: u64,
    /// The store's server ids.
    pub store: Vec<u64>,
    /// The shard count, used only to create configuration 0 in an empty store.
    pub shards: u32,
    /// The lock's lease TTL in ms (kept alive every third of it).
    pub lease_ttl_ms: u64,
    /// How long to wait for a store or group server before trying the next one; also the
    /// pause before retrying a step a group refused.
    pub retry_timeout: Duration,
    /// Most moves driven at once.
    pub max_parallel_moves: usize,
    /// About how many bytes of keys and values one chunk of a moving shard carries (one
    /// `ExportChunk` answer, one `Stage` log entry at the new owner; a group caps it at
    /// `group::MAX_CHUNK_BYTES`).
    pub chunk_bytes: u64,
    /// Most `Stage` requests of one move in flight at once (the next chunk is read while
    /// earlier ones are being logged).
    pub stages_in_flight: usize,
    /// Copy each moving shard while it still serves (`CopyStart` at the old owner, chunks of
    /// the live shard staged before the groups adopt the configuration), so that only the
    /// keys written since travel after the freeze. `false`: the whole copy happens frozen.
    pub precopy: bool,
    /// The throttle of a copy while the shard serves (it is in no hurry: the shard is
    /// served meanwhile, and the groups' own requests come first): at most this many
    /// `Stage`s of one move in flight ...
    pub precopy_stages_in_flight: usize,
    /// ... and this pause before reading each chunk after the first, so one move copies at
    /// most about `chunk_bytes` per pause.
    pub precopy_pause: Duration,
    /// Most **delta rounds** staged per copy while serving (`CopyRound` at the old owner: the
    /// keys written since the previous round are read and staged again while the shard still
    /// serves, so that the frozen tail carries only the keys written during the last round).
    /// 0: none, the tail carries every key written during the copy.
    pub delta_rounds: u32,
    /// A delta round of at most this many bytes of keys and values (or not smaller than the
    /// round before it) is the last one staged: another would not shrink the tail enough to
    /// be worth its round trips.
    pub delta_min_bytes: u64,
}

impl ControllerConfig {
    /// Defaults: a 3 s lease, 100 ms retries, 4 moves at once, chunks of 1 MiB, 3 stages in
    /// flight per move.
    pub fn new(name: Vec<u8>, client: u64, store: Vec<u64>, shards: u32) -> ControllerConfig {
        ControllerConfig {
            name,
            client,
            store,
            shards,
            lease_ttl_ms: 3_000,
            retry_timeout: Duration::from_millis(100),
            max_parallel_moves: 4,
            chunk_bytes: 1024 * 1024,
            stages_in_flight: 3,
            precopy: true,
            precopy_stages_in_flight: 3,
            precopy_pause: Duration::ZERO,
            delta_rounds: 3,
            delta_min_bytes: 64 * 1024,
        }
    }
}

/// Why a controller could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// A setting is out of range; the message says which and what to give instead.
    #[error("invalid controller setting: {0}")]
    Setting(String),
}

/// What the driver must do for the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtlAction {
    /// Send `request` to store server `server`; its reply goes to
    /// [`Controller::on_store_reply`].
    Store {
        /// The store server id.
        server: u64,
        /// The request.
        request: KvRequest,
    },
    /// Send `request` to server `server` (a name from the configuration) of group `gid`; its
    /// reply goes to [`Controller::on_group_reply`].
    Group {
        /// The group.
        gid: Gid,
        /// The server's name.
        server: String,
        /// The request.
        request: ControlRequest,
    },
    /// Call [`Controller::on_timer`] with `token` after `after`.
    SetTimer {
        /// The delay.
        after: Duration,
        /// The token (stale ones are ignored).
        token: u64,
    },
    /// A submitted ticket finished.
    Finished {
        /// The ticket given to [`Controller::submit`] or [`Controller::submit_query`].
        ticket: u64,
        /// The new (or queried) configuration number, or why the operation was refused.
        result: Result<u64, String>,
    },
}

/// What the controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtlPhase {
    /// Not started, or granting a lease and acquiring the lock.
    Locking,
    /// Loading the latest record, finishing an incomplete change.
    Recovering,
    /// Holding the lock, the latest change complete: ready for operations.
    Idle,
    /// Installing and driving a submitted operation's change.
    Changing,
}

/// A snapshot of the controller's state, for operators and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerStatus {
    /// The phase.
    pub phase: CtlPhase,
    /// Whether it believes it holds the lock.
    pub holds_lock: bool,
    /// The latest configuration number it read, if any.
    pub latest: Option<u64>,
    /// Whether that configuration's change is complete.
    pub complete: bool,
    /// Moves of the change being driven not finished yet.
    pub moves_pending: usize,
    /// Moves of the change being driven finished.
    pub moves_done: usize,
    /// Tickets waiting (the one running included).
    pub queued: usize,
    /// The last refusal or error a group or the store gave (they are retried after a pause).
    pub last_problem: Option<String>,
}

// Timer kinds (bits 56..63 of a token).
const KIND_SHIFT: u32 = 56;
const PAYLOAD: u64 = (1 << KIND_SHIFT) - 1;
const CLERK_BACKOFF_BIT: u64 = 1 << 63;
const KIND_CLERK: u64 = 1;
const KIND_KEEPALIVE: u64 = 2;
const KIND_CALL_TIMEOUT: u64 = 3;
const KIND_CALL_RESEND: u64 = 4;
const KIND_LOCK_WAIT: u64 = 5;
const KIND_RETRY: u64 = 6;

fn token(kind: u64, payload: u64) -> u64 {
    (kind << KIND_SHIFT) | (payload & PAYLOAD)
}

/// A store operation and what its outcome is for.
#[derive(Debug, Clone)]
struct StoreJob {
    op: KvOp,
    purpose: Purpose,
    /// The generation it belongs to: outcomes of dropped work are ignored.
    gen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    Grant,
    /// Revoking a lease we gave up on (its outcome does not matter).
    Revoke,
    /// A keep-alive of this lease (its outcome counts whatever the generation).
    KeepAlive(u64),
    Lock,
    /// Re-attaching the held lock key to our lease (see `lock_step`).
    Attach,
    Load,
    Create(Record),
    EnsureHistory(u64),
    FetchConfig(u64),
    CasNew(Record),
    CasComplete,
    Query(u64),
    /// Reading history entry N: was the current operation's attempt installed as N?
    CheckAttempt(u64),
}

/// Internal phases (finer than [`CtlPhase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Stopped,
    Locking,
    /// Load / create / history in progress.
    Loading,
    /// Waiting for the previous configuration, or driving.
    Driving,
    Completing,
    Idle,
    /// A new record's conditional put in flight.
    Applying,
    /// A history read for a query in flight.
    Querying,
}

#[derive(Debug, Clone)]
enum Job {
    Op {
        op: Op,
        /// The configuration this controller tried to install for it (to recognise it after a
        /// reload: a put answered "maybe" may have applied).
        attempted: Option<Config>,
    },
    Query(Option<u64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdoptState {
    Asking,
    NeedConfig(u64),
    Adopting(u64),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Old owner, before it adopts N: start recording the keys written (copy while serving).
    CopyStart,
    /// The chunked copy of the live shard (after `CopyStart`, before the groups adopt N):
    /// `ExportChunk`s of the serving shard at the old owner, each `Stage`d at the new owner,
    /// until a chunk comes back empty.
    PreCopy,
    /// Old owner, after the live copy: start delta round `MoveRun::delta.round` (which also
    /// acknowledges the round before it as staged).
    CopyRound,
    /// A delta round's copy: `ExportDelta`s at the old owner (the keys of the round, with
    /// their values now or their absence), each staged at the new owner as that round.
    Delta,
    Freeze,
    /// The chunked copy: `ExportChunk`s at the old owner, each `Stage`d at the new owner, until
    /// the last chunk's tail is in hand and every stage answered (see [`CopyRun`]).
    Copy,
    /// An Install with no data: answered AlreadyDone only when the new owner already has the
    /// shard at this configuration (a replay after the old owner deleted it), refused otherwise.
    Probe,
    Install,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoveState {
    Waiting,
    Running(Step),
    Done,
}

/// A move's copy while the shard serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pre {
    NotStarted,
    Running,
    /// Copied to the end while serving: after the freeze, the copy continues after `resume`.
    Done,
    /// Not copied while serving (the old owner adopted N already, or refused): the whole
    /// copy happens after the freeze.
    Skipped,
}

#[derive(Debug, Clone)]
struct MoveRun {
    mv: ShardMove,
    state: MoveState,
    pre: Pre,
    /// Where the copy after the freeze starts (the last key copied while serving).
    resume: Option<Vec<u8>>,
    /// The Install's data: the tail of the chunked copy.
    data: Option<Vec<u8>>,
    copy: CopyRun,
    delta: DeltaRun,
}

/// A move's delta rounds (see [`ControllerConfig::delta_rounds`]).
#[derive(Debug, Clone, Default)]
struct DeltaRun {
    /// The round being started or staged.
    round: u32,
    /// Rounds this controller staged for the move.
    staged: u32,
    /// Bytes of keys and values of the round being read ...
    bytes: u64,
    /// ... and its keys.
    keys: u64,
    /// The bytes of the round staged before it.
    prev_bytes: Option<u64>,
    /// The round being started is the last: its keys ride in the tail.
    last: bool,
}

/// The chunked copy of one move in progress.
#[derive(Debug, Clone, Default)]
struct CopyRun {
    /// Which attempt (a copy restarted from the first key is a new round; answers of an older
    /// round are ignored).
    round: u64,
    /// The last key staged or being staged: the next chunk starts after it.
    after: Option<Vec<u8>>,
    /// An `ExportChunk` is in flight.
    exporting: bool,
    /// `Stage` requests in flight.
    stages: usize,
    /// The last chunk's tail, once read.
    tail: Option<Vec<u8>>,
    /// A copy of the live shard read to its end (an empty chunk came back).
    live_end: bool,
}

#[derive(Debug, Clone)]
struct Drive {
    num: u64,
    /// Copying while the shards serve: the groups adopt N-1 only, then the moves' pre-copies
    /// run, then every group adopts N.
    pre: bool,
    /// Configuration N-1 once read.
    prev: Option<Config>,
    adopt: BTreeMap<Gid, AdoptState>,
    moves: Vec<MoveRun>,
}

impl Drive {
    /// How many more moves may start (copying live or frozen) with at most `max` running.
    fn free_move_slots(&self, max: usize) -> usize {
        let running = self
            .moves
            .iter()
            .filter(|m| matches!(m.state, MoveState::Running(_)))
            .count();
        max.saturating_sub(running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallFor {
    Adopted(Gid),
    Adopt(Gid, u64),
    Step(usize, Step),
    /// An `ExportChunk` of move i's copy round r.
    Chunk(usize, u64),
    /// A `Stage` of move i's copy round r.
    Stage(usize, u64),
    /// An `ExportDelta` of move i's copy round r.
    Delta(usize, u64),
}

/// A request to a group, resent until answered.
#[derive(Debug, Clone)]
struct Call {
    gid: Gid,
    op: ControlOp,
    servers: Vec<String>,
    purpose: CallFor,
    sends: u64,
    /// Hints followed at once since the last pause: stale hints pointing at each other must
    /// not make a hot loop.
    hops: usize,
}

/// The shard controller (see the module's documentation).
pub struct Controller {
    cfg: ControllerConfig,
    clerk: Clerk,
    store_queue: VecDeque<StoreJob>,
    store_busy: Option<StoreJob>,
    gen: u64,
    phase: Phase,
    lease: Option<u64>,
    /// Keep-alive periods since the last confirmed keep-alive (or grant).
    unconfirmed: u32,
    lock: Option<Lock>,
    lock_wait: u64,
    latest: Option<(Record, u64)>,
    configs: BTreeMap<u64, Config>,
    fetching: BTreeSet<u64>,
    drive: Option<Drive>,
    calls: BTreeMap<u64, Call>,
    next_tag: u64,
    leaders: BTreeMap<Gid, usize>,
    tickets: VecDeque<(u64, Job)>,
    current: Option<(u64, Job)>,
    retry_gen: u64,
    last_problem: Option<String>,
}

impl Controller {
    /// A controller; nothing happens before [`Controller::start`].
    pub fn new(cfg: ControllerConfig) -> Result<Controller, ControllerError> {
        let bad = |s: &str| Err(ControllerError::Setting(s.into()));
        if cfg.name.is_empty() {
            return bad("name is empty: give each controller a unique non-empty name");
        }
        if cfg.store.is_empty() {
            return bad("no store servers: give the store's server ids");
        }
        if cfg.lease_ttl_ms < 3 {
            return bad("lease_ttl_ms must be at least 3 (it is kept alive every third)");
        }
        if cfg.max_parallel_moves == 0 {
            return bad("max_parallel_moves must be at least 1");
        }
        if cfg.chunk_bytes == 0 || cfg.stages_in_flight == 0 {
            return bad("chunk_bytes and stages_in_flight must be at least 1");
        }
        if cfg.retry_timeout.is_zero() {
            return bad("retry_timeout must not be zero");
        }
        crate::validate_shards(u64::from(cfg.shards))
            .map_err(|e| ControllerError::Setting(e.to_string()))?;
        let mut clerk_cfg = ClerkConfig::new(cfg.client, cfg.store.clone());
        clerk_cfg.retry_timeout = cfg.retry_timeout;
        let clerk = Clerk::new(clerk_cfg).map_err(|e| ControllerError::Setting(e.to_string()))?;
        Ok(Controller {
            cfg,
            clerk,
            store_queue: VecDeque::new(),
            store_busy: None,
            gen: 0,
            phase: Phase::Stopped,
            lease: None,
            unconfirmed: 0,
            lock: None,
            lock_wait: 0,
            latest: None,
            configs: BTreeMap::new(),
            fetching: BTreeSet::new(),
            drive: None,
            calls: BTreeMap::new(),
            next_tag: 1,
            leaders: BTreeMap::new(),
            tickets: VecDeque::new(),
            current: None,
            retry_gen: 0,
            last_problem: None,
        })
    }

    /// Starts: grants a lease, acquires the lock, then recovers (see the module's doc).
    pub fn start(&mut self) -> Vec<CtlAction> {
        let mut out = Vec::new();
        if self.phase == Phase::Stopped {
            self.relock(&mut out);
        }
        out
    }

    /// Queues an operation; it runs after recovery, one at a time, and finishes with the new
    /// configuration's number or the refusal (nothing written).
    pub fn submit(&mut self, ticket: u64, op: Op) -> Vec<CtlAction> {
        self.tickets.push_back((
            ticket,
            Job::Op {
                op,
                attempted: None,
            },
        ));
        let mut out = Vec::new();
        self.next_ticket(&mut out);
        out
    }

    /// Queues a query of configuration `num` (`None`: the latest), read from the history; it
    /// finishes with the number, and the configuration is then [`Controller::config`].
    pub fn submit_query(&mut self, ticket: u64, num: Option<u64>) -> Vec<CtlAction> {
        self.tickets.push_back((ticket, Job::Query(num)));
        let mut out = Vec::new();
        self.next_ticket(&mut out);
        out
    }

    /// Configuration `num` if this controller has read it.
    pub fn config(&self, num: u64) -> Option<&Config> {
        self.configs.get(&num)
    }

    /// The lease the lock is held under, if granted. A driver that stops for good revokes it
    /// (`KvOp::LeaseRevoke`), which deletes the lock key, so the next controller need not wait
    /// for the lease to run out.
    pub fn lease(&self) -> Option<u64> {
        self.lease
    }

    /// The latest record read from the store.
    pub fn latest(&self) -> Option<&Record> {
        self.latest.as_ref().map(|(r, _)| r)
    }

    /// The state, for operators and tests.
    pub fn status(&self) -> ControllerStatus {
        let changing = matches!(&self.current, Some((_, Job::Op { attempted: Some(c), .. }))
            if self.latest.as_ref().is_some_and(|(r, _)| r.config == *c));
        let phase = match self.phase {
            Phase::Stopped | Phase::Locking => CtlPhase::Locking,
            Phase::Applying => CtlPhase::Changing,
            Phase::Loading | Phase::Driving | Phase::Completing if changing => CtlPhase::Changing,
            Phase::Loading | Phase::Driving | Phase::Completing => CtlPhase::Recovering,
            Phase::Idle | Phase::Querying => CtlPhase::Idle,
        };
        let (pending, done) = self.drive.as_ref().map_or((0, 0), |d| {
            let done = d
                .moves
                .iter()
                .filter(|m| m.state == MoveState::Done)
                .count();
            (d.moves.len() - done, done)
        });
        ControllerStatus {
            phase,
            holds_lock: self.lock.as_ref().is_some_and(Lock::is_held),
            latest: self.latest.as_ref().map(|(r, _)| r.config.num),
            complete: self.latest.as_ref().is_some_and(|(r, _)| r.complete),
            moves_pending: pending,
            moves_done: done,
            queued: self.tickets.len() + usize::from(self.current.is_some()),
            last_problem: self.last_problem.clone(),
        }
    }

    // ---- the store ----

    fn store(&mut self, op: KvOp, purpose: Purpose, out: &mut Vec<CtlAction>) {
        let job = StoreJob {
            op,
            purpose,
            gen: self.gen,
        };
        if matches!(job.purpose, Purpose::KeepAlive(_)) {
            self.store_queue.push_front(job);
        } else {
            self.store_queue.push_back(job);
        }
        self.pump_store(out);
    }

    fn pump_store(&mut self, out: &mut Vec<CtlAction>) {
        if self.store_busy.is_some() {
            return;
        }
        let Some(job) = self.store_queue.pop_front() else {
            return;
        };
        match self.clerk.start(job.op.clone()) {
            Ok(actions) => {
                self.store_busy = Some(job);
                self.clerk_actions(actions, out);
            }
            // The clerk is idle whenever `store_busy` is None; keep the job for later.
            Err(_) => self.store_queue.push_front(job),
        }
    }

    fn clerk_actions(&mut self, actions: Vec<Action>, out: &mut Vec<CtlAction>) {
        for a in actions {
            match a {
                Action::Send { server, request } => out.push(CtlAction::Store { server, request }),
                Action::SetTimer { after, token: t } => out.push(CtlAction::SetTimer {
                    after,
                    token: (t & CLERK_BACKOFF_BIT) | token(KIND_CLERK, t),
                }),
                Action::Finished(outcome) => {
                    if let Some(job) = self.store_busy.take() {
                        if job.gen == self.gen || matches!(job.purpose, Purpose::KeepAlive(_)) {
                            self.on_store_outcome(job.purpose, outcome, out);
                        }
                    }
                    self.pump_store(out);
                }
            }
        }
    }

    /// A reply from a store server.
    pub fn on_store_reply(&mut self, reply: KvReply) -> Vec<CtlAction> {
        let mut out = Vec::new();
        let actions = self.clerk.on_reply(reply);
        self.clerk_actions(actions, &mut out);
        out
    }

    fn on_store_outcome(&mut self, purpose: Purpose, outcome: Outcome, out: &mut Vec<CtlAction>) {
        let result = match &outcome {
            Outcome::Done(r) => Some(r.clone()),
            Outcome::Maybe => None,
        };
        match purpose {
            Purpose::Grant => match result {
                Some(KvResult::LeaseGranted { id, .. }) => {
                    self.lease = Some(id);
                    self.unconfirmed = 0;
                    let mut lock = Lock::with_lease(LOCK_KEY.to_vec(), self.cfg.name.clone(), id);
                    lock.set_retry(self.cfg.retry_timeout);
                    let step = lock.acquire();
                    self.lock = Some(lock);
                    self.arm_keepalive(out);
                    self.lock_step(step, out);
                }
                Some(KvResult::Refused { reason }) => {
                    self.problem(format!(
                        "the store refused the lease ({reason}): check lease_ttl_ms against \
                         the store's lease limits; retrying"
                    ));
                    self.retry_later(out);
                }
                other => {
                    self.problem(format!("lease grant answered {other:?}; retrying"));
                    self.retry_later(out);
                }
            },
            Purpose::KeepAlive(id) => {
                if self.lease != Some(id) {
                    return;
                }
                match result {
                    Some(KvResult::LeaseKept { .. }) => self.unconfirmed = 0,
                    Some(KvResult::LeaseNotFound { .. }) => {
                        self.problem(
                            "the lease is gone: stopped driving, acquiring the lock again",
                        );
                        self.relock(out);
                    }
                    _ => {}
                }
            }
            Purpose::Revoke => {}
            Purpose::Attach => match result {
                Some(KvResult::Written { .. }) => self.reload(out),
                other => {
                    self.problem(format!(
                        "re-attaching the lock to our lease answered {other:?}: acquiring again"
                    ));
                    self.relock(out);
                }
            },
            Purpose::Lock => {
                let step = match self.lock.as_mut() {
                    Some(lock) => lock.on_outcome(outcome),
                    None => return,
                };
                self.lock_step(step, out);
            }
            Purpose::Load => match result {
                Some(KvResult::NoKey) => match Config::empty(self.cfg.shards) {
                    Ok(config) => {
                        let record = Record {
                            config,
                            moves: Vec::new(),
                            complete: true,
                        };
                        let op = KvOp::Put {
                            key: LATEST_KEY.to_vec(),
                            value: record.encode(),
                            expected: Expected::Version(0),
                        };
                        self.store(op, Purpose::Create(record), out);
                    }
                    Err(e) => self.problem(e.to_string()),
                },
                Some(KvResult::Found { value, version }) => match Record::decode(&value) {
                    Ok(record) => self.loaded(record, version, out),
                    Err(e) => {
                        self.problem(format!(
                            "the latest record does not decode ({e}); not overwriting it, \
                             retrying: repair the store's {} key",
                            String::from_utf8_lossy(LATEST_KEY)
                        ));
                        self.retry_later(out);
                    }
                },
                other => {
                    self.problem(format!("loading the latest record answered {other:?}"));
                    self.retry_later(out);
                }
            },
            Purpose::Create(record) => match result {
                Some(KvResult::Written { version }) => self.loaded(record, version, out),
                // Someone else created it (or our put applied on an earlier send): read it.
                Some(KvResult::VersionMismatch) | None => self.reload(out),
                Some(other) => {
                    self.problem(format!("creating configuration 0 answered {other:?}"));
                    self.retry_later(out);
                }
            },
            Purpose::EnsureHistory(n) => match result {
                // Written, or already there (mismatch): configurations never change.
                Some(KvResult::Written { .. } | KvResult::VersionMismatch) => {
                    if let Some((record, _)) = &self.latest {
                        if record.config.num == n {
                            let record = record.clone();
                            self.after_history(record, out);
                        }
                    }
                }
                // Maybe (the session expired: it may not have applied) or refused: again.
                other => {
                    self.problem(format!("writing history entry {n} answered {other:?}"));
                    self.retry_later(out);
                }
            },
            Purpose::FetchConfig(k) => {
                self.fetching.remove(&k);
                match result {
                    Some(KvResult::Found { value, .. }) => match Config::decode(&value) {
                        Ok(c) if c.num == k => {
                            self.configs.insert(k, c);
                            self.config_arrived(k, out);
                        }
                        Ok(c) => {
                            self.problem(format!(
                                "history entry {k} holds configuration {}",
                                c.num
                            ));
                            self.retry_later(out);
                        }
                        Err(e) => {
                            self.problem(format!("history entry {k} does not decode: {e}"));
                            self.retry_later(out);
                        }
                    },
                    other => {
                        self.problem(format!("history entry {k} answered {other:?}"));
                        self.retry_later(out);
                    }
                }
            }
            Purpose::CasNew(record) => match result {
                Some(KvResult::Written { version }) => {
                    self.configs
                        .insert(record.config.num, record.config.clone());
                    self.loaded(record, version, out);
                }
                Some(KvResult::VersionMismatch) | None => self.recheck(out),
                // Refused by the store's rules (too large): nothing was written, and trying
                // again would give the same answer.
                Some(other) => {
                    if let Some((ticket, _)) = self.current.take() {
                        out.push(CtlAction::Finished {
                            ticket,
                            result: Err(format!(
                                "the store refused configuration {}: {other:?}",
                                record.config.num
                            )),
                        });
                    }
                    self.phase = Phase::Idle;
                    self.next_ticket(out);
                }
            },
            Purpose::CasComplete => match result {
                Some(KvResult::Written { version }) => {
                    if let Some((record, v)) = self.latest.as_mut() {
                        record.complete = true;
                        *v = version;
                    }
                    self.drive = None;
                    self.phase = Phase::Idle;
                    self.next_ticket(out);
                }
                Some(KvResult::VersionMismatch) | None => self.recheck(out),
                Some(other) => {
                    self.problem(format!("marking the change complete answered {other:?}"));
                    self.retry_later(out);
                }
            },
            Purpose::CheckAttempt(n) => {
                match result {
                    Some(KvResult::Found { value, .. }) => match Config::decode(&value) {
                        Ok(c) if c.num == n => {
                            self.configs.insert(n, c);
                        }
                        other => {
                            self.problem(format!("history entry {n} holds {other:?}"));
                            return self.retry_later(out);
                        }
                    },
                    // Every number below the latest is in the history (a controller writes
                    // the latest there before it installs the next): not ours, then.
                    Some(KvResult::NoKey) => {
                        if let Some((_, Job::Op { attempted, .. })) = self.current.as_mut() {
                            *attempted = None;
                        }
                    }
                    other => {
                        self.problem(format!("reading history entry {n} answered {other:?}"));
                        return self.retry_later(out);
                    }
                }
                self.phase = Phase::Idle;
                self.next_ticket(out);
            }
            Purpose::Query(n) => {
                let Some((ticket, _)) = self.current.take() else {
                    return;
                };
                let result = match result {
                    Some(KvResult::Found { value, .. }) => match Config::decode(&value) {
                        Ok(c) if c.num == n => {
                            self.configs.insert(n, c);
                            Ok(n)
                        }
                        Ok(c) => Err(format!("history entry {n} holds configuration {}", c.num)),
                        Err(e) => Err(format!("history entry {n} does not decode: {e}")),
                    },
                    Some(KvResult::NoKey) => Err(crate::Error::UnknownConfig {
                        asked: n,
                        latest: self.latest.as_ref().map_or(0, |(r, _)| r.config.num),
                    }
                    .to_string()),
                    other => Err(format!("reading the history answered {other:?}")),
                };
                out.push(CtlAction::Finished { ticket, result });
                self.phase = Phase::Idle;
                self.next_ticket(out);
            }
        }
    }

    fn problem(&mut self, p: impl Into<String>) {
        let p = p.into();
        tracing::warn!(problem = %p, "shard controller");
        self.last_problem = Some(p);
    }

    // ---- lock and lease ----

    /// Drops all work and starts over from granting a lease.
    fn relock(&mut self, out: &mut Vec<CtlAction>) {
        self.drop_work();
        // The old lease's keep-alives are pointless now.
        self.store_queue.clear();
        self.lease = None;
        self.lock = None;
        self.phase = Phase::Locking;
        self.store(
            KvOp::LeaseGrant {
                ttl_ms: self.cfg.lease_ttl_ms,
            },
            Purpose::Grant,
            out,
        );
    }

    /// Forgets in-flight store jobs, group calls and the drive (a new generation).
    fn drop_work(&mut self) {
        self.gen += 1;
        // Keep-alives are not work to drop: the lease must live on while we reload.
        self.store_queue
            .retain(|j| matches!(j.purpose, Purpose::KeepAlive(_)));
        self.calls.clear();
        self.fetching.clear();
        self.drive = None;
    }

    fn arm_keepalive(&mut self, out: &mut Vec<CtlAction>) {
        if let Some(lease) = self.lease {
            out.push(CtlAction::SetTimer {
                after: Duration::from_millis(self.cfg.lease_ttl_ms / 3),
                token: token(KIND_KEEPALIVE, lease),
            });
        }
    }

    fn lock_step(&mut self, step: LockStep, out: &mut Vec<CtlAction>) {
        match step {
            LockStep::Run(op) => self.store(op, Purpose::Lock, out),
            LockStep::Wait(after) => {
                self.lock_wait += 1;
                out.push(CtlAction::SetTimer {
                    after,
                    token: token(KIND_LOCK_WAIT, self.lock_wait),
                });
            }
            // The lock finds its key holding our name also when an earlier incarnation of this
            // controller (same name, another lease) claimed it: re-attach the key to our lease
            // at the version held, so that it cannot vanish with a lease we do not keep alive.
            LockStep::Acquired => match (self.lock.as_ref().and_then(Lock::version), self.lease) {
                (Some(version), Some(lease)) => {
                    let op = KvOp::PutLease {
                        key: LOCK_KEY.to_vec(),
                        value: self.cfg.name.clone(),
                        expected: Expected::Version(version),
                        lease,
                    };
                    self.store(op, Purpose::Attach, out);
                }
                _ => self.relock(out),
            },
            LockStep::LeaseLost => self.relock(out),
            LockStep::Released => {}
        }
    }

    /// Re-checks the lease (a keep-alive: while the lease lives, the lock key attached to it is
    /// ours), then reloads: after a conditional put that failed.
    fn recheck(&mut self, out: &mut Vec<CtlAction>) {
        self.reload(out);
        if let Some(id) = self.lease {
            self.store(KvOp::LeaseKeepAlive { id }, Purpose::KeepAlive(id), out);
        }
    }

    // ---- the latest record ----

    fn reload(&mut self, out: &mut Vec<CtlAction>) {
        self.drop_work();
        self.phase = Phase::Loading;
        self.store(
            KvOp::Get {
                key: LATEST_KEY.to_vec(),
            },
            Purpose::Load,
            out,
        );
    }

    /// Pauses `retry_timeout`, then reloads (or regrants while locking).
    fn retry_later(&mut self, out: &mut Vec<CtlAction>) {
        self.drop_work();
        self.retry_gen = self.gen;
        out.push(CtlAction::SetTimer {
            after: self.cfg.retry_timeout,
            token: token(KIND_RETRY, self.gen),
        });
    }

    fn loaded(&mut self, record: Record, version: u64, out: &mut Vec<CtlAction>) {
        self.configs
            .insert(record.config.num, record.config.clone());
        let n = record.config.num;
        self.latest = Some((record.clone(), version));
        self.phase = Phase::Loading;
        let op = KvOp::Put {
            key: config_key(n),
            value: record.config.encode(),
            expected: Expected::Version(0),
        };
        self.store(op, Purpose::EnsureHistory(n), out);
    }

    fn after_history(&mut self, record: Record, out: &mut Vec<CtlAction>) {
        if record.complete {
            self.phase = Phase::Idle;
            self.next_ticket(out);
            return;
        }
        let n = record.config.num;
        self.phase = Phase::Driving;
        let pre = self.cfg.precopy && record.moves.iter().any(|m| m.from != NO_GROUP);
        self.drive = Some(Drive {
            num: n,
            pre,
            prev: None,
            adopt: BTreeMap::new(),
            moves: record
                .moves
                .iter()
                .filter(|m| m.from != NO_GROUP)
                .map(|&mv| MoveRun {
                    mv,
                    copy: CopyRun::default(),
                    state: MoveState::Waiting,
                    pre: Pre::NotStarted,
                    resume: None,
                    data: None,
                    delta: DeltaRun::default(),
                })
                .collect(),
        });
        match n.checked_sub(1) {
            Some(p) => self.need_config(p, out),
            // Configuration 0 is complete when created; an incomplete 0 has nothing to move.
            None => self.complete(out),
        }
    }

    fn need_config(&mut self, k: u64, out: &mut Vec<CtlAction>) {
        if self.configs.contains_key(&k) {
            self.config_arrived(k, out);
            return;
        }
        if k == 0 {
            if let Some((r, _)) = &self.latest {
                if let Ok(c) = Config::empty(r.config.num_shards()) {
                    self.configs.insert(0, c);
                    self.config_arrived(0, out);
                    return;
                }
            }
        }
        if self.fetching.insert(k) {
            self.store(
                KvOp::Get { key: config_key(k) },
                Purpose::FetchConfig(k),
                out,
            );
        }
    }

    fn config_arrived(&mut self, k: u64, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        if drive.prev.is_none() && k + 1 == drive.num {
            let prev = self.configs[&k].clone();
            let next = &self.configs[&drive.num];
            let gids: BTreeSet<Gid> = prev
                .groups
                .keys()
                .chain(next.groups.keys())
                .copied()
                .collect();
            drive.adopt = gids.into_iter().map(|g| (g, AdoptState::Asking)).collect();
            drive.prev = Some(prev);
            let gids: Vec<Gid> = drive.adopt.keys().copied().collect();
            for gid in gids {
                self.call(gid, ControlOp::Adopted, CallFor::Adopted(gid), out);
            }
            self.check_adopted(out);
            return;
        }
        let waiting: Vec<Gid> = drive
            .adopt
            .iter()
            .filter(|(_, s)| **s == AdoptState::NeedConfig(k))
            .map(|(&g, _)| g)
            .collect();
        for gid in waiting {
            self.send_adopt(gid, k, out);
        }
    }

    fn send_adopt(&mut self, gid: Gid, k: u64, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        let Some(config) = self.configs.get(&k) else {
            drive.adopt.insert(gid, AdoptState::NeedConfig(k));
            self.need_config(k, out);
            return;
        };
        let op = ControlOp::Adopt {
            config: config.encode(),
        };
        drive.adopt.insert(gid, AdoptState::Adopting(k));
        self.call(gid, op, CallFor::Adopt(gid, k), out);
    }

    /// The group has adopted `adopted`: done, or the next configuration.
    fn adopted(&mut self, gid: Gid, adopted: u64, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        if adopted > drive.num {
            self.moved_past(out);
            return;
        }
        // While copying live, the old owners must not adopt N yet (they would stop serving).
        let target = if drive.pre { drive.num - 1 } else { drive.num };
        if adopted >= target {
            drive.adopt.insert(gid, AdoptState::Done);
            self.check_adopted(out);
        } else {
            self.send_adopt(gid, adopted + 1, out);
        }
    }

    fn check_adopted(&mut self, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_ref() else {
            return;
        };
        if drive.adopt.values().all(|s| *s == AdoptState::Done) {
            if drive.pre {
                self.start_precopies(out);
            } else {
                self.start_moves(out);
            }
        }
    }

    /// Starts the copies while serving (at most `max_parallel_moves` at once); once every
    /// move's is done or skipped, every group adopts N and the moves go on frozen.
    fn start_precopies(&mut self, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        if !drive.pre {
            return;
        }
        let free = drive.free_move_slots(self.cfg.max_parallel_moves);
        let start: Vec<usize> = drive
            .moves
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state == MoveState::Waiting && m.pre == Pre::NotStarted)
            .map(|(i, _)| i)
            .take(free)
            .collect();
        for i in start {
            if let Some(d) = self.drive.as_mut() {
                d.moves[i].pre = Pre::Running;
            }
            self.step(i, Step::CopyStart, out);
        }
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        if drive
            .moves
            .iter()
            .all(|m| matches!(m.pre, Pre::Done | Pre::Skipped))
        {
            drive.pre = false;
            let gids: Vec<Gid> = drive.adopt.keys().copied().collect();
            for &gid in &gids {
                drive.adopt.insert(gid, AdoptState::Asking);
            }
            for gid in gids {
                self.call(gid, ControlOp::Adopted, CallFor::Adopted(gid), out);
            }
        }
    }

    /// The old owner answered move i's `CopyStart`: copy the live shard, or (refused: it
    /// adopted N already) leave the whole copy for after the freeze.
    fn copy_started(&mut self, i: usize, started: bool, out: &mut Vec<CtlAction>) {
        if started {
            self.start_copy(i, Step::PreCopy, false, out);
            return;
        }
        if let Some(d) = self.drive.as_mut() {
            d.moves[i].pre = Pre::Skipped;
            d.moves[i].state = MoveState::Waiting;
        }
        self.start_precopies(out);
    }

    /// A group is past the configuration being driven: a later one exists. Reload.
    fn moved_past(&mut self, out: &mut Vec<CtlAction>) {
        // Someone else installed a later configuration: re-check our lease as well.
        self.problem("a group is past the configuration being driven: reloading");
        self.recheck(out);
    }

    // ---- moves ----

    fn start_moves(&mut self, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        let free = drive.free_move_slots(self.cfg.max_parallel_moves);
        let start: Vec<usize> = drive
            .moves
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state == MoveState::Waiting)
            .map(|(i, _)| i)
            .take(free)
            .collect();
        for i in start {
            self.step(i, Step::Freeze, out);
        }
        if let Some(drive) = self.drive.as_ref() {
            if drive.moves.iter().all(|m| m.state == MoveState::Done) {
                self.complete(out);
            }
        }
    }

    fn step(&mut self, i: usize, step: Step, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        let num = drive.num;
        let m = &mut drive.moves[i];
        m.state = MoveState::Running(step);
        let (shard, from, to) = (m.mv.shard, m.mv.from, m.mv.to);
        let (gid, op) = match step {
            Step::CopyStart => (from, ControlOp::CopyStart { shard, config: num }),
            Step::CopyRound => (
                from,
                ControlOp::CopyRound {
                    shard,
                    config: num,
                    round: m.delta.round,
                },
            ),
            Step::PreCopy | Step::Copy | Step::Delta => {
                self.start_copy(i, step, false, out);
                return;
            }
            Step::Freeze => (from, ControlOp::Freeze { shard, config: num }),
            Step::Probe => (
                to,
                ControlOp::Install {
                    shard,
                    config: num,
                    data: Vec::new(),
                },
            ),
            Step::Install => (
                to,
                ControlOp::Install {
                    shard,
                    config: num,
                    data: m.data.clone().unwrap_or_default(),
                },
            ),
            Step::Delete => (from, ControlOp::Delete { shard, config: num }),
        };
        self.call(gid, op, CallFor::Step(i, step), out);
    }

    fn step_done(&mut self, i: usize, step: Step, out: &mut Vec<CtlAction>) {
        let next = match step {
            // Answered by `copy_started` and `copy_progress`.
            Step::CopyStart | Step::PreCopy | Step::Delta => return,
            Step::CopyRound => {
                let last = self.drive.as_ref().is_some_and(|d| d.moves[i].delta.last);
                if last {
                    // The last round's keys ride in the tail: the copy while serving is over.
                    if let Some(d) = self.drive.as_mut() {
                        d.moves[i].pre = Pre::Done;
                        d.moves[i].state = MoveState::Waiting;
                    }
                    self.start_precopies(out);
                } else {
                    self.start_copy(i, Step::Delta, false, out);
                }
                return;
            }
            Step::Freeze => Some(Step::Copy),
            Step::Copy | Step::Probe => Some(Step::Install),
            Step::Install => Some(Step::Delete),
            Step::Delete => None,
        };
        match next {
            Some(s) => self.step(i, s, out),
            None => {
                if let Some(drive) = self.drive.as_mut() {
                    drive.moves[i].state = MoveState::Done;
                    drive.moves[i].data = None;
                }
                self.start_moves(out);
            }
        }
    }

    /// (Re)starts move i's chunked copy (`step`: of the live shard, or of the frozen one) as a
    /// new round, from the first key — or, for the first copy after a copy while serving,
    /// after the last key copied then (now, or after a pause when the previous attempt was
    /// refused).
    fn start_copy(&mut self, i: usize, step: Step, later: bool, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        let m = &mut drive.moves[i];
        m.state = MoveState::Running(step);
        m.data = None;
        let round = m.copy.round + 1;
        let after = if step == Step::Copy {
            m.resume.take()
        } else {
            None
        };
        m.copy = CopyRun {
            round,
            after,
            ..CopyRun::default()
        };
        // Calls of an earlier round are no longer wanted.
        self.calls.retain(|_, c| {
            !matches!(c.purpose,
                CallFor::Chunk(j, _) | CallFor::Stage(j, _) | CallFor::Delta(j, _) if j == i)
        });
        self.next_chunk(i, later, out);
    }

    /// Asks the old owner for move i's next chunk.
    fn next_chunk(&mut self, i: usize, later: bool, out: &mut Vec<CtlAction>) {
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        let num = drive.num;
        let m = &mut drive.moves[i];
        m.copy.exporting = true;
        let delta = m.state == MoveState::Running(Step::Delta);
        let (op, purpose) = if delta {
            let op = ControlOp::ExportDelta {
                shard: m.mv.shard,
                config: num,
                after: m.copy.after.clone(),
                max_bytes: self.cfg.chunk_bytes,
            };
            (op, CallFor::Delta(i, m.copy.round))
        } else {
            let op = ControlOp::ExportChunk {
                shard: m.mv.shard,
                config: num,
                after: m.copy.after.clone(),
                max_bytes: self.cfg.chunk_bytes,
            };
            (op, CallFor::Chunk(i, m.copy.round))
        };
        let from = m.mv.from;
        // Throttled while the shard serves (not before its first chunk).
        let pace = matches!(
            m.state,
            MoveState::Running(Step::PreCopy) | MoveState::Running(Step::Delta)
        ) && m.copy.after.is_some();
        let pause = self.cfg.precopy_pause;
        if later {
            self.call_later(from, op, purpose, out);
        } else if pace && !pause.is_zero() {
            if let Some(tag) = self.new_call(from, op, purpose) {
                self.resend_after(tag, pause, out);
            }
        } else {
            self.call(from, op, purpose, out);
        }
    }

    /// Move i's copy round `round`, if it is the one running.
    fn copy_of(&mut self, i: usize, round: u64) -> Option<&mut CopyRun> {
        let m = self.drive.as_mut()?.moves.get_mut(i)?;
        let copying = matches!(
            m.state,
            MoveState::Running(Step::Copy)
                | MoveState::Running(Step::PreCopy)
                | MoveState::Running(Step::Delta)
        );
        (copying && m.copy.round == round).then_some(&mut m.copy)
    }

    /// A chunk of move i's copy arrived: stage it, read the next one while few stages are in
    /// flight, and install once the tail is in hand and every stage answered.
    fn chunk_arrived(
        &mut self,
        i: usize,
        round: u64,
        chunk: Option<ShardChunk>,
        out: &mut Vec<CtlAction>,
    ) {
        let live = self
            .drive
            .as_ref()
            .and_then(|d| d.moves.get(i))
            .is_some_and(|m| m.state == MoveState::Running(Step::PreCopy));
        let Some(chunk) = chunk else {
            if self.copy_of(i, round).is_some() {
                if live {
                    // The old owner no longer copies the shard live: copy it frozen.
                    self.copy_started(i, false, out);
                } else {
                    // Not frozen at this number here: deleted after its install (an earlier
                    // controller's) — ask the new owner.
                    self.step(i, Step::Probe, out);
                }
            }
            return;
        };
        let stages_max = if live {
            self.cfg.precopy_stages_in_flight.max(1)
        } else {
            self.cfg.stages_in_flight
        };
        let Some(drive) = self.drive.as_ref() else {
            return;
        };
        let (num, mv) = (drive.num, drive.moves[i].mv);
        let Some(copy) = self.copy_of(i, round) else {
            return;
        };
        copy.exporting = false;
        if let Some(last) = chunk.items.last() {
            copy.after = Some(last.key.clone());
        }
        if live {
            // A live copy has no tail: it ends at an empty chunk (the tail comes after the
            // freeze, with the keys written meanwhile).
            if chunk.items.is_empty() || chunk.tail.is_some() {
                copy.live_end = true;
            }
        } else if chunk.tail.is_some() {
            copy.tail = chunk.tail;
        }
        let stage = !chunk.items.is_empty();
        if stage {
            copy.stages += 1;
        }
        let more = copy.tail.is_none() && !copy.live_end && copy.stages < stages_max;
        if stage {
            // Staged as the round it was read in: a chunk of the live shard as round 0 (a
            // delta round staged since wins over it), one of the frozen shard as the last.
            let op = ControlOp::StageRound {
                shard: mv.shard,
                config: num,
                round: if live { 0 } else { FROZEN_ROUND },
                items: chunk.items,
                absent: Vec::new(),
            };
            self.call(mv.to, op, CallFor::Stage(i, round), out);
        }
        if more {
            self.next_chunk(i, false, out);
        }
        self.copy_progress(i, round, out);
    }

    /// A chunk of move i's delta round arrived (copy round `round`): stage it as the old
    /// owner's round, and read the next one while few stages are in flight.
    fn delta_arrived(
        &mut self,
        i: usize,
        round: u64,
        chunk: Option<DeltaChunk>,
        out: &mut Vec<CtlAction>,
    ) {
        if self.copy_of(i, round).is_none() {
            return;
        }
        let Some(chunk) = chunk else {
            // The old owner no longer copies the shard live: the rest is copied frozen.
            self.problem("a delta round was refused: the shard is copied frozen");
            self.copy_started(i, false, out);
            return;
        };
        let Some(drive) = self.drive.as_mut() else {
            return;
        };
        let num = drive.num;
        let m = &mut drive.moves[i];
        if chunk.round != m.delta.round {
            // Past ours: an earlier controller started later rounds, and the old owner's
            // keys are that round's (staged as it). Behind: read again after a pause.
            let later = chunk.round < m.delta.round;
            m.delta.round = m.delta.round.max(chunk.round);
            m.delta.bytes = 0;
            m.delta.keys = 0;
            self.start_copy(i, Step::Delta, later, out);
            return;
        }
        let (mv, delta_round) = (m.mv, m.delta.round);
        m.delta.bytes += chunk.bytes();
        m.delta.keys += (chunk.items.len() + chunk.absent.len()) as u64;
        let stages_max = self.cfg.precopy_stages_in_flight.max(1);
        let Some(copy) = self.copy_of(i, round) else {
            return;
        };
        copy.exporting = false;
        if let Some(last) = chunk.last_key() {
            copy.after = Some(last.to_vec());
        }
        if chunk.last {
            copy.live_end = true;
        }
        let stage = !chunk.items.is_empty() || !chunk.absent.is_empty();
        if stage {
            copy.stages += 1;
        }
        let more = !copy.live_end && copy.stages < stages_max;
        if stage {
            let op = ControlOp::StageRound {
                shard: mv.shard,
                config: num,
                round: delta_round,
                items: chunk.items,
                absent: chunk.absent,
            };
            self.call(mv.to, op, CallFor::Stage(i, round), out);
        }
        if more {
            self.next_chunk(i, false, out);
        }
        self.copy_progress(i, round, out);
    }

    /// A stage of move i's copy round `round` was decided.
    fn staged(&mut self, i: usize, round: u64, out: &mut Vec<CtlAction>) {
        let Some(copy) = self.copy_of(i, round) else {
            return;
        };
        copy.stages = copy.stages.saturating_sub(1);
        let more = copy.tail.is_none() && !copy.live_end && !copy.exporting;
        if more {
            self.next_chunk(i, false, out);
        }
        self.copy_progress(i, round, out);
    }

    fn copy_progress(&mut self, i: usize, round: u64, out: &mut Vec<CtlAction>) {
        let Some(copy) = self.copy_of(i, round) else {
            return;
        };
        if copy.stages > 0 || copy.exporting {
            return;
        }
        if copy.live_end {
            let after = copy.after.clone();
            let (max_rounds, min_bytes) = (self.cfg.delta_rounds, self.cfg.delta_min_bytes);
            let Some(d) = self.drive.as_mut() else {
                return;
            };
            let m = &mut d.moves[i];
            if m.state == MoveState::Running(Step::Delta) {
                // Delta round staged: another one while it shrinks the tail, else a last
                // round that only acknowledges this one (its keys ride in the tail).
                let bytes = m.delta.bytes;
                if m.delta.keys == 0 {
                    // Nothing pending: the tail is the keys written since this round began
                    // without another round to acknowledge it.
                    m.pre = Pre::Done;
                    m.state = MoveState::Waiting;
                    self.start_precopies(out);
                    return;
                }
                m.delta.staged += 1;
                m.delta.last = m.delta.staged >= max_rounds
                    || bytes <= min_bytes
                    || m.delta.prev_bytes.is_some_and(|p| bytes >= p);
                m.delta.prev_bytes = Some(bytes);
                m.delta.bytes = 0;
                m.delta.keys = 0;
                m.delta.round = m.delta.round.saturating_add(1);
                self.step(i, Step::CopyRound, out);
                return;
            }
            m.resume = after;
            if max_rounds > 0 {
                m.delta = DeltaRun {
                    round: 1,
                    ..DeltaRun::default()
                };
                self.step(i, Step::CopyRound, out);
                return;
            }
            m.pre = Pre::Done;
            m.state = MoveState::Waiting;
            self.start_precopies(out);
            return;
        }
        let Some(tail) = copy.tail.take() else {
            return;
        };
        if let Some(d) = self.drive.as_mut() {
            d.moves[i].data = Some(tail);
        }
        self.step_done(i, Step::Copy, out);
    }

    fn complete(&mut self, out: &mut Vec<CtlAction>) {
        let Some((record, version)) = self.latest.clone() else {
            return;
        };
        self.phase = Phase::Completing;
        let done = Record {
            complete: true,
            ..record
        };
        let op = KvOp::Put {
            key: LATEST_KEY.to_vec(),
            value: done.encode(),
            expected: Expected::Version(version),
        };
        self.store(op, Purpose::CasComplete, out);
    }

    // ---- group calls ----

    fn servers_of(&self, gid: Gid) -> Vec<String> {
        let drive_num = self.drive.as_ref().map(|d| d.num);
        let newer = drive_num.and_then(|n| self.configs.get(&n));
        let older = self.drive.as_ref().and_then(|d| d.prev.as_ref());
        newer
            .and_then(|c| c.groups.get(&gid))
            .or_else(|| older.and_then(|c| c.groups.get(&gid)))
            .cloned()
            .unwrap_or_default()
    }

    fn call(&mut self, gid: Gid, op: ControlOp, purpose: CallFor, out: &mut Vec<CtlAction>) {
        if let Some(tag) = self.new_call(gid, op, purpose) {
            self.send_call(tag, out);
        }
    }

    /// [`Controller::call`] after a pause of `retry_timeout`.
    fn call_later(&mut self, gid: Gid, op: ControlOp, purpose: CallFor, out: &mut Vec<CtlAction>) {
        if let Some(tag) = self.new_call(gid, op, purpose) {
            self.resend_later(tag, out);
        }
    }

    fn new_call(&mut self, gid: Gid, op: ControlOp, purpose: CallFor) -> Option<u64> {
        let servers = self.servers_of(gid);
        if servers.is_empty() {
            self.problem(format!("group {gid} has no servers in the configurations"));
            return None;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        self.calls.insert(
            tag,
            Call {
                gid,
                op,
                servers,
                purpose,
                sends: 0,
                hops: 0,
            },
        );
        Some(tag)
    }

    fn send_call(&mut self, tag: u64, out: &mut Vec<CtlAction>) {
        let Some(call) = self.calls.get_mut(&tag) else {
            return;
        };
        call.sends += 1;
        let i = *self.leaders.get(&call.gid).unwrap_or(&0) % call.servers.len();
        out.push(CtlAction::Group {
            gid: call.gid,
            server: call.servers[i].clone(),
            request: ControlRequest {
                tag,
                gid: call.gid,
                op: call.op.clone(),
            },
        });
        out.push(CtlAction::SetTimer {
            after: self.cfg.retry_timeout,
            token: token(KIND_CALL_TIMEOUT, (tag << 16) | (call.sends & 0xFFFF)),
        });
    }

    fn rotate(&mut self, gid: Gid, len: usize) {
        let i = self.leaders.entry(gid).or_insert(0);
        *i = (*i + 1) % len.max(1);
    }

    /// Resends call `tag` after a pause (refusals, unknown leader): never in a hot loop.
    fn resend_later(&mut self, tag: u64, out: &mut Vec<CtlAction>) {
        self.resend_after(tag, self.cfg.retry_timeout, out);
    }

    /// Sends (or resends) call `tag` after `after`.
    fn resend_after(&mut self, tag: u64, after: Duration, out: &mut Vec<CtlAction>) {
        if let Some(call) = self.calls.get_mut(&tag) {
            call.sends += 1;
            call.hops = 0;
            out.push(CtlAction::SetTimer {
                after,
                token: token(KIND_CALL_RESEND, (tag << 16) | (call.sends & 0xFFFF)),
            });
        }
    }

    /// A copy answer (a chunk or a delta) to call `tag` from server `pos` of group `gid`: that
    /// server leads, and the call is over. `false` when the old owner adopted a configuration
    /// past the one driven (the drive is over: [`Controller::moved_past`]).
    fn copy_answered(
        &mut self,
        gid: Gid,
        pos: Option<usize>,
        tag: u64,
        adopted: u64,
        out: &mut Vec<CtlAction>,
    ) -> bool {
        if let Some(i) = pos {
            self.leaders.insert(gid, i);
        }
        self.calls.remove(&tag);
        let num = self.drive.as_ref().map_or(0, |d| d.num);
        if adopted > num {
            self.moved_past(out);
            return false;
        }
        true
    }

    /// A reply from server `server` of group `gid`.
    pub fn on_group_reply(
        &mut self,
        gid: Gid,
        server: &str,
        reply: ControlReply,
    ) -> Vec<CtlAction> {
        let mut out = Vec::new();
        let tag = reply.tag();
        let Some(call) = self.calls.get(&tag) else {
            return out;
        };
        if call.gid != gid {
            return out;
        }
        let (purpose, len, hops) = (call.purpose, call.servers.len(), call.hops);
        let pos = call.servers.iter().position(|s| s == server);
        match reply {
            ControlReply::NotLeader { leader, .. } => {
                let hint = leader
                    .and_then(|l| usize::try_from(l).ok())
                    .and_then(|l| l.checked_sub(1))
                    .filter(|&i| i < len && Some(i) != pos);
                match hint {
                    Some(i) if hops < len => {
                        self.leaders.insert(gid, i);
                        if let Some(call) = self.calls.get_mut(&tag) {
                            call.hops += 1;
                        }
                        self.send_call(tag, &mut out);
                    }
                    Some(i) => {
                        self.leaders.insert(gid, i);
                        self.resend_later(tag, &mut out);
                    }
                    None => {
                        self.rotate(gid, len);
                        self.resend_later(tag, &mut out);
                    }
                }
            }
            ControlReply::WrongGid { gid: theirs, .. } => {
                self.problem(format!(
                    "server {server} is in group {theirs}, not {gid}: check the configuration"
                ));
                self.rotate(gid, len);
                self.resend_later(tag, &mut out);
            }
            ControlReply::Invalid { reason, .. } => {
                self.problem(format!(
                    "group {gid} refused a request as invalid: {reason}"
                ));
                self.resend_later(tag, &mut out);
            }
            ControlReply::Adopted { adopted, .. } => {
                if let Some(i) = pos {
                    self.leaders.insert(gid, i);
                }
                self.calls.remove(&tag);
                match purpose {
                    CallFor::Adopted(g) => self.adopted(g, adopted, &mut out),
                    _ => self.unexpected(),
                }
            }
            ControlReply::Chunk { chunk, adopted, .. } => {
                if self.copy_answered(gid, pos, tag, adopted, &mut out) {
                    match purpose {
                        CallFor::Chunk(i, round) => self.chunk_arrived(i, round, chunk, &mut out),
                        _ => self.unexpected(),
                    }
                }
            }
            ControlReply::Delta { chunk, adopted, .. } => {
                if self.copy_answered(gid, pos, tag, adopted, &mut out) {
                    match purpose {
                        CallFor::Delta(i, round) => self.delta_arrived(i, round, chunk, &mut out),
                        _ => self.unexpected(),
                    }
                }
            }
            // This controller copies in chunks and never asks for a whole export, nor for
            // the shard count.
            ControlReply::Exported { .. } | ControlReply::Shards { .. } => self.unexpected(),
            ControlReply::Done {
                status, adopted, ..
            } => {
                if let Some(i) = pos {
                    self.leaders.insert(gid, i);
                }
                let num = self.drive.as_ref().map_or(0, |d| d.num);
                let Some(call) = self.calls.remove(&tag) else {
                    return out;
                };
                let past = matches!(status, ControlStatus::Stale { seen } if seen > num);
                if let (CallFor::Step(i, Step::CopyStart), false) = (purpose, past) {
                    let started =
                        matches!(status, ControlStatus::Applied | ControlStatus::AlreadyDone);
                    if let ControlStatus::Refused { reason } = &status {
                        self.problem(format!(
                            "group {gid} copies shard {} frozen: {reason}",
                            self.drive.as_ref().map_or(0, |d| d.moves[i].mv.shard)
                        ));
                    }
                    self.copy_started(i, started, &mut out);
                    return out;
                }
                match status {
                    ControlStatus::Stale { seen } if seen > num => self.moved_past(&mut out),
                    ControlStatus::Refused { reason } => match purpose {
                        // Not installed at the new owner, and no export: the export is still
                        // to come (the freeze's entry may not be applied at the leader read).
                        CallFor::Step(i, Step::Probe) => {
                            self.start_copy(i, Step::Copy, true, &mut out)
                        }
                        // The old owner does not copy the shard live any more (it adopted N, a
                        // later controller's): the keys left travel frozen, in the tail.
                        CallFor::Step(i, Step::CopyRound) => {
                            self.problem(format!(
                                "group {gid} refused a delta round: {reason}; copying frozen"
                            ));
                            self.copy_started(i, false, &mut out);
                        }
                        // The staged copy is not complete (or was dropped): copy it again.
                        CallFor::Step(i, Step::Install) => {
                            self.problem(format!("group {gid} refused the install: {reason}"));
                            self.start_copy(i, Step::Copy, true, &mut out);
                        }
                        // A gap (the group is behind what it told): ask again where it is.
                        CallFor::Adopt(g, k) => {
                            self.problem(format!(
                                "group {g} refused configuration {k}: {reason}; asking again"
                            ));
                            self.call_later(g, ControlOp::Adopted, CallFor::Adopted(g), &mut out);
                        }
                        _ => {
                            self.problem(format!("group {gid} refused {purpose:?}: {reason}"));
                            // Should not happen: retry the same step after a pause.
                            self.calls.insert(tag, call);
                            self.resend_later(tag, &mut out);
                        }
                    },
                    // Applied, AlreadyDone, or Stale at or below the number: done.
                    _ => match purpose {
                        CallFor::Adopt(g, _) => self.adopted(g, adopted, &mut out),
                        CallFor::Step(i, step) => self.step_done(i, step, &mut out),
                        CallFor::Stage(i, round) => self.staged(i, round, &mut out),
                        CallFor::Adopted(_) | CallFor::Chunk(..) | CallFor::Delta(..) => {
                            self.unexpected()
                        }
                    },
                }
            }
        }
        out
    }

    fn unexpected(&mut self) {
        self.problem("a group answered with a reply of another kind; ignored");
    }

    // ---- timers ----

    /// A timer set by [`CtlAction::SetTimer`] fired.
    pub fn on_timer(&mut self, t: u64) -> Vec<CtlAction> {
        let mut out = Vec::new();
        let kind = (t & !CLERK_BACKOFF_BIT) >> KIND_SHIFT;
        let payload = t & PAYLOAD;
        match kind {
            KIND_CLERK => {
                let actions = self.clerk.on_timer((t & CLERK_BACKOFF_BIT) | payload);
                self.clerk_actions(actions, &mut out);
            }
            KIND_KEEPALIVE if self.lease == Some(payload) => {
                self.unconfirmed += 1;
                if self.unconfirmed >= 3 {
                    // No keep-alive confirmed for a whole TTL: the store may have expired the
                    // lease and another controller may hold the lock. Stop driving now; revoke
                    // the lease (deleting the lock key if it still lives, so that our new
                    // lease's lock is not the old key) and acquire again.
                    self.problem(
                        "no keep-alive confirmed for a whole lease TTL (is the store \
                         reachable?): stopped driving, acquiring the lock again",
                    );
                    self.relock(&mut out);
                    let job = StoreJob {
                        op: KvOp::LeaseRevoke { id: payload },
                        purpose: Purpose::Revoke,
                        gen: self.gen,
                    };
                    self.store_queue.push_front(job);
                    self.pump_store(&mut out);
                    return out;
                }
                let queued = self
                    .store_queue
                    .iter()
                    .chain(self.store_busy.as_ref())
                    .any(|j| matches!(j.purpose, Purpose::KeepAlive(_)));
                if !queued {
                    self.store(
                        KvOp::LeaseKeepAlive { id: payload },
                        Purpose::KeepAlive(payload),
                        &mut out,
                    );
                }
                self.arm_keepalive(&mut out);
            }
            KIND_CALL_TIMEOUT | KIND_CALL_RESEND => {
                let tag = payload >> 16;
                let sends = payload & 0xFFFF;
                let Some(call) = self.calls.get(&tag) else {
                    return out;
                };
                if call.sends & 0xFFFF != sends {
                    return out;
                }
                if kind == KIND_CALL_TIMEOUT {
                    let (gid, len) = (call.gid, call.servers.len());
                    self.rotate(gid, len);
                }
                self.send_call(tag, &mut out);
            }
            KIND_LOCK_WAIT if payload == self.lock_wait & PAYLOAD => {
                if let Some(lock) = self.lock.as_mut() {
                    let step = lock.on_wait_done();
                    self.lock_step(step, &mut out);
                }
            }
            KIND_RETRY if payload == self.gen & PAYLOAD && self.gen == self.retry_gen => {
                if self.lease.is_none() || !self.lock.as_ref().is_some_and(Lock::is_held) {
                    self.relock(&mut out);
                } else {
                    self.reload(&mut out);
                }
            }
            _ => {}
        }
        out
    }

    // ---- tickets ----

    fn next_ticket(&mut self, out: &mut Vec<CtlAction>) {
        while self.phase == Phase::Idle {
            let Some((ticket, job)) = self.current.take().or_else(|| self.tickets.pop_front())
            else {
                return;
            };
            let Some((latest, _)) = self.latest.clone() else {
                self.current = Some((ticket, job));
                return;
            };
            match job {
                Job::Query(None) => out.push(CtlAction::Finished {
                    ticket,
                    result: Ok(latest.config.num),
                }),
                Job::Query(Some(n)) if n > latest.config.num => out.push(CtlAction::Finished {
                    ticket,
                    result: Err(crate::Error::UnknownConfig {
                        asked: n,
                        latest: latest.config.num,
                    }
                    .to_string()),
                }),
                Job::Query(Some(n)) if self.configs.contains_key(&n) || n == 0 => {
                    if n == 0 {
                        if let Ok(c) = Config::empty(latest.config.num_shards()) {
                            self.configs.entry(0).or_insert(c);
                        }
                    }
                    out.push(CtlAction::Finished {
                        ticket,
                        result: Ok(n),
                    })
                }
                Job::Query(Some(n)) => {
                    self.current = Some((ticket, Job::Query(Some(n))));
                    self.phase = Phase::Querying;
                    self.store(KvOp::Get { key: config_key(n) }, Purpose::Query(n), out);
                }
                Job::Op { op, attempted } => {
                    if attempted.as_ref() == Some(&latest.config) {
                        out.push(CtlAction::Finished {
                            ticket,
                            result: Ok(latest.config.num),
                        });
                        continue;
                    }
                    // Our put may have installed the attempt and we lost the lock before
                    // finishing it (cut off): another controller drove it and went on. The
                    // history says whether that number holds our configuration; applying the
                    // operation again would run it twice (a second Join of a group that left
                    // meanwhile) or report a refusal for an operation that was applied.
                    if let Some(c) = attempted.as_ref().filter(|c| c.num < latest.config.num) {
                        match self.configs.get(&c.num) {
                            Some(h) if h == c => {
                                out.push(CtlAction::Finished {
                                    ticket,
                                    result: Ok(c.num),
                                });
                                continue;
                            }
                            // Another controller's configuration took that number: ours was
                            // never installed; apply the operation to the latest below.
                            Some(_) => {}
                            None => {
                                let n = c.num;
                                self.current = Some((ticket, Job::Op { op, attempted }));
                                self.phase = Phase::Querying;
                                self.store(
                                    KvOp::Get { key: config_key(n) },
                                    Purpose::CheckAttempt(n),
                                    out,
                                );
                                return;
                            }
                        }
                    }
                    let next = match apply(&latest.config, &op) {
                        Ok(next) => next,
                        Err(e) => {
                            out.push(CtlAction::Finished {
                                ticket,
                                result: Err(e.to_string()),
                            });
                            continue;
                        }
                    };
                    let moves = match diff(&latest.config, &next) {
                        Ok(m) => m,
                        Err(e) => {
                            out.push(CtlAction::Finished {
                                ticket,
                                result: Err(e.to_string()),
                            });
                            continue;
                        }
                    };
                    let record = Record {
                        config: next.clone(),
                        moves,
                        complete: false,
                    };
                    let version = self.latest.as_ref().map_or(0, |(_, v)| *v);
                    self.current = Some((
                        ticket,
                        Job::Op {
                            op,
                            attempted: Some(next),
                        },
                    ));
                    self.phase = Phase::Applying;
                    let put = KvOp::Put {
                        key: LATEST_KEY.to_vec(),
                        value: record.encode(),
                        expected: Expected::Version(version),
                    };
                    self.store(put, Purpose::CasNew(record), out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_kv::{Limits, SingleServer};

    /// Carries the store traffic to a single server until none is left; returns the other
    /// actions in order.
    fn settle(c: &mut Controller, s: &mut SingleServer, actions: Vec<CtlAction>) -> Vec<CtlAction> {
        let mut queue: VecDeque<CtlAction> = actions.into();
        let mut rest = Vec::new();
        while let Some(a) = queue.pop_front() {
            match a {
                CtlAction::Store { request, .. } => {
                    let reply = s.handle(&request);
                    queue.extend(c.on_store_reply(reply));
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn group_sends(actions: &[CtlAction]) -> Vec<(String, ControlRequest)> {
        actions
            .iter()
            .filter_map(|a| match a {
                CtlAction::Group {
                    server, request, ..
                } => Some((server.clone(), request.clone())),
                _ => None,
            })
            .collect()
    }

    fn timers(actions: &[CtlAction]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                CtlAction::SetTimer { token, .. } => Some(*token),
                _ => None,
            })
            .collect()
    }

    /// Requests go to the believed leader, follow a NotLeader hint (a Raft id, index + 1),
    /// rotate after a pause without one, and move on to the next server on a timeout; stale
    /// timers do nothing.
    #[test]
    fn group_requests_follow_hints_rotate_and_time_out() {
        let mut store = SingleServer::new(Limits::default());
        let mut c = Controller::new(ControllerConfig::new(b"a".to_vec(), 1, vec![1], 4)).unwrap();
        let a = c.start();
        settle(&mut c, &mut store, a);
        assert_eq!(c.status().phase, CtlPhase::Idle);
        assert_eq!(c.status().latest, Some(0));

        let names: Vec<String> = ["x1", "x2", "x3"].iter().map(|s| s.to_string()).collect();
        let a = c.submit(5, Op::Join(BTreeMap::from([(7, names)])));
        let a = settle(&mut c, &mut store, a);
        let sends = group_sends(&a);
        assert_eq!(sends.len(), 1);
        let (server, req) = &sends[0];
        assert_eq!(
            (server.as_str(), &req.op, req.gid),
            ("x1", &ControlOp::Adopted, 7)
        );
        let tag = req.tag;
        let first_timeout = timers(&a)[timers(&a).len() - 1];

        // A hint: straight to server 3.
        let a = c.on_group_reply(
            7,
            "x1",
            ControlReply::NotLeader {
                tag,
                leader: Some(3),
            },
        );
        assert_eq!(group_sends(&a)[0].0, "x3");
        // No hint: a pause, then the next server (round the list).
        let a = c.on_group_reply(7, "x3", ControlReply::NotLeader { tag, leader: None });
        assert!(group_sends(&a).is_empty(), "no hot loop");
        let pause = timers(&a)[0];
        let a = c.on_timer(pause);
        assert_eq!(group_sends(&a)[0].0, "x1");
        // The first send's timer is stale now.
        assert!(c.on_timer(first_timeout).is_empty());
        // A timeout: the next server.
        let timeout = timers(&a)[0];
        let a = c.on_timer(timeout);
        assert_eq!(group_sends(&a)[0].0, "x2");
        // Stale hints pointing at each other: followed at once only as many times as there
        // are servers, then after a pause.
        let mut hinted = Vec::new();
        for (from, to) in [("x2", 1), ("x1", 2), ("x2", 1)] {
            let a = c.on_group_reply(
                7,
                from,
                ControlReply::NotLeader {
                    tag,
                    leader: Some(to),
                },
            );
            hinted.push(group_sends(&a).len());
        }
        let a = c.on_group_reply(
            7,
            "x1",
            ControlReply::NotLeader {
                tag,
                leader: Some(2),
            },
        );
        assert_eq!((hinted, group_sends(&a).len()), (vec![1, 1, 1], 0));
        let a = c.on_timer(timers(&a)[0]);
        assert_eq!(group_sends(&a)[0].0, "x2");
        // A reply from the wrong group's point of view is ignored.
        assert!(c
            .on_group_reply(8, "x2", ControlReply::Adopted { tag, adopted: 0 })
            .is_empty());

        let a = c.on_group_reply(7, "x2", ControlReply::Adopted { tag, adopted: 0 });
        let sends = group_sends(&a);
        assert_eq!(
            sends[0].0, "x2",
            "the server that answered is the leader now"
        );
        let ControlOp::Adopt { config } = &sends[0].1.op else {
            panic!("{sends:?}");
        };
        let config = Config::decode(config).unwrap();
        assert_eq!((config.num, config.shards.clone()), (1, vec![7; 4]));
        assert_eq!(c.status().phase, CtlPhase::Changing);

        let a = c.on_group_reply(
            7,
            "x2",
            ControlReply::Done {
                tag: sends[0].1.tag,
                status: ControlStatus::Applied,
                adopted: 1,
            },
        );
        let a = settle(&mut c, &mut store, a);
        assert!(a.contains(&CtlAction::Finished {
            ticket: 5,
            result: Ok(1)
        }));
        let (bytes, _) = store.store().get(LATEST_KEY).unwrap();
        let record = Record::decode(bytes).unwrap();
        assert_eq!((record.config, record.complete), (config, true));
    }

    #[test]
    fn settings_are_checked() {
        let ok = ControllerConfig::new(b"a".to_vec(), 1, vec![1], 4);
        assert!(Controller::new(ok.clone()).is_ok());
        let bad = [
            ControllerConfig {
                name: Vec::new(),
                ..ok.clone()
            },
            ControllerConfig {
                store: Vec::new(),
                ..ok.clone()
            },
            ControllerConfig {
                shards: 0,
                ..ok.clone()
            },
            ControllerConfig {
                lease_ttl_ms: 2,
                ..ok.clone()
            },
            ControllerConfig {
                max_parallel_moves: 0,
                ..ok.clone()
            },
            ControllerConfig {
                retry_timeout: Duration::ZERO,
                ..ok
            },
        ];
        for cfg in bad {
            assert!(Controller::new(cfg).is_err());
        }
    }
}
