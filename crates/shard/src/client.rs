//! The routing client of the sharded KV (sans-IO), the sharded counterpart of
//! `shoal_kv::Clerk`: one operation at a time, routed key → shard ([`shard_of`]) → owner group
//! (from a cached [`Config`]) → the server of that group believed to lead.
//!
//! **Configuration.** The client reads [`LATEST_KEY`] from the controller's store (a Shoal KV
//! cluster) with a linearizable get through an inner `shoal_kv::Clerk`, and decodes its
//! [`Record`]. It fetches again when it has no configuration, when a group answers
//! `WrongGroup` with a number at or past the cached one, when every server of a group timed out
//! in one round, and when the shard has no owner (configuration 0, before any group joined).
//! A fetch that brings nothing newer is followed by a backoff pause, then the waiting requests
//! are sent again by the cached configuration: the shard may be mid-migration (its new owner
//! waits for the Install), so waiting and retrying is all there is to do.
//!
//! **Sessions are per shard** (they migrate with the shard's data): before the first write to
//! a shard the client registers ([`KvOp::Register`]) with that shard's owner and keeps the
//! session for that shard. A write carries the session id as `client` and a request id that is
//! fixed when the write is first sent and reused by **every** resend, including a resend to
//! another group after the shard migrated: the new owner has the old owner's session table and
//! answers the retry from it, so a write applies at most once across migrations. Reads carry
//! the client's own id. The "maybe" rule is the clerk's: a write answered `SessionExpired`
//! finishes [`Outcome::Maybe`] (and the shard's session is forgotten), and a conditional write
//! resent at least once and answered `VersionMismatch` (or `NoKey` for a delete) finishes
//! [`Outcome::Maybe`].
//!
//! **Scans** ([`KvOp::Scan`]) are sent to every shard (each through its owner, with the scan's
//! `limit` per shard, all shards in parallel), merged in key order and cut to `limit`, and cut
//! at the smallest last key of a part that answered a full page (each part asks for at most
//! the servers' `max_scan_items`, [`ShardClerkConfig::max_scan_items`]; a part answering that
//! many may hold more past its last key): a caller wanting more pages on from just after the
//! last key it got, as with one group. A scan
//! is linearizable **per shard** only: each shard's part is read at its own moment, so a scan
//! is not one atomic snapshot across shards (a write to two shards between the parts' reads
//! may show in one part and not the other).
//!
//! **Refused here:** `Status` (ask a server directly), `Register` (the client opens sessions
//! itself, per shard) and every lease operation (leases are refused in sharded clusters; see
//! `crate::group::LEASES_REFUSED`).
//!
//! **Timer tokens.** The inner clerk's tokens are passed through unchanged; this client's own
//! tokens have bit 62 set ([`OWN_TIMER_BIT`]), which the inner clerk never sets (its tokens are
//! a counter, plus bit 63 for its backoffs, and its counter would need 2^62 timers to reach
//! bit 62), so [`ShardClerk::on_timer`] tells them apart.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_kv::clerk::{DEFAULT_MAX_BACKOFF, DEFAULT_MIN_BACKOFF, DEFAULT_RETRY_TIMEOUT};
use shoal_kv::{Action as StoreAction, Clerk, ClerkConfig, Outcome};
use shoal_wire::kv::{Expected, KvOp, KvReply, KvRequest, KvResult, ScanItem};
use shoal_wire::shard::{ShardReply, ShardRequest};

use crate::layout::{config_key, Record, LATEST_KEY};
use crate::{shard_of, Config, Gid, ShardId, NO_GROUP};

/// Bit set in every timer token of the routing client itself (not of its inner store clerk).
pub const OWN_TIMER_BIT: u64 = 1 << 62;

/// Settings of a [`ShardClerk`].
#[derive(Debug, Clone)]
pub struct ShardClerkConfig {
    /// This client's id: reads and registrations carry it (writes carry the shard's session).
    pub client: u64,
    /// The servers of the controller's store (the KV cluster holding [`LATEST_KEY`]).
    pub store: Vec<u64>,
    /// Wait this long for an answer before resending to the next server.
    pub retry_timeout: Duration,
    /// First pause after a round without success (and after a fetch that brought nothing new).
    pub min_backoff: Duration,
    /// Longest pause (the pause doubles up to it).
    pub max_backoff: Duration,
    /// Reads: ask the groups for serializable (possibly stale, local) reads. The configuration
    /// itself is always read linearizably.
    pub serializable_reads: bool,
    /// The request id of the first request (then counting up; never 0). Clients sharing
    /// connections route answers by the (client, request) ids they echo, and session ids
    /// repeat across shards, so a driver running many clients starts each at a random point;
    /// the simulator keeps the default, 1.
    pub first_request: u64,
    /// The most pairs a group server answers per scan request (its `max_scan_items`; the
    /// same on every server of a cluster, as every store limit): each shard's part of a scan
    /// asks for at most this many, and a part answering that many may have more.
    pub max_scan_items: u32,
}

