//! The client (clerk) as a sans-IO state machine: one operation at a time, sent to the server
//! believed to lead, retried on timeouts and wrong-leader answers until answered.
//!
//! Writes run in a client session (see `shoal_wire::kv`): before its first write, and after
//! its session expired, the clerk registers ([`KvOp::Register`]) and then sends the write with
//! the session id. A write answered [`KvResult::SessionExpired`] finishes as
//! [`Outcome::Maybe`] (an earlier send may have applied before the session expired), and the
//! next write registers a new session.

use std::time::Duration;

use shoal_wire::kv::{Expected, KvOp, KvReply, KvRequest, KvResult};

use crate::Error;

/// Default time to wait for an answer before resending to the next server.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_millis(100);
/// Default pause after every server has been tried once in a round without an answer.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Default longest pause between rounds (the backoff doubles up to it). Short, so that a client
/// finds a newly elected leader within ~50 ms; a round is one small request per server.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_millis(50);

/// Settings of a clerk.
#[derive(Debug, Clone)]
pub struct ClerkConfig {
    /// This client's id: reads and registrations carry it (writes carry the session id).
    pub client: u64,
    /// The servers' ids.
    pub servers: Vec<u64>,
    /// Wait this long for an answer before resending elsewhere.
    pub retry_timeout: Duration,
    /// First pause after a round of wrong-leader answers.
    pub min_backoff: Duration,
    /// Longest pause between rounds.
    pub max_backoff: Duration,
    /// Reads: ask for serializable (possibly stale, local) reads.
    pub serializable_reads: bool,
}

impl ClerkConfig {
    /// Defaults for `client` talking to `servers`.
    pub fn new(client: u64, servers: Vec<u64>) -> ClerkConfig {
        ClerkConfig {
            client,
            servers,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            serializable_reads: false,
        }
    }
}

/// What an operation finally returned to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server decided it (for a write answered on its first send, or any read).
    Done(KvResult),
    /// The write may or may not have applied: a conditional write was resent and the answer
    /// says it did not apply now (the classic lab's ErrMaybe), or the write's session expired
    /// ([`KvResult::SessionExpired`]) while it was outstanding.
    Maybe,
}

/// What the driver must do for the clerk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `request` to server `server`.
    Send {
        /// The server id.
        server: u64,
        /// The request.
        request: KvRequest,
    },
    /// Call [`Clerk::on_timer`] with `token` after `after`.
    SetTimer {
        /// The delay.
        after: Duration,
        /// Identifies the timer; stale tokens are ignored.
        token: u64,
    },
    /// The operation finished.
    Finished(Outcome),
}

struct Pending {
    /// The request being sent: the operation, or a registration that must come first.
    request: KvRequest,
    /// While `request` is a registration: the write to send once the session is open.
    after_register: Option<KvOp>,
    sends: u32,
    /// Servers tried since the last answer or backoff.
    tried_in_round: usize,
    backoff: Duration,
}

/// A sans-IO client of the KV service.
pub struct Clerk {
    config: ClerkConfig,
    leader: usize,
    next_request: u64,
    timer_token: u64,
    pending: Option<Pending>,
    /// The open session writes carry, once registered.
    session: Option<u64>,
}

impl Clerk {
    /// A clerk; fails if it has no server.
    pub fn new(config: ClerkConfig) -> Result<Clerk, Error> {
        if config.servers.is_empty() {
            return Err(Error::NoServers);
        }
        Ok(Clerk {
            config,
            leader: 0,
            next_request: 1,
            timer_token: 0,
            pending: None,
            session: None,
        })
    }

    /// This client's id.
    pub fn client_id(&self) -> u64 {
        self.config.client
    }

    /// The session writes are sent in, if one is open (as far as this clerk knows).
    pub fn session(&self) -> Option<u64> {
        self.session
    }

    /// Whether an operation is in flight.
    pub fn is_busy(&self) -> bool {
        self.pending.is_some()
    }

    /// The server currently believed to lead.
    pub fn leader_guess(&self) -> u64 {
        self.config.servers[self.leader]
    }

    /// Adds server `id` to those the clerk may send to (a driver that learnt a leader's
    /// address from a wrong-leader answer, the leader being none of its endpoints). Returns
    /// whether it was new. The next round of tries includes it.
    pub fn add_server(&mut self, id: u64) -> bool {
        if self.config.servers.contains(&id) {
            return false;
        }
        self.config.servers.push(id);
        true
    }

    /// Starts an operation. One at a time: fails with [`Error::Busy`] if one is in flight.
    pub fn start(&mut self, op: KvOp) -> Result<Vec<Action>, Error> {
        if self.pending.is_some() {
            return Err(Error::Busy);
        }
        let needs_session =
            !op.is_read() && !op.is_membership() && !matches!(op, KvOp::Register | KvOp::Status);
        let (request, after_register) = match (needs_session, self.session) {
            (true, None) => (self.request(self.config.client, KvOp::Register), Some(op)),
            (true, Some(session)) => (self.request(session, op), None),
            (false, _) => (self.request(self.config.client, op), None),
        };
        self.pending = Some(Pending {
            request,
            after_register,
            sends: 0,
            tried_in_round: 0,
            backoff: self.config.min_backoff,
        });
        Ok(self.send())
    }

    /// A new request (the next request id) of `client` (client id or session id).
    fn request(&mut self, client: u64, op: KvOp) -> KvRequest {
        let request = KvRequest {
            client,
            request: self.next_request,
            serializable: op.is_read() && self.config.serializable_reads,
            op,
        };
        self.next_request += 1;
        request
    }

    fn send(&mut self) -> Vec<Action> {
        let Some(p) = self.pending.as_mut() else {
            return Vec::new();
        };
        p.sends += 1;
        p.tried_in_round += 1;
        self.timer_token += 1;
        vec![
            Action::Send {
                server: self.config.servers[self.leader],
                request: p.request.clone(),
            },
            Action::SetTimer {
                after: self.config.retry_timeout,
                token: self.timer_token,
            },
        ]
    }

    /// Moves to the next server; after a full round, pauses with backoff.
    fn next_server(&mut self) -> Vec<Action> {
        self.leader = (self.leader + 1) % self.config.servers.len();
        let n = self.config.servers.len();
        let Some(p) = self.pending.as_mut() else {
            return Vec::new();
        };
        if p.tried_in_round >= n {
            p.tried_in_round = 0;
            let after = p.backoff;
            p.backoff = (p.backoff * 2).min(self.config.max_backoff);
            self.timer_token += 1;
            // Token with the top bit set: a backoff, whose expiry sends (not "timeout").
            return vec![Action::SetTimer {
                after,
                token: self.timer_token | BACKOFF_BIT,
            }];
        }
        self.send()
    }

    /// A timer set by an [`Action::SetTimer`] fired.
    pub fn on_timer(&mut self, token: u64) -> Vec<Action> {
        if self.pending.is_none() || token & !BACKOFF_BIT != self.timer_token {
            return Vec::new();
        }
        if token & BACKOFF_BIT != 0 {
            self.send()
        } else {
            self.next_server()
        }
    }

    /// The connection to `server` failed (refused, reset, closed). If the operation waits for
    /// that server, it is resent to the next one now instead of after the retry timeout. (A
    /// request sent before the failure may still have applied: this is a resend like any
    /// other, and the maybe rule counts it.)
    pub fn on_unreachable(&mut self, server: u64) -> Vec<Action> {
        let waiting_on_it = self
            .pending
            .as_ref()
            .is_some_and(|p| p.sends > 0 && self.config.servers[self.leader] == server);
        if !waiting_on_it {
            return Vec::new();
        }
        self.timer_token += 1; // the retry timer of the failed send is void
        self.next_server()
    }

    /// A reply arrived from a server.
    pub fn on_reply(&mut self, reply: KvReply) -> Vec<Action> {
        let Some(p) = self.pending.as_ref() else {
            return Vec::new();
        };
        if reply.ids() != (p.request.client, p.request.request) {
            return Vec::new(); // an answer to an older request, or someone else's
        }
        match reply {
            KvReply::WrongLeader { leader, .. } => {
                // Follow a hint to a server we know; otherwise try the next one.
                if let Some(i) =
                    leader.and_then(|l| self.config.servers.iter().position(|&s| s == l))
                {
                    if i != self.leader {
                        self.leader = i;
                        return self.send();
                    }
                }
                self.next_server()
            }
            KvReply::Done { result, .. } => {
                if result == KvResult::Stale {
                    return Vec::new();
                }
                if let KvResult::Registered { session } = result {
                    self.session = Some(session);
                }
                if result == KvResult::SessionExpired {
                    self.session = None;
                }
                let Some(mut p) = self.pending.take() else {
                    return Vec::new();
                };
                if let (Some(op), KvResult::Registered { session }) =
                    (p.after_register.take(), &result)
                {
                    // The session is open: now send the write itself, to the same server.
                    p.request = self.request(*session, op);
                    p.sends = 0;
                    p.tried_in_round = 0;
                    p.backoff = self.config.min_backoff;
                    self.pending = Some(p);
                    return self.send();
                }
                self.timer_token += 1;
                vec![Action::Finished(classify(&p, result))]
            }
            // A piece of a reply in parts: the connection reassembles those.
            KvReply::Part { .. } => Vec::new(),
        }
    }
}