impl ShardClerkConfig {
    /// Defaults (the KV clerk's timings) for `client` reading configurations from `store`.
    pub fn new(client: u64, store: Vec<u64>) -> ShardClerkConfig {
        ShardClerkConfig {
            client,
            store,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            serializable_reads: false,
            first_request: 1,
            max_scan_items: shoal_kv::store::DEFAULT_MAX_SCAN_ITEMS,
        }
    }
}

/// Why the routing client refused to start or to run an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// An operation is in flight.
    #[error(
        "an operation is already in flight: wait for its Finished action before starting another"
    )]
    Busy,
    /// No server of the controller's store was given.
    #[error("no controller store servers given: list the servers of the KV cluster that holds the shard configurations")]
    NoStoreServers,
    /// The operation is not available through the routing client.
    #[error("{0}")]
    Unsupported(String),
}

/// What the driver must do for the routing client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Send `request` to server `server` of the controller's store; its reply goes to
    /// [`ShardClerk::on_store_reply`].
    Store {
        /// The store server's id.
        server: u64,
        /// The request.
        request: KvRequest,
    },
    /// Send `request` to server `server` of group `gid`; its reply goes to
    /// [`ShardClerk::on_group_reply`].
    Group {
        /// The group.
        gid: Gid,
        /// The server, as named in the configuration's `groups[gid]`.
        server: String,
        /// The request.
        request: ShardRequest,
    },
    /// Call [`ShardClerk::on_timer`] with `token` after `after`.
    SetTimer {
        /// The delay.
        after: Duration,
        /// Identifies the timer; stale tokens are ignored.
        token: u64,
    },
    /// The operation finished.
    Finished(Outcome),
}

/// Where one shard's part of the operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartState {
    /// Waits for a configuration (none cached, no owner, or the group said WrongGroup).
    WaitConfig,
    /// Sent; waits for the reply or the retry timer `token`.
    Sent { token: u64 },
    /// Pauses until timer `token`, then is routed again.
    Backoff { token: u64 },
    /// Answered.
    Done,
}

/// One shard's request: the whole operation for a get, put or delete, one shard's part of a
/// scan.
#[derive(Debug)]
struct Part {
    shard: ShardId,
    op: KvOp,
    /// While the shard has no session: the id of the registration being sent first.
    registering: Option<u64>,
    /// The id the operation is sent with (the session for a write, the client for a read).
    client: u64,
    /// The operation's request id, fixed at its first send, reused by every resend (to any
    /// group). Unused while `registering`.
    request: u64,
    state: PartState,
    /// The group it was last sent to.
    gid: Gid,
    /// Sends of the operation itself (not of the registration): the maybe rule counts them.
    sends: u32,
    /// Servers of the group tried since the last answer or pause.
    tried_in_round: usize,
    backoff: Duration,
}

impl Part {
    /// The (client, request) a reply to the request in flight echoes.
    fn ids(&self, own_client: u64) -> (u64, u64) {
        match self.registering {
            Some(r) => (own_client, r),
            None => (self.client, self.request),
        }
    }
}

/// The operation in flight.
struct Pending {
    op: KvOp,
    /// One per shard it touches; `None` until a configuration is known (the shard count).
    parts: Option<Vec<Part>>,
    /// A scan's answered parts.
    scanned: Vec<ScanItem>,
    /// A scan: the smallest last key of a part that answered a full page; the merge keeps
    /// nothing past it.
    cut: Option<Vec<u8>>,
}

/// The state of the configuration fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresh {
    Idle,
    /// The inner clerk is getting [`LATEST_KEY`].
    Fetching,
    /// The inner clerk is getting configuration N-1 from the history: the cached (incomplete)
    /// configuration N moves shards from groups whose servers it does not list (they leave),
    /// and no configuration cached before names them.
    FetchingPrevious,
    /// The last fetch brought nothing newer: pause until timer `token`.
    Backoff {
        token: u64,
    },
}

/// What routing one part came to.
enum Routed {
    Sent(Vec<ClientAction>),
    /// No configuration, no owner or an unknown group: fetch one.
    NeedConfig,
}

/// A sans-IO routing client of the sharded KV.
pub struct ShardClerk {
    cfg: ShardClerkConfig,
    /// The inner clerk reading configurations from the controller's store.
    store: Clerk,
    config: Option<Config>,
    /// Shards that the cached configuration's record (incomplete) moves, to their previous
    /// owner: served there until it adopts the configuration (the shard is copied while it
    /// serves), so they are sent there first, and to the new owner once the previous owner
    /// answers `WrongGroup` at or past the cached configuration.
    moving: BTreeMap<ShardId, Gid>,
    /// The groups of the configuration cached before (the servers of a leaving group).
    old_groups: BTreeMap<Gid, Vec<String>>,
    refresh: Refresh,
    refresh_backoff: Duration,
    /// The index (in `config.groups[gid]`) of the server believed to lead each group.
    leaders: BTreeMap<Gid, usize>,
    /// The open session of each shard, as far as this client knows.
    sessions: BTreeMap<ShardId, u64>,
    next_request: u64,
    next_token: u64,
    pending: Option<Pending>,
}

impl ShardClerk {
    /// A routing client; fails without store servers.
    pub fn new(cfg: ShardClerkConfig) -> Result<ShardClerk, ClientError> {
        if cfg.store.is_empty() {
            return Err(ClientError::NoStoreServers);
        }
        let store = Clerk::new(ClerkConfig {
            client: cfg.client,
            servers: cfg.store.clone(),
            retry_timeout: cfg.retry_timeout,
            min_backoff: cfg.min_backoff,
            max_backoff: cfg.max_backoff,
            // The configuration must be the latest, never a stale follower's.
            serializable_reads: false,
        })
        .map_err(|_| ClientError::NoStoreServers)?;
        let first_request = cfg.first_request.max(1);
        Ok(ShardClerk {
            refresh_backoff: cfg.min_backoff,
            cfg,
            store,
            config: None,
            moving: BTreeMap::new(),
            old_groups: BTreeMap::new(),
            refresh: Refresh::Idle,
            leaders: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_request: first_request,
            next_token: 1,
            pending: None,
        })
    }

    /// The cached configuration, if one was fetched.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// Whether an operation is in flight.
    pub fn is_busy(&self) -> bool {
        self.pending.is_some()
    }

    /// The session this client holds for `shard`, if any.
    pub fn session(&self, shard: ShardId) -> Option<u64> {
        self.sessions.get(&shard).copied()
    }

    /// Starts an operation: a get, put, delete or scan. One at a time: fails with
    /// [`ClientError::Busy`] while one is in flight, and refuses the operations listed in the
    /// module's documentation.
    pub fn start(&mut self, op: KvOp) -> Result<Vec<ClientAction>, ClientError> {
        if self.pending.is_some() {
            return Err(ClientError::Busy);
        }
        let refused = match &op {
            KvOp::Get { .. } | KvOp::Put { .. } | KvOp::Delete { .. } | KvOp::Scan { .. } => None,
            KvOp::Register => Some(
                "the routing client opens its sessions itself, one per shard: send the write"
                    .to_string(),
            ),
            KvOp::Status => Some(
                "status is per server: send KvOp::Status to a group's server directly".to_string(),
            ),
            _ => Some(crate::group::LEASES_REFUSED.to_string()),
        };
        if let Some(reason) = refused {
            return Err(ClientError::Unsupported(reason));
        }
        self.pending = Some(Pending {
            op,
            parts: None,
            scanned: Vec::new(),
            cut: None,
        });
        Ok(self.route_waiting())
    }

    /// A reply from the controller's store.
    pub fn on_store_reply(&mut self, reply: KvReply) -> Vec<ClientAction> {
        let actions = self.store.on_reply(reply);
        self.store_actions(actions)
    }