/// High bit of a timer token marking a backoff pause.
const BACKOFF_BIT: u64 = 1 << 63;

/// The lab's rule: a conditional write resent at least once, answered "mismatch" (or no-key
/// for a delete), may have applied on an earlier send: report maybe.
///
/// A write refused because its session expired may have applied on an earlier send (or a
/// network duplicate) before the session expired: maybe, whatever the number of sends.
fn classify(p: &Pending, result: KvResult) -> Outcome {
    if result == KvResult::SessionExpired {
        return Outcome::Maybe;
    }
    if p.sends <= 1 {
        return Outcome::Done(result);
    }
    match (&p.request.op, &result) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> KvOp {
        KvOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expected: Expected::Version(0),
        }
    }

    fn sent(actions: &[Action]) -> Option<(u64, KvRequest)> {
        actions.iter().find_map(|a| match a {
            Action::Send { server, request } => Some((*server, request.clone())),
            _ => None,
        })
    }

    /// Answers the registration `actions` sent with session `session`; returns the actions
    /// that follow (the write sent in the session).
    fn open_session(c: &mut Clerk, actions: &[Action], session: u64) -> Vec<Action> {
        let (_, reg) = sent(actions).unwrap();
        assert_eq!(reg.op, KvOp::Register);
        assert_eq!(reg.client, c.client_id());
        let a = c.on_reply(KvReply::Done {
            client: reg.client,
            request: reg.request,
            result: KvResult::Registered { session },
        });
        assert_eq!(c.session(), Some(session));
        let (_, req) = sent(&a).unwrap();
        assert_eq!(req.client, session);
        a
    }

    fn timer(actions: &[Action]) -> u64 {
        actions
            .iter()
            .find_map(|a| match a {
                Action::SetTimer { token, .. } => Some(*token),
                _ => None,
            })
            .expect("a timer")
    }

    #[test]
    fn follows_hint_and_reports_maybe_on_retry() {
        let mut c = Clerk::new(ClerkConfig::new(9, vec![1, 2, 3])).unwrap();
        let a = c.start(put()).unwrap();
        let a = open_session(&mut c, &a, 11);
        let (server, req) = sent(&a).unwrap();
        assert_eq!(server, 1);
        let a = c.on_reply(KvReply::WrongLeader {
            client: 11,
            request: req.request,
            leader: Some(3),
            leader_addr: None,
        });
        assert_eq!(sent(&a).unwrap().0, 3);
        let a = c.on_timer(timer(&a));
        assert_eq!(sent(&a).unwrap().0, 1);
        let a = c.on_reply(KvReply::Done {
            client: 11,
            request: req.request,
            result: KvResult::VersionMismatch,
        });
        assert_eq!(a, vec![Action::Finished(Outcome::Maybe)]);
        assert!(!c.is_busy());
    }

    /// A hint to a server the clerk did not know is followed once the driver added it.
    #[test]
    fn follows_a_hint_to_an_added_server() {
        let mut c = Clerk::new(ClerkConfig::new(9, vec![1, 2])).unwrap();
        let a = c.start(KvOp::Get { key: b"k".to_vec() }).unwrap();
        let (server, req) = sent(&a).unwrap();
        assert_eq!(server, 1);
        assert!(c.add_server(7));
        assert!(!c.add_server(7), "added once");
        let a = c.on_reply(KvReply::WrongLeader {
            client: 9,
            request: req.request,
            leader: Some(7),
            leader_addr: None,
        });
        assert_eq!(sent(&a).unwrap().0, 7);
        // Unanswered there, the clerk goes on round the servers from 7: the first again.
        let a = c.on_timer(timer(&a));
        assert_eq!(sent(&a).unwrap().0, 1);
    }

    #[test]
    fn first_answer_mismatch_is_mismatch_and_stale_is_ignored() {
        let mut c = Clerk::new(ClerkConfig::new(9, vec![1])).unwrap();
        let a = c.start(put()).unwrap();
        let a = open_session(&mut c, &a, 4);
        let (_, req) = sent(&a).unwrap();
        assert!(c.start(put()).is_err());
        let stale = KvReply::Done {
            client: 4,
            request: req.request - 1,
            result: KvResult::Deleted,
        };
        assert!(c.on_reply(stale).is_empty());
        let a = c.on_reply(KvReply::Done {
            client: 4,
            request: req.request,
            result: KvResult::VersionMismatch,
        });
        assert_eq!(
            a,
            vec![Action::Finished(Outcome::Done(KvResult::VersionMismatch))]
        );
    }

    #[test]
    fn session_expired_is_maybe_then_registers_again() {
        let mut c = Clerk::new(ClerkConfig::new(9, vec![1])).unwrap();
        let unconditional = KvOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expected: Expected::Any,
        };
        let a = c.start(unconditional.clone()).unwrap();
        let a = open_session(&mut c, &a, 3);
        let (_, req) = sent(&a).unwrap();
        // Answered on the first send, and still maybe: a duplicate may have applied.
        let a = c.on_reply(KvReply::Done {
            client: 3,
            request: req.request,
            result: KvResult::SessionExpired,
        });
        assert_eq!(a, vec![Action::Finished(Outcome::Maybe)]);
        assert_eq!(c.session(), None);
        // Reads need no session.
        let a = c.start(KvOp::Get { key: b"k".to_vec() }).unwrap();
        let (_, get) = sent(&a).unwrap();
        assert_eq!(get.client, 9);
        c.on_reply(KvReply::Done {
            client: 9,
            request: get.request,
            result: KvResult::NoKey,
        });
        // The next write registers a new session first, with a fresh request id.
        let a = c.start(unconditional).unwrap();
        let a = open_session(&mut c, &a, 20);
        let (_, again) = sent(&a).unwrap();
        assert!(again.request > get.request);
        let a = c.on_reply(KvReply::Done {
            client: 20,
            request: again.request,
            result: KvResult::Written { version: 2 },
        });
        assert_eq!(
            a,
            vec![Action::Finished(Outcome::Done(KvResult::Written {
                version: 2
            }))]
        );
        // A retry within the session reuses it.
        let a = c.start(put()).unwrap();
        assert_eq!(sent(&a).unwrap().1.client, 20);
    }

    #[test]
    fn a_lost_connection_moves_on_at_once() {
        let mut c = Clerk::new(ClerkConfig::new(1, vec![1, 2, 3])).unwrap();
        let a = c.start(KvOp::Get { key: b"k".to_vec() }).unwrap();
        let (server, req) = sent(&a).unwrap();
        assert_eq!(server, 1);
        // Another server's connection failing changes nothing.
        assert!(c.on_unreachable(3).is_empty());
        // Ours failing resends to the next server without waiting for the retry timer ...
        let a = c.on_unreachable(1);
        let (next, again) = sent(&a).unwrap();
        assert_eq!(next, 2);
        assert_eq!(again.request, req.request);
        // ... and the first send's timer is void.
        let old_timer = 1;
        assert!(c.on_timer(old_timer).is_empty());
        // Idle: nothing to do.
        let a = c.on_reply(KvReply::Done {
            client: 1,
            request: req.request,
            result: KvResult::NoKey,
        });
        assert_eq!(a, vec![Action::Finished(Outcome::Done(KvResult::NoKey))]);
        assert!(c.on_unreachable(2).is_empty());
    }

    #[test]
    fn status_needs_no_session() {
        let mut c = Clerk::new(ClerkConfig::new(5, vec![1])).unwrap();
        let a = c.start(KvOp::Status).unwrap();
        let (_, req) = sent(&a).unwrap();
        assert_eq!((req.client, req.op), (5, KvOp::Status));
    }

    #[test]
    fn backs_off_after_a_round() {
        let mut c = Clerk::new(ClerkConfig::new(1, vec![1, 2])).unwrap();
        let a = c.start(KvOp::Get { key: b"k".to_vec() }).unwrap();
        let a = c.on_timer(timer(&a)); // to server 2
        assert!(sent(&a).is_some());
        let a = c.on_timer(timer(&a)); // round done: backoff, nothing sent
        assert!(sent(&a).is_none());
        let a = c.on_timer(timer(&a));
        assert!(sent(&a).is_some());
    }
}