    /// A reply from a group's server.
    pub fn on_group_reply(&mut self, reply: ShardReply) -> Vec<ClientAction> {
        let own = self.cfg.client;
        let Some(i) = self.pending.as_ref().and_then(|p| {
            p.parts
                .as_ref()?
                .iter()
                .position(|part| part.state != PartState::Done && part.ids(own) == reply.ids())
        }) else {
            return Vec::new(); // an answer to an older request, or someone else's
        };
        match reply {
            ShardReply::Done { result, .. } => self.on_done(i, result),
            ShardReply::WrongLeader { leader, .. } => self.on_wrong_leader(i, leader),
            ShardReply::WrongGroup { config, .. } => self.on_wrong_group(i, config),
        }
    }

    /// A timer set by a [`ClientAction::SetTimer`] fired.
    pub fn on_timer(&mut self, token: u64) -> Vec<ClientAction> {
        if token & OWN_TIMER_BIT == 0 {
            let actions = self.store.on_timer(token);
            return self.store_actions(actions);
        }
        if self.refresh == (Refresh::Backoff { token }) {
            self.refresh = Refresh::Idle;
            return self.route_waiting();
        }
        let Some(i) = self.find_part(|s| {
            matches!(s, PartState::Sent { token: t } | PartState::Backoff { token: t } if t == token)
        }) else {
            return Vec::new(); // stale
        };
        let Some(part) = self.part_mut(i) else {
            return Vec::new();
        };
        if matches!(part.state, PartState::Backoff { .. }) {
            return self.route(i);
        }
        // The retry timer: try the next server of the group; after a round of silence the
        // group may have left (or lost the shard): fetch the configuration again.
        let gid = part.gid;
        let n = self.group_size(gid);
        let next = self.leaders.get(&gid).copied().unwrap_or(0).wrapping_add(1) % n.max(1);
        self.leaders.insert(gid, next);
        let Some(part) = self.part_mut(i) else {
            return Vec::new();
        };
        if part.tried_in_round >= n {
            part.tried_in_round = 0;
            part.state = PartState::WaitConfig;
            return self.request_refresh();
        }
        self.route(i)
    }

    /// The connection to server `server` of the controller's store failed: the fetch waiting
    /// on it is resent to the next store server at once (see `shoal_kv::Clerk::on_unreachable`).
    pub fn on_store_unreachable(&mut self, server: u64) -> Vec<ClientAction> {
        let actions = self.store.on_unreachable(server);
        self.store_actions(actions)
    }

    /// The connection to server `server` of group `gid` failed (refused, reset, closed): every
    /// part waiting on that server moves on now as if its retry timer fired, instead of after
    /// the retry timeout. A request sent before the failure may still have applied: this is a
    /// resend like any other, with the same request id, and the maybe rule counts it.
    pub fn on_group_unreachable(&mut self, gid: Gid, server: &str) -> Vec<ClientAction> {
        let current = self.config.as_ref().and_then(|c| {
            let servers = c.groups.get(&gid)?;
            let i = self.leaders.get(&gid).copied().unwrap_or(0) % servers.len().max(1);
            servers.get(i)
        });
        if current.map(String::as_str) != Some(server) {
            return Vec::new(); // not the server anything waits on
        }
        let tokens: Vec<u64> = self
            .pending
            .as_ref()
            .and_then(|p| p.parts.as_ref())
            .map(|parts| {
                parts
                    .iter()
                    .filter(|p| p.gid == gid)
                    .filter_map(|p| match p.state {
                        PartState::Sent { token } => Some(token),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for (n, token) in tokens.into_iter().enumerate() {
            if n > 0 {
                // The first part's timeout already moved the group's guess to the next
                // server; the others follow it there without rotating again.
                if let Some(i) = self.find_part(|s| s == PartState::Sent { token }) {
                    out.extend(self.route(i));
                }
                continue;
            }
            out.extend(self.on_timer(token));
        }
        out
    }

    fn group_size(&self, gid: Gid) -> usize {
        self.config
            .as_ref()
            .and_then(|c| c.groups.get(&gid))
            .or_else(|| self.old_groups.get(&gid))
            .map_or(0, Vec::len)
    }

    fn part_mut(&mut self, i: usize) -> Option<&mut Part> {
        self.pending.as_mut()?.parts.as_mut()?.get_mut(i)
    }

    fn find_part(&self, pred: impl Fn(PartState) -> bool) -> Option<usize> {
        let parts = self.pending.as_ref()?.parts.as_ref()?;
        parts.iter().position(|p| pred(p.state))
    }

    fn new_token(&mut self) -> u64 {
        let t = OWN_TIMER_BIT | self.next_token;
        self.next_token += 1;
        t
    }

    fn new_request(&mut self) -> u64 {
        let r = self.next_request;
        self.next_request += 1;
        r
    }

    /// Turns the inner clerk's actions into this client's; a finished fetch is consumed here.
    fn store_actions(&mut self, actions: Vec<StoreAction>) -> Vec<ClientAction> {
        let mut out = Vec::new();
        for a in actions {
            match a {
                StoreAction::Send { server, request } => {
                    out.push(ClientAction::Store { server, request })
                }
                StoreAction::SetTimer { after, token } => {
                    out.push(ClientAction::SetTimer { after, token })
                }
                StoreAction::Finished(outcome) => out.extend(self.on_fetched(outcome)),
            }
        }
        out
    }

    /// Starts a fetch of the latest configuration unless one is running or pausing (its end
    /// routes every waiting part).
    fn request_refresh(&mut self) -> Vec<ClientAction> {
        if self.refresh != Refresh::Idle {
            return Vec::new();
        }
        match self.store.start(KvOp::Get {
            key: LATEST_KEY.to_vec(),
        }) {
            Ok(actions) => {
                self.refresh = Refresh::Fetching;
                self.store_actions(actions)
            }
            // Only when a fetch is in flight already, which `Fetching` tracks.
            Err(_) => Vec::new(),
        }
    }

    /// The fetch finished: cache a newer configuration and route the waiting parts, or pause
    /// before trying again.
    fn on_fetched(&mut self, outcome: Outcome) -> Vec<ClientAction> {
        if self.refresh == Refresh::FetchingPrevious {
            return self.on_fetched_previous(outcome);
        }
        self.refresh = Refresh::Idle;
        let fetched = match outcome {
            Outcome::Done(KvResult::Found { value, .. }) => match Record::decode(&value) {
                Ok(record) => Some(record),
                Err(e) => {
                    tracing::warn!(error = %e, "the controller's latest configuration record does not decode; retrying (is this client older than the controller?)");
                    None
                }
            },
            Outcome::Done(KvResult::NoKey) => None, // no configuration written yet
            other => {
                tracing::warn!(?other, "unexpected answer to the configuration fetch");
                None
            }
        };
        if let (Some(r), Some(c)) = (&fetched, &self.config) {
            if r.complete && r.config.num == c.num {
                // Every move of the cached configuration is installed.
                self.moving.clear();
            }
        }
        let newer = fetched.filter(|r| match &self.config {
            None => true,
            Some(old) => {
                let c = &r.config;
                if c.num_shards() != old.num_shards() {
                    tracing::warn!(
                        old = old.num_shards(),
                        new = c.num_shards(),
                        "a configuration with another shard count is ignored"
                    );
                    return false;
                }
                c.num > old.num
            }
        });
        if let Some(r) = newer {
            self.moving = if r.complete {
                BTreeMap::new()
            } else {
                r.moves
                    .iter()
                    .filter(|m| m.from != NO_GROUP)
                    .map(|m| (m.shard, m.from))
                    .collect()
            };
            self.old_groups = self.config.take().map(|c| c.groups).unwrap_or_default();
            self.config = Some(r.config);
            self.refresh_backoff = self.cfg.min_backoff;
            // A shard moving away from a group that leaves with this configuration is served
            // by that group until it adopts the move: if no configuration names its servers
            // here, read the previous one first (else the request would wait at the new
            // owner for the whole copy).
            let unknown = self.moving.values().any(|gid| {
                !self.old_groups.contains_key(gid)
                    && !self
                        .config
                        .as_ref()
                        .is_some_and(|c| c.groups.contains_key(gid))
            });
            let num = self.config.as_ref().map_or(0, |c| c.num);
            if unknown && num > 0 {
                if let Ok(actions) = self.store.start(KvOp::Get {
                    key: config_key(num - 1),
                }) {
                    self.refresh = Refresh::FetchingPrevious;
                    return self.store_actions(actions);
                }
            }
            return self.route_waiting();
        }
        let waiting = self.pending.as_ref().is_some_and(|p| {
            p.parts
                .as_ref()
                .is_none_or(|parts| parts.iter().any(|x| x.state == PartState::WaitConfig))
        });
        if !waiting {
            return Vec::new();
        }
        // Nothing newer: the shard may be mid-migration (its new owner waits for the Install)
        // or no group has joined. Pause, then send again by the cached configuration.
        let token = self.new_token();
        let after = self.refresh_backoff;
        self.refresh_backoff = self
            .refresh_backoff
            .saturating_mul(2)
            .min(self.cfg.max_backoff);
        self.refresh = Refresh::Backoff { token };
        vec![ClientAction::SetTimer { after, token }]
    }

    /// Configuration N-1 arrived (or could not be read): its groups name the servers of the
    /// groups leaving with N, where the shards moving away from them are sent meanwhile.
    fn on_fetched_previous(&mut self, outcome: Outcome) -> Vec<ClientAction> {
        self.refresh = Refresh::Idle;
        let num = self.config.as_ref().map_or(0, |c| c.num);
        match outcome {
            Outcome::Done(KvResult::Found { value, .. }) => match Config::decode(&value) {
                Ok(prev) if prev.num + 1 == num => {
                    for (gid, servers) in prev.groups {
                        self.old_groups.entry(gid).or_insert(servers);
                    }
                }
                Ok(prev) => tracing::warn!(
                    got = prev.num,
                    wanted = num.saturating_sub(1),
                    "the history holds another configuration under this number; ignored"
                ),
                Err(e) => tracing::warn!(error = %e, "the previous configuration does not decode"),
            },
            // Not in the history (a store older than it): the new owner is waited for.
            other => tracing::debug!(?other, "the previous configuration could not be read"),
        }
        self.route_waiting()
    }

    /// Builds the parts once a configuration is known, then sends every part that waits for
    /// one; fetches a configuration if some part still cannot be routed.
    fn route_waiting(&mut self) -> Vec<ClientAction> {
        let Some(p) = self.pending.as_ref() else {
            return Vec::new();
        };
        if p.parts.is_none() {
            let Some(n) = self.config.as_ref().map(Config::num_shards) else {
                return self.request_refresh();
            };
            let op = p.op.clone();
            let parts = self.build_parts(op, n);
            if let Some(p) = self.pending.as_mut() {
                p.parts = Some(parts);
            }
        }
        let count = self
            .pending
            .as_ref()
            .and_then(|p| p.parts.as_ref())
            .map_or(0, Vec::len);
        let mut out = Vec::new();
        for i in 0..count {
            if self
                .part_mut(i)
                .is_some_and(|x| x.state == PartState::WaitConfig)
            {
                out.extend(self.route(i));
            }
        }
        out
    }

    fn build_parts(&mut self, op: KvOp, shards: u32) -> Vec<Part> {
        let own = self.cfg.client;
        let min_backoff = self.cfg.min_backoff;
        let part = |this: &mut ShardClerk, shard: ShardId, op: KvOp| {
            let is_write = !op.is_read();
            let session = this.sessions.get(&shard).copied();
            let (registering, client) = match (is_write, session) {
                (true, None) => (Some(this.new_request()), own),
                (true, Some(s)) => (None, s),
                (false, _) => (None, own),
            };
            let request = if registering.is_some() {
                0
            } else {
                this.new_request()
            };
            Part {
                shard,
                op,
                registering,
                client,
                request,
                state: PartState::WaitConfig,
                gid: 0,
                sends: 0,
                tried_in_round: 0,
                backoff: min_backoff,
            }
        };
        match &op {
            KvOp::Scan { start, end, limit } => {
                // Each part asks no more than the servers answer at most, so that a part
                // answering fewer than it asked is known complete.
                let part_op = KvOp::Scan {
                    start: start.clone(),
                    end: end.clone(),
                    limit: (*limit).min(self.cfg.max_scan_items.max(1)),
                };
                (0..shards)
                    .map(|s| part(self, s, part_op.clone()))
                    .collect()
            }
            KvOp::Get { key } | KvOp::Put { key, .. } | KvOp::Delete { key, .. } => {
                let shard = shard_of(key, shards);
                vec![part(self, shard, op)]
            }
            // `start` admits nothing else.
            _ => Vec::new(),
        }
    }

    /// Sends part `i` to its shard's owner in the cached configuration, or makes it wait for
    /// a configuration.
    fn route(&mut self, i: usize) -> Vec<ClientAction> {
        match self.send(i) {
            Routed::Sent(actions) => actions,
            Routed::NeedConfig => {
                if let Some(part) = self.part_mut(i) {
                    part.state = PartState::WaitConfig;
                }
                self.request_refresh()
            }
        }
    }

    fn send(&mut self, i: usize) -> Routed {
        let token = self.new_token();
        let (own, serializable_reads, retry) = (
            self.cfg.client,
            self.cfg.serializable_reads,
            self.cfg.retry_timeout,
        );
        let Some(config) = self.config.as_ref() else {
            return Routed::NeedConfig;
        };
        let Some(part) = self
            .pending
            .as_mut()
            .and_then(|p| p.parts.as_mut())
            .and_then(|parts| parts.get_mut(i))
        else {
            return Routed::Sent(Vec::new());
        };
        let old_groups = &self.old_groups;
        let servers_of = |gid: Gid| {
            config
                .groups
                .get(&gid)
                .or_else(|| old_groups.get(&gid))
                .filter(|s| !s.is_empty())
        };
        // A shard moving in the cached (incomplete) configuration goes to its previous owner
        // while it serves there, if its servers are known.
        let moving = self
            .moving
            .get(&part.shard)
            .copied()
            .filter(|&g| servers_of(g).is_some());
        let Some(gid) = moving.or_else(|| config.owner(part.shard)) else {
            return Routed::NeedConfig;
        };
        let Some(servers) = servers_of(gid) else {
            return Routed::NeedConfig;
        };
        let index = self.leaders.get(&gid).copied().unwrap_or(0) % servers.len();
        if part.gid != gid {
            part.tried_in_round = 0;
        }
        part.gid = gid;
        part.tried_in_round += 1;
        part.state = PartState::Sent { token };
        let request = match part.registering {
            Some(r) => ShardRequest {
                client: own,
                request: r,
                shard: part.shard,
                config: config.num,
                op: KvOp::Register,
                serializable: false,
            },
            None => {
                part.sends += 1;
                ShardRequest {
                    client: part.client,
                    request: part.request,
                    shard: part.shard,
                    config: config.num,
                    op: part.op.clone(),
                    serializable: part.op.is_read() && serializable_reads,
                }
            }
        };
        Routed::Sent(vec![
            ClientAction::Group {
                gid,
                server: servers[index].clone(),
                request,
            },
            ClientAction::SetTimer {
                after: retry,
                token,
            },
        ])
    }

    /// Pauses part `i` (after a round of wrong-leader answers, or a group behind the client's
    /// configuration), then routes it again.
    fn pause(&mut self, i: usize) -> Vec<ClientAction> {
        let token = self.new_token();
        let max = self.cfg.max_backoff;
        let Some(part) = self.part_mut(i) else {
            return Vec::new();
        };
        part.tried_in_round = 0;
        let after = part.backoff;
        part.backoff = part.backoff.saturating_mul(2).min(max);
        part.state = PartState::Backoff { token };
        vec![ClientAction::SetTimer { after, token }]
    }

    fn on_wrong_leader(&mut self, i: usize, hint: Option<u64>) -> Vec<ClientAction> {
        let Some(part) = self.part_mut(i) else {
            return Vec::new();
        };
        if !matches!(part.state, PartState::Sent { .. }) {
            return Vec::new(); // an earlier send's answer; the part moved on
        }
        let (gid, tried) = (part.gid, part.tried_in_round);
        let n = self.group_size(gid);
        let current = self.leaders.get(&gid).copied().unwrap_or(0);
        // The hint is a Raft id: servers are listed in Raft id order, id 1 first.
        if let Some(h) = hint.and_then(|l| usize::try_from(l).ok()) {
            if (1..=n).contains(&h) && h - 1 != current {
                self.leaders.insert(gid, h - 1);
                return self.route(i);
            }
        }
        self.leaders.insert(gid, (current + 1) % n.max(1));
        if tried >= n {
            return self.pause(i);
        }
        self.route(i)
    }

    fn on_wrong_group(&mut self, i: usize, group_config: u64) -> Vec<ClientAction> {
        let cached = self.config.as_ref().map_or(0, |c| c.num);
        let Some(part) = self.part_mut(i) else {
            return Vec::new();
        };
        if !matches!(part.state, PartState::Sent { .. }) {
            return Vec::new();
        }
        let (shard, gid) = (part.shard, part.gid);
        if self.moving.get(&shard) == Some(&gid) {
            if group_config >= cached {
                // The previous owner adopted the move: the shard is the new owner's now (it
                // answers WrongGroup, and the client waits, until its Install).
                self.moving.remove(&shard);
                return self.route(i);
            }
            // The previous owner does not serve it at an older configuration (it is behind):
            // give it time.
            return self.pause(i);
        }
        let Some(part) = self.part_mut(i) else {
            return Vec::new();
        };
        if group_config < cached {
            // The group has not adopted the configuration we routed by yet: give it time.
            return self.pause(i);
        }
        part.tried_in_round = 0;
        part.state = PartState::WaitConfig;
        self.request_refresh()
    }

    fn on_done(&mut self, i: usize, result: KvResult) -> Vec<ClientAction> {
        if result == KvResult::Stale {
            return Vec::new(); // nobody waits for that answer
        }
        let min_backoff = self.cfg.min_backoff;
        let next = self.next_request;
        let Some(part) = self.part_mut(i) else {
            return Vec::new();
        };
        if part.registering.is_some() {
            let KvResult::Registered { session } = result else {
                return self.finish(Outcome::Done(result));
            };
            // The shard's session is open: send the write in it, to the same server.
            part.registering = None;
            part.client = session;
            part.request = next;
            part.sends = 0;
            part.tried_in_round = 0;
            part.backoff = min_backoff;
            let shard = part.shard;
            self.next_request += 1;
            self.sessions.insert(shard, session);
            return self.route(i);
        }
        part.state = PartState::Done;
        let (shard, client) = (part.shard, part.client);
        if result == KvResult::SessionExpired {
            if self.sessions.get(&shard) == Some(&client) {
                self.sessions.remove(&shard);
            }
            return self.finish(Outcome::Maybe);
        }
        let is_scan = self
            .pending
            .as_ref()
            .is_some_and(|p| matches!(p.op, KvOp::Scan { .. }));
        if !is_scan {
            let Some(part) = self.part_mut(i) else {
                return Vec::new();
            };
            let outcome = classify(part, result);
            return self.finish(outcome);
        }
        let KvResult::Scanned { items } = result else {
            // A shard refused (too large, a rule): the scan cannot be complete.
            return self.finish(Outcome::Done(result));
        };
        let Some(p) = self.pending.as_mut() else {
            return Vec::new();
        };
        let asked = match p.op {
            KvOp::Scan { limit, .. } => limit.min(self.cfg.max_scan_items.max(1)) as usize,
            _ => usize::MAX,
        };
        // A part that answered as many pairs as it asked for may hold more past its last
        // key: nothing past that key is known complete, from any shard, so the merge stops
        // there. The caller reads on from after the last key it got.
        if let Some(last) = items.last().filter(|_| items.len() >= asked) {
            if p.cut.as_ref().is_none_or(|c| last.key < *c) {
                p.cut = Some(last.key.clone());
            }
        }
        p.scanned.extend(items);
        let all_done = p
            .parts
            .as_ref()
            .is_some_and(|parts| parts.iter().all(|x| x.state == PartState::Done));
        if !all_done {
            return Vec::new();
        }
        let limit = match p.op {
            KvOp::Scan { limit, .. } => limit as usize,
            _ => usize::MAX,
        };
        let mut items = std::mem::take(&mut p.scanned);
        // Keys are unique across shards (a key lives in one shard): a plain sort merges.
        items.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(cut) = p.cut.take() {
            items.retain(|i| i.key <= cut);
        }
        items.truncate(limit);
        self.finish(Outcome::Done(KvResult::Scanned { items }))
    }

    fn finish(&mut self, outcome: Outcome) -> Vec<ClientAction> {
        // Dropping the parts voids their timers (a stale token finds no part).
        self.pending = None;
        vec![ClientAction::Finished(outcome)]
    }
}

/// The clerk's maybe rule: a conditional write resent at least once, answered "mismatch" (or
/// no-key for a delete), may have applied on an earlier send.
fn classify(part: &Part, result: KvResult) -> Outcome {
    if part.sends <= 1 {
        return Outcome::Done(result);
    }
    match (&part.op, &result) {
        (
            KvOp::Put {
                expected: Expected::Version(_),
                ..
            },
            KvResult::VersionMismatch,
        )
        | (KvOp::Delete { .. }, KvResult::VersionMismatch | KvResult::NoKey) => Outcome::Maybe,
        _ => Outcome::Done(result),
    }
}
