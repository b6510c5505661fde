//! The Raft state machine proper: terms, roles, elections, replication, commit, reads and
//! leadership transfer. One step function per role keeps the paper's Figure 2 visible.
//!
//! Nothing here does I/O: outgoing messages are queued in `msgs` (safe to send at once) or
//! `msgs_after_persist` (depend on state the driver has not made durable yet), and
//! [`crate::RawNode`] hands them out in a [`crate::Ready`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::config::{Config, ReadOnlyOption, SplitMix64};
use crate::log::RaftLog;
use crate::membership::{
    committed_index, has_quorum, is_sole_voter, next_membership, vote_result, VoteResult,
};
use crate::progress::{Progress, ProgressState};
use crate::storage::{Storage, StorageError};
use crate::{
    ConfChange, ConfChangeStep, Entry, EntryKind, Error, HardState, LogIndex, Membership, Message,
    MessageBody, NodeId, ReadState, RejectHint, Snapshot, SnapshotMeta, Term,
};

/// A node's role (paper §5.1, plus the pre-candidate of thesis §9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Polling peers to learn whether it could win, without raising its term.
    PreCandidate,
    /// Campaigning in its current term.
    Candidate,
    /// The leader of its current term.
    Leader,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CampaignKind {
    PreVote,
    Election,
    Transfer,
}

/// A read-index request waiting for a heartbeat round (thesis §6.4).
struct PendingRead {
    context: Vec<u8>,
    from: NodeId,
    index: LogIndex,
    acks: BTreeSet<NodeId>,
}

pub(crate) struct Raft<S> {
    pub(crate) id: NodeId,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) leader: Option<NodeId>,
    pub(crate) log: RaftLog<S>,
    cfg: Config,
    /// The membership of the newest configuration entry in the log, committed or not (a
    /// configuration entry takes effect when it is appended; see `membership.rs`).
    membership: Membership,
    /// The memberships that took effect at each index, oldest first (the first at or before
    /// the log start), so a snapshot at an earlier index records the membership it had.
    conf_history: Vec<(LogIndex, Membership)>,
    /// Leader: the index of the last configuration entry (or of its term's no-op); another
    /// change is refused until it is committed.
    pending_conf_index: LogIndex,
    /// This node was a member of an applied membership (so leaving it means it was removed,
    /// not that it is joining).
    was_member: bool,
    /// Leader only: one entry per member (voters and learners), this node included (its
    /// `match_index` is what is durable locally).
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    rng: SplitMix64,
    lead_transferee: Option<NodeId>,
    transfer_elapsed: u32,
    /// Leader: reads confirmed by a heartbeat round once a majority echoes their context.
    pending_reads: VecDeque<PendingRead>,
    /// Leader: reads received before the leader committed an entry of its term.
    reads_before_commit: Vec<(Vec<u8>, NodeId)>,
    /// Reads whose index is known; released to the driver once applied reaches it.
    pub(crate) read_states: Vec<ReadState>,
    pub(crate) msgs: Vec<Message>,
    pub(crate) msgs_after_persist: Vec<Message>,
    /// Proposals arrived since the last broadcast (batched into one append per follower).
    broadcast_pending: bool,
    /// A heartbeat round is needed for pending reads.
    read_heartbeat_pending: bool,
    /// The service's own snapshot, to be persisted and the log compacted by the driver.
    pub(crate) local_snapshot: Option<Snapshot>,
}

/// Log bytes read at a time when the membership is rebuilt at start.
const REPLAY_BATCH_BYTES: usize = 1024 * 1024;

impl<S: Storage> Raft<S> {
    pub(crate) fn new(cfg: Config, storage: S) -> Result<Raft<S>, Error> {
        cfg.validate()?;
        let hs = storage.hard_state();
        // The membership (rebuilt, not stored on its own): the snapshot's if it records one,
        // else the bootstrap of the config, then every configuration entry in the log, read
        // a bounded batch at a time.
        let snap = storage.snapshot_metadata()?;
        let base = if snap.voters.is_empty() {
            Membership::of_voters(cfg.voters.clone())
        } else {
            snap.membership()
        };
        let log = RaftLog::new(storage, cfg.applied);
        let mut conf_history = vec![(log.first_index().prev(), base.clone())];
        let mut membership = base;
        let mut next = log.first_index();
        while next <= log.last_index() {
            let batch = log.entries(next, log.last_index().next(), REPLAY_BATCH_BYTES)?;
            let Some(last) = batch.last() else { break };
            next = last.index.next();
            for e in &batch {
                if let Some(cc) = decode_conf_change(e) {
                    membership = cc.result.clone();
                    conf_history.push((e.index, cc.result));
                }
            }
        }
        let was_member = conf_history.iter().any(|(_, m)| m.contains(cfg.id));
        let mut r = Raft {
            id: cfg.id,
            term: hs.term,
            vote: hs.vote,
            role: Role::Follower,
            leader: None,
            log,
            membership,
            conf_history,
            pending_conf_index: LogIndex(0),
            was_member,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: cfg.election_tick,
            rng: SplitMix64::new(cfg.rng_seed),
            lead_transferee: None,
            transfer_elapsed: 0,
            pending_reads: VecDeque::new(),
            reads_before_commit: Vec::new(),
            read_states: Vec::new(),
            msgs: Vec::new(),
            msgs_after_persist: Vec::new(),
            broadcast_pending: false,
            read_heartbeat_pending: false,
            local_snapshot: None,
            cfg,
        };
        r.reset_randomized_election_timeout();
        tracing::info!(node = %r.id, term = %r.term, commit = %r.log.committed,
            last = %r.log.last_index(), membership = %r.membership, "raft node started");
        if r.is_removed() {
            tracing::warn!(node = %r.id, term = %r.term, membership = %r.membership,
                "this node was removed from the cluster; it will not campaign");
        }
        Ok(r)
    }

    pub(crate) fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    fn reset_randomized_election_timeout(&mut self) {
        let e = self.cfg.election_tick;
        self.randomized_election_timeout = self.rng.range(e, 2 * e);
    }

    // ---------------------------------------------------------------- sending

    fn send(&mut self, to: NodeId, body: MessageBody) {
        let term = self.term;
        self.send_with_term(to, term, body);
    }

    /// Messages a leader sends depend only on its term, which it persisted before it could win
    /// (its RequestVotes waited for that); they go out at once, in parallel with the leader's
    /// own fsync (thesis §10.2.1). Everything else waits for persistence.
    fn send_with_term(&mut self, to: NodeId, term: Term, body: MessageBody) {
        let immediate = self.role == Role::Leader
            && matches!(
                body,
                MessageBody::AppendEntries { .. }
                    | MessageBody::Heartbeat { .. }
                    | MessageBody::InstallSnapshot { .. }
                    | MessageBody::TimeoutNow
                    | MessageBody::ReadIndexResponse { .. }
            );
        let m = Message {
            from: self.id,
            to,
            term,
            body,
        };
        if immediate {
            self.msgs.push(m);
        } else {
            self.msgs_after_persist.push(m);
        }
    }

    /// Every other member (voters and learners): who a leader replicates to.
    fn peers(&self) -> Vec<NodeId> {
        self.membership
            .members()
            .into_iter()
            .filter(|&v| v != self.id)
            .collect()
    }

    /// May campaign: a voter of the applied membership (never a learner, a server that is
    /// still joining, or one that was removed).
    fn promotable(&self) -> bool {
        self.membership.is_voter(self.id)
    }

    /// This node was a member and a committed membership no longer includes it.
    pub(crate) fn is_removed(&self) -> bool {
        self.was_member
            && !self.membership.contains(self.id)
            && self.log.committed >= self.conf_index()
    }

    // ---------------------------------------------------------------- role changes

    fn reset(&mut self, term: Term) {
        if term != self.term {
            debug_assert!(term > self.term, "terms only increase");
            self.term = term;
            self.vote = None;
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.votes.clear();
        self.progress.clear();
        self.lead_transferee = None;
        self.transfer_elapsed = 0;
        self.pending_reads.clear();
        self.reads_before_commit.clear();
        self.broadcast_pending = false;
        self.read_heartbeat_pending = false;
    }

    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
        tracing::debug!(node = %self.id, term = %self.term, ?leader, "became follower");
    }

    fn become_pre_candidate(&mut self) {
        // A pre-candidate keeps its term and vote (thesis §9.6).
        self.votes.clear();
        self.leader = None;
        self.role = Role::PreCandidate;
        tracing::debug!(node = %self.id, term = %self.term, "became pre-candidate");
    }

    fn become_candidate(&mut self) {
        debug_assert!(self.role != Role::Leader);
        self.reset(Term(self.term.0 + 1));
        self.vote = Some(self.id);
        self.role = Role::Candidate;
        tracing::debug!(node = %self.id, term = %self.term, "became candidate");
    }

    fn become_leader(&mut self) {
        debug_assert!(self.role == Role::Candidate);
        let term = self.term;
        self.reset(term);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let next = self.log.last_index().next();
        for v in self.membership.members() {
            let mut pr = Progress::new(next);
            pr.recent_active = true;
            if v == self.id {
                pr.match_index = self.log.persisted();
                pr.state = ProgressState::Replicate;
            }
            self.progress.insert(v, pr);
        }
        // A no-op at the start of the term (paper §8): commits everything before it (Figure 8).
        // No membership change before it is applied: that covers any change still in the log
        // and is the fix for the 2015 single-server-change bug (the leader must commit an
        // entry of its own term before it changes the membership).
        self.pending_conf_index = self.append_entry(EntryKind::Noop, Vec::new());
        tracing::info!(node = %self.id, term = %self.term, last = %self.log.last_index(),
            "became leader");
    }

    fn append_entry(&mut self, kind: EntryKind, data: Vec<u8>) -> LogIndex {
        let index = self.log.last_index().next();
        let entry = Entry {
            term: self.term,
            index,
            kind,
            data,
        };
        self.log.append(std::slice::from_ref(&entry));
        self.note_appended(std::slice::from_ref(&entry));
        self.broadcast_pending = true;
        index
    }

    // ---------------------------------------------------------------- elections

    fn campaign(&mut self, kind: CampaignKind) {
        if !self.promotable() {
            tracing::debug!(node = %self.id, term = %self.term, membership = %self.membership,
                "not a voter; not campaigning");
            return;
        }
        let vote_term = match kind {
            CampaignKind::PreVote => {
                self.become_pre_candidate();
                Term(self.term.0 + 1)
            }
            CampaignKind::Election | CampaignKind::Transfer => {
                self.become_candidate();
                self.term
            }
        };
        let me = self.id;
        if self.poll(me, true) == Some(true) {
            // A single-node cluster wins at once.
            if kind == CampaignKind::PreVote {
                self.campaign(CampaignKind::Election);
            } else {
                self.become_leader();
            }
            return;
        }
        let (last_log_index, last_log_term) = (self.log.last_index(), self.log.last_term());
        let me = self.id;
        for peer in self
            .membership
            .all_voters()
            .into_iter()
            .filter(|&v| v != me)
        {
            self.send_with_term(
                peer,
                vote_term,
                MessageBody::RequestVote {
                    pre_vote: kind == CampaignKind::PreVote,
                    last_log_index,
                    last_log_term,
                    leadership_transfer: kind == CampaignKind::Transfer,
                },
            );
        }
    }

    /// Records a vote; `Some(true)` once a majority granted, `Some(false)` once a majority
    /// refused.
    fn poll(&mut self, from: NodeId, granted: bool) -> Option<bool> {
        self.votes.entry(from).or_insert(granted);
        // Thesis §4.3: a majority of each half of a joint configuration; votes of non-voters
        // are not counted.
        match vote_result(&self.membership, &self.votes) {
            VoteResult::Won => Some(true),
            VoteResult::Lost => Some(false),
            VoteResult::Pending => None,
        }
    }

    // ---------------------------------------------------------------- ticks

    pub(crate) fn tick(&mut self) {
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.election_elapsed += 1;
            if self.election_elapsed >= self.randomized_election_timeout {
                self.election_elapsed = 0;
                if !self.promotable() {
                    // Learners, joining and removed servers never campaign; but one that has
                    // not heard from its leader for a whole election timeout forgets it, or
                    // its check-quorum lease would keep refusing the votes of the candidates
                    // who must replace that leader.
                    if self.leader.take().is_some() {
                        tracing::info!(node = %self.id, term = %self.term,
                            "no word from the leader for an election timeout; forgetting it");
                    }
                    return;
                }
                tracing::debug!(node = %self.id, term = %self.term, "election timeout");
                let kind = if self.cfg.pre_vote {
                    CampaignKind::PreVote
                } else {
                    CampaignKind::Election
                };
                self.campaign(kind);
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.lead_transferee.is_some() {
            self.transfer_elapsed += 1;
            if self.transfer_elapsed >= self.cfg.election_tick {
                tracing::info!(node = %self.id, term = %self.term,
                    to = ?self.lead_transferee, "leadership transfer timed out");
                self.lead_transferee = None;
            }
        }
        if self.election_elapsed >= self.cfg.election_tick {
            self.election_elapsed = 0;
            // Check-quorum (thesis §6.2): a leader that has not heard from a majority within an
            // election timeout steps down, so a partitioned leader stops serving.
            if self.cfg.check_quorum {
                let me = self.id;
                let active = |id: NodeId| {
                    id == me || self.progress.get(&id).is_some_and(|pr| pr.recent_active)
                };
                if !has_quorum(&self.membership, active) {
                    let active = self.progress.values().filter(|p| p.recent_active).count();
                    tracing::info!(node = %self.id, term = %self.term, active,
                        "lost contact with a majority; stepping down");
                    let term = self.term;
                    self.become_follower(term, None);
                    return;
                }
            }
            let me = self.id;
            for (&id, pr) in self.progress.iter_mut() {
                pr.recent_active = id == me;
                // A snapshot that was never acknowledged (lost): probe again.
                if pr.state == ProgressState::Snapshot {
                    pr.become_probe();
                }
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    fn broadcast_heartbeat(&mut self) {
        let read_context = self.pending_reads.back().map(|r| r.context.clone());
        for peer in self.peers() {
            let m = self
                .progress
                .get(&peer)
                .map_or(LogIndex(0), |p| p.match_index);
            let commit = self.log.committed.min(m);
            self.send(
                peer,
                MessageBody::Heartbeat {
                    commit,
                    read_context: read_context.clone(),
                },
            );
        }
        self.read_heartbeat_pending = false;
    }

    // ---------------------------------------------------------------- step

    pub(crate) fn step(&mut self, m: Message) -> Result<(), Error> {
        if m.to != self.id {
            tracing::warn!(node = %self.id, to = %m.to, "message for another node dropped");
            return Err(Error::UnknownNode(m.to));
        }
        // Messages from non-members are dropped (a removed server's votes and pre-votes
        // never disrupt the cluster), except a leader's: one elected under a membership this
        // node has not seen yet must still be able to bring it up to date, one that removed
        // itself hands over, and a server that is joining knows no members yet.
        let from_leader = matches!(
            m.body,
            MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. }
        );
        let member = self.membership.contains(m.from) || self.membership.is_empty();
        // A leader that removed itself hands over with TimeoutNow once the removal commits.
        let handover = matches!(m.body, MessageBody::TimeoutNow) && self.leader == Some(m.from);
        if m.from == self.id || !(member || from_leader || handover) {
            tracing::warn!(node = %self.id, term = %self.term, from = %m.from,
                kind = m.body.name(), "message from a node outside the membership dropped");
            return Err(Error::UnknownNode(m.from));
        }

        // Terms (paper §5.1, Figure 2 "Rules for all servers").
        if m.term > self.term {
            match &m.body {
                MessageBody::RequestVote {
                    leadership_transfer,
                    pre_vote,
                    ..
                } => {
                    // Check-quorum lease (thesis §6.2 / §9.6): a node that heard from a leader
                    // within the minimum election timeout ignores vote requests, so a rejoining
                    // node cannot depose a healthy leader.
                    let in_lease = self.cfg.check_quorum
                        && self.leader.is_some()
                        && self.election_elapsed < self.cfg.election_tick;
                    if in_lease && !leadership_transfer {
                        tracing::debug!(node = %self.id, term = %self.term, from = %m.from,
                            msg_term = %m.term, pre_vote, "vote request ignored: leader lease");
                        return Ok(());
                    }
                    if !pre_vote {
                        self.become_follower(m.term, None);
                    }
                }
                MessageBody::RequestVoteResponse {
                    pre_vote: true,
                    granted: true,
                } => {
                    // A granted pre-vote carries the term we would campaign in.
                }
                MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => {
                    self.become_follower(m.term, Some(m.from));
                }
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match &m.body {
                MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. }
                    if self.cfg.check_quorum || self.cfg.pre_vote =>
                {
                    // A stale leader (perhaps one that was partitioned) must learn our term, or
                    // with pre-vote it could keep a lone follower from ever campaigning.
                    self.send(
                        m.from,
                        MessageBody::AppendEntriesResponse {
                            index: LogIndex(0),
                            reject: None,
                        },
                    );
                }
                MessageBody::RequestVote { pre_vote: true, .. } => {
                    self.send(
                        m.from,
                        MessageBody::RequestVoteResponse {
                            pre_vote: true,
                            granted: false,
                        },
                    );
                }
                _ => {
                    tracing::debug!(node = %self.id, term = %self.term, from = %m.from,
                        msg_term = %m.term, kind = m.body.name(), "stale-term message ignored");
                }
            }
            return Ok(());
        }

        if let MessageBody::RequestVote {
            pre_vote,
            last_log_index,
            last_log_term,
            ..
        } = m.body
        {
            self.handle_vote_request(m.from, m.term, pre_vote, last_log_index, last_log_term);
            return Ok(());
        }

        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
        Ok(())
    }

    /// RequestVote receiver (Figure 2), shared by all roles.
    fn handle_vote_request(
        &mut self,
        from: NodeId,
        msg_term: Term,
        pre_vote: bool,
        last_log_index: LogIndex,
        last_log_term: Term,
    ) {
        // "If votedFor is null or candidateId": also refuse if we know a leader this term.
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && msg_term > self.term);
        // §5.4.1: only for a candidate whose log is at least as up to date.
        let up_to_date = self.log.is_up_to_date(last_log_index, last_log_term);
        let granted = can_vote && up_to_date;
        tracing::debug!(node = %self.id, term = %self.term, candidate = %from, pre_vote,
            granted, "vote request");
        if granted && !pre_vote {
            self.election_elapsed = 0;
            self.vote = Some(from);
        }
        let term = if granted { msg_term } else { self.term };
        self.send_with_term(
            from,
            term,
            MessageBody::RequestVoteResponse { pre_vote, granted },
        );
    }

    fn step_follower(&mut self, m: Message) {
        match m.body {
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
            } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_append_entries(
                    m.from,
                    prev_log_index,
                    prev_log_term,
                    entries,
                    leader_commit,
                );
            }
            MessageBody::Heartbeat {
                commit,
                read_context,
            } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_heartbeat(m.from, commit, read_context);
            }
            MessageBody::InstallSnapshot { snapshot } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_snapshot(m.from, snapshot);
            }
            MessageBody::TimeoutNow if !self.promotable() => {
                tracing::info!(node = %self.id, term = %self.term, from = %m.from,
                    "leadership offered, but not a voter; ignored");
            }
            MessageBody::TimeoutNow => {
                tracing::info!(node = %self.id, term = %self.term, from = %m.from,
                    "leadership handed over; campaigning");
                self.campaign(CampaignKind::Transfer);
            }
            MessageBody::ReadIndexResponse { context, index } => {
                self.read_states.push(ReadState { index, context });
            }
            other => {
                tracing::debug!(node = %self.id, term = %self.term, from = %m.from,
                    kind = other.name(), "follower ignores message");
            }
        }
    }

    fn step_candidate(&mut self, m: Message) {
        match m.body {
            // A leader exists in our term (§5.2: "if AppendEntries RPC received from new leader:
            // convert to follower").
            MessageBody::AppendEntries { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => {
                let term = self.term;
                self.become_follower(term, Some(m.from));
                self.step_follower(m);
            }
            MessageBody::RequestVoteResponse { pre_vote, granted } => {
                if pre_vote != (self.role == Role::PreCandidate) {
                    return; // answers an earlier round
                }
                match self.poll(m.from, granted) {
                    Some(true) if pre_vote => self.campaign(CampaignKind::Election),
                    Some(true) => {
                        self.become_leader();
                        self.broadcast_append();
                    }
                    Some(false) => {
                        let term = self.term;
                        self.become_follower(term, None);
                    }
                    None => {}
                }
            }
            other => {
                tracing::debug!(node = %self.id, term = %self.term, from = %m.from,
                    kind = other.name(), "candidate ignores message");
            }
        }
    }

    fn step_leader(&mut self, m: Message) {
        let from = m.from;
        match m.body {
            MessageBody::AppendEntriesResponse { index, reject } => {
                if let Some(pr) = self.progress.get_mut(&from) {
                    pr.recent_active = true;
                }
                match reject {
                    None => self.handle_append_success(from, index),
                    Some(hint) => self.handle_append_reject(from, index, hint),
                }
            }
            MessageBody::HeartbeatResponse { read_context } => {
                let last = self.log.last_index();
                let Some(pr) = self.progress.get_mut(&from) else {
                    return;
                };
                pr.recent_active = true;
                pr.probe_sent = false;
                if pr.match_index < last {
                    let probe = match pr.state {
                        ProgressState::Replicate => {
                            // Appends in flight for two heartbeat rounds without progress were
                            // probably lost: free a slot and probe with an empty append, which
                            // a follower missing them rejects (so the leader backs up).
                            pr.idle_heartbeats += 1;
                            if pr.idle_heartbeats >= 2 {
                                pr.idle_heartbeats = 0;
                                pr.inflight.pop_front();
                                true
                            } else {
                                false
                            }
                        }
                        ProgressState::Probe => true,
                        ProgressState::Snapshot => false,
                    };
                    if probe {
                        self.send_append(from, true);
                    }
                }
                if let Some(ctx) = read_context {
                    self.ack_read(from, &ctx);
                }
            }
            MessageBody::ReadIndex { context } => self.leader_read_index(context, from),
            MessageBody::AppendEntries { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => {
                tracing::error!(node = %self.id, term = %self.term, from = %from,
                    "another leader in my term (election safety violated?); ignored");
            }
            other => {
                tracing::debug!(node = %self.id, term = %self.term, from = %from,
                    kind = other.name(), "leader ignores message");
            }
        }
    }

    // ---------------------------------------------------------------- follower handlers

    fn handle_append_entries(
        &mut self,
        from: NodeId,
        prev_log_index: LogIndex,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: LogIndex,
    ) {
        // Bad input: entries must be contiguous after prev and carry terms no newer than ours.
        let well_formed = entries.iter().enumerate().all(|(i, e)| {
            e.index.0 == prev_log_index.0.wrapping_add(1 + i as u64) && e.term <= self.term
        }) && entries.windows(2).all(|w| w[0].term <= w[1].term)
            && entries.first().is_none_or(|e| e.term >= prev_log_term);
        if !well_formed {
            tracing::warn!(node = %self.id, term = %self.term, %from, %prev_log_index,
                "malformed AppendEntries dropped");
            return;
        }
        if prev_log_index < self.log.committed {
            // Everything up to our commit index matches the leader's log (Log Matching).
            let index = self.log.committed;
            self.send(
                from,
                MessageBody::AppendEntriesResponse {
                    index,
                    reject: None,
                },
            );
            return;
        }
        if !self.log.match_term(prev_log_index, prev_log_term) {
            // Figure 2, AppendEntries step 2, with the conflict hint of §5.3.
            let hint = self.conflict_hint(prev_log_index);
            tracing::debug!(node = %self.id, term = %self.term, %prev_log_index,
                ?hint, "AppendEntries rejected: log mismatch");
            self.send(
                from,
                MessageBody::AppendEntriesResponse {
                    index: prev_log_index,
                    reject: Some(hint),
                },
            );
            return;
        }
        let last_new = LogIndex(prev_log_index.0 + entries.len() as u64);
        // Step 3–4: delete a conflicting suffix and append what is new, never touching
        // entries that already match (a stale, reordered append must not truncate).
        if let Some(i) = self.log.find_conflict(&entries) {
            let first = entries[i].index;
            if first <= self.log.committed {
                tracing::error!(node = %self.id, term = %self.term, %first,
                    committed = %self.log.committed, "append conflicts with committed entry; dropped");
                return;
            }
            self.log.append(&entries[i..]);
            self.note_appended(&entries[i..]);
        }
        // Step 5: commitIndex = min(leaderCommit, index of last new entry).
        self.log.commit_to(leader_commit.min(last_new));
        self.send(
            from,
            MessageBody::AppendEntriesResponse {
                index: last_new,
                reject: None,
            },
        );
    }

    fn conflict_hint(&self, prev_log_index: LogIndex) -> RejectHint {
        let last = self.log.last_index();
        if prev_log_index > last {
            return RejectHint {
                conflict_term: None,
                conflict_index: last.next(),
            };
        }
        let Ok(term) = self.log.term(prev_log_index) else {
            return RejectHint {
                conflict_term: None,
                conflict_index: self.log.committed.next(),
            };
        };
        // The first index of that term, no further back than what is committed.
        let floor = self.log.committed.next();
        let mut first = prev_log_index;
        while first > floor && self.log.term(first.prev()) == Ok(term) {
            first = first.prev();
        }
        RejectHint {
            conflict_term: Some(term),
            conflict_index: first,
        }
    }

    fn handle_heartbeat(&mut self, from: NodeId, commit: LogIndex, read_context: Option<Vec<u8>>) {
        let last = self.log.last_index();
        if commit > last {
            tracing::warn!(node = %self.id, term = %self.term, %from, %commit, %last,
                "heartbeat commit beyond our log; clamped");
        }
        self.log.commit_to(commit.min(last));
        self.send(from, MessageBody::HeartbeatResponse { read_context });
    }

    fn handle_snapshot(&mut self, from: NodeId, snapshot: Snapshot) {
        let SnapshotMeta { index, term, .. } = snapshot.meta;
        let reply = if index <= self.log.committed {
            // §7: a snapshot at or below what we committed adds nothing.
            tracing::debug!(node = %self.id, term = %self.term, %index, "stale snapshot ignored");
            self.log.committed
        } else if self.log.match_term(index, term) {
            // §7: "if existing log entry has same index and term as snapshot's last included
            // entry, retain log entries following it".
            self.log.commit_to(index);
            index
        } else {
            tracing::info!(node = %self.id, term = %self.term, %index, snapshot_term = %term,
                "installing snapshot");
            // The snapshot's membership replaces ours: it covers every entry of the log it
            // replaces (§7). An old snapshot without one keeps what we know.
            let m = if snapshot.meta.voters.is_empty() {
                self.membership.clone()
            } else {
                snapshot.meta.membership()
            };
            self.conf_history = vec![(index, m.clone())];
            self.switch_membership(index, m);
            self.log.restore(snapshot);
            index
        };
        self.send(
            from,
            MessageBody::AppendEntriesResponse {
                index: reply,
                reject: None,
            },
        );
    }

    // ---------------------------------------------------------------- leader handlers

    fn handle_append_success(&mut self, from: NodeId, index: LogIndex) {
        let last = self.log.last_index();
        if index > last {
            tracing::warn!(node = %self.id, term = %self.term, %from, %index, %last,
                "append response beyond our log dropped");
            return;
        }
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        let updated = pr.maybe_update(index);
        match pr.state {
            ProgressState::Probe if updated => pr.become_replicate(),
            ProgressState::Probe => pr.probe_sent = false,
            ProgressState::Snapshot if pr.match_index >= pr.pending_snapshot => {
                pr.become_replicate()
            }
            _ => {}
        }
        let match_index = pr.match_index;
        if updated && self.maybe_commit() {
            self.broadcast_pending = true;
        }
        // Pipelining: fill the window.
        while self.send_append(from, false) {}
        if self.lead_transferee == Some(from) && match_index == self.log.last_index() {
            tracing::info!(node = %self.id, term = %self.term, to = %from,
                "transferee caught up; sending TimeoutNow");
            self.send(from, MessageBody::TimeoutNow);
        }
    }

    fn handle_append_reject(&mut self, from: NodeId, rejected: LogIndex, hint: RejectHint) {
        let next = self.next_from_hint(rejected, hint);
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        let stale = match pr.state {
            ProgressState::Replicate => rejected <= pr.match_index,
            ProgressState::Probe => rejected != pr.next_index.prev(),
            ProgressState::Snapshot => true,
        };
        if stale {
            return;
        }
        let floor = pr.match_index.next();
        let next = next.max(floor).min(rejected.max(floor));
        tracing::debug!(node = %self.id, term = %self.term, %from, %rejected, ?hint, %next,
            "append rejected; backing up");
        if pr.state == ProgressState::Replicate {
            pr.become_probe();
        }
        pr.next_index = next;
        pr.probe_sent = false;
        self.send_append(from, true);
    }

    /// Fast backtracking (§5.3): skip the follower's whole conflicting term, or jump to the
    /// end of its log.
    fn next_from_hint(&self, rejected: LogIndex, hint: RejectHint) -> LogIndex {
        let Some(t) = hint.conflict_term else {
            return hint.conflict_index;
        };
        let mut i = rejected.min(self.log.last_index());
        loop {
            match self.log.term(i) {
                Ok(x) if x > t && i.0 > 0 => i = i.prev(),
                Ok(x) if x == t => return i.next(),
                _ => return hint.conflict_index,
            }
        }
    }

    /// Figure 2 ("Rules for servers", leaders, last bullet) with the Figure 8 restriction: only
    /// an entry of the current term is committed by counting replicas.
    fn maybe_commit(&mut self) -> bool {
        // Thesis §4.3: in a joint configuration, replicated on a majority of both halves.
        let q = committed_index(&self.membership, |v| {
            self.progress.get(&v).map_or(LogIndex(0), |p| p.match_index)
        });
        debug_assert!(
            self.progress.get(&self.id).map(|p| p.match_index) <= Some(self.log.persisted()),
            "leader counts itself beyond what is durable"
        );
        if q > self.log.committed && self.log.term(q) == Ok(self.term) {
            let was_current = self.committed_in_current_term();
            self.log.commit_to(q);
            tracing::trace!(node = %self.id, term = %self.term, commit = %q, "committed");
            if !was_current {
                // Thesis §6.4 step 1: reads wait for the leader's first commit in its term.
                for (ctx, from) in std::mem::take(&mut self.reads_before_commit) {
                    self.leader_read_index(ctx, from);
                }
            }
            self.after_commit();
            return true;
        }
        false
    }

    fn committed_in_current_term(&self) -> bool {
        self.log.term(self.log.committed) == Ok(self.term)
    }

    /// Sends the next append (or snapshot) to `to`, unless flow control holds it back. Returns
    /// whether something was sent.
    fn send_append(&mut self, to: NodeId, send_if_empty: bool) -> bool {
        let max_inflight = self.cfg.max_inflight_appends;
        let max_bytes = self.cfg.max_entries_bytes_per_append;
        let Some(pr) = self.progress.get(&to) else {
            return false;
        };
        if to == self.id || pr.is_paused(max_inflight) {
            return false;
        }
        let next = pr.next_index;
        debug_assert!(
            next > pr.match_index,
            "next index {next} not after match index"
        );
        let prev = next.prev();
        let last = self.log.last_index();
        let prev_term = self.log.term(prev);
        let entries = if next > last {
            Ok(Vec::new())
        } else {
            self.log.entries(next, last.next(), max_bytes)
        };
        match (prev_term, entries) {
            (Ok(prev_log_term), Ok(entries)) => {
                if entries.is_empty() && !send_if_empty {
                    return false;
                }
                let n = entries.len();
                let sent_last = LogIndex(prev.0 + n as u64);
                let leader_commit = self.log.committed;
                if let Some(pr) = self.progress.get_mut(&to) {
                    pr.sent_append(sent_last, n);
                }
                self.send(
                    to,
                    MessageBody::AppendEntries {
                        prev_log_index: prev,
                        prev_log_term,
                        entries,
                        leader_commit,
                    },
                );
                true
            }
            (Err(StorageError::Compacted), _) | (_, Err(StorageError::Compacted)) => {
                // The follower is behind our log start: InstallSnapshot (§7).
                let snapshot = match self.log.snapshot() {
                    Ok(s) => s,
                    Err(err) => {
                        tracing::warn!(node = %self.id, term = %self.term, %to, %err,
                            "snapshot not available yet");
                        return false;
                    }
                };
                tracing::info!(node = %self.id, term = %self.term, %to,
                    index = %snapshot.meta.index, "sending snapshot");
                if let Some(pr) = self.progress.get_mut(&to) {
                    pr.become_snapshot(snapshot.meta.index);
                }
                self.send(to, MessageBody::InstallSnapshot { snapshot });
                true
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(node = %self.id, term = %self.term, %to, %e, "cannot read log");
                false
            }
        }
    }

    pub(crate) fn broadcast_append(&mut self) {
        self.broadcast_pending = false;
        for peer in self.peers() {
            // Batching: everything proposed since the last broadcast goes in one append,
            // and pipelining keeps sending until the window is full.
            let mut first = true;
            while self.send_append(peer, first) {
                first = false;
            }
        }
    }

    /// Called by the node before building a Ready: flush batched broadcasts.
    pub(crate) fn flush(&mut self) {
        if self.role != Role::Leader {
            self.broadcast_pending = false;
            self.read_heartbeat_pending = false;
            return;
        }
        if self.broadcast_pending {
            self.broadcast_pending = false;
            for peer in self.peers() {
                while self.send_append(peer, false) {}
            }
        }
        if self.read_heartbeat_pending {
            self.broadcast_heartbeat();
        }
    }

    /// The driver made entries up to `index` durable.
    pub(crate) fn on_persisted(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let durable = self.log.persisted();
        let me = self.id;
        if let Some(pr) = self.progress.get_mut(&me) {
            if pr.maybe_update(durable) && self.maybe_commit() {
                self.broadcast_pending = true;
            }
        }
    }

    // ---------------------------------------------------------------- client requests

    pub(crate) fn propose(&mut self, data: Vec<u8>) -> Result<LogIndex, Error> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if self.lead_transferee.is_some() {
            return Err(Error::ProposalDropped("leadership transfer in progress"));
        }
        let uncommitted = self.log.last_index().0 - self.log.committed.0;
        if uncommitted >= self.cfg.max_uncommitted_entries {
            return Err(Error::ProposalDropped("too many uncommitted entries"));
        }
        let index = self.append_entry(EntryKind::Normal, data);
        if self.peers().is_empty() {
            // Nothing to replicate; commit happens once the entry is durable.
            self.broadcast_pending = false;
        }
        Ok(index)
    }

    pub(crate) fn read_index(&mut self, context: Vec<u8>) -> Result<(), Error> {
        if self.pending_reads.len() + self.reads_before_commit.len() >= self.cfg.max_pending_reads {
            return Err(Error::ProposalDropped("too many pending reads"));
        }
        match (self.role, self.leader) {
            (Role::Leader, _) => {
                let me = self.id;
                self.leader_read_index(context, me);
                Ok(())
            }
            (_, Some(leader)) => {
                self.send(leader, MessageBody::ReadIndex { context });
                Ok(())
            }
            (_, None) => Err(Error::NotLeader { leader: None }),
        }
    }

    /// Thesis §6.4: record the commit index, confirm leadership with a heartbeat round, then
    /// the read may be served once the state machine applied that index.
    fn leader_read_index(&mut self, context: Vec<u8>, from: NodeId) {
        if !self.committed_in_current_term() {
            self.reads_before_commit.push((context, from));
            return;
        }
        let index = self.log.committed;
        if is_sole_voter(&self.membership, self.id)
            || self.cfg.read_only == ReadOnlyOption::LeaseBased
        {
            // Single node, or the leader lease of thesis §6.4.1 (check-quorum keeps it honest).
            self.answer_read(from, context, index);
            return;
        }
        let mut acks = BTreeSet::new();
        acks.insert(self.id);
        self.pending_reads.push_back(PendingRead {
            context,
            from,
            index,
            acks,
        });
        self.read_heartbeat_pending = true;
    }

    fn ack_read(&mut self, from: NodeId, ctx: &[u8]) {
        let Some(pos) = self.pending_reads.iter().position(|r| r.context == ctx) else {
            return;
        };
        self.pending_reads[pos].acks.insert(from);
        let acks = &self.pending_reads[pos].acks;
        if has_quorum(&self.membership, |v| acks.contains(&v)) {
            // A heartbeat answered for this context was sent after every earlier request was
            // queued, so it confirms them all.
            for r in self.pending_reads.drain(..=pos).collect::<Vec<_>>() {
                self.answer_read(r.from, r.context, r.index);
            }
        }
    }

    fn answer_read(&mut self, from: NodeId, context: Vec<u8>, index: LogIndex) {
        if from == self.id {
            self.read_states.push(ReadState { index, context });
        } else {
            self.send(from, MessageBody::ReadIndexResponse { context, index });
        }
    }

    pub(crate) fn report_snapshot_failed(&mut self, to: NodeId) {
        if self.role != Role::Leader {
            return;
        }
        if let Some(pr) = self.progress.get_mut(&to) {
            if pr.state == ProgressState::Snapshot {
                tracing::info!(node = %self.id, term = %self.term, %to,
                    pending = %pr.pending_snapshot, "snapshot failed; probing again");
                pr.pending_snapshot = LogIndex(0);
                pr.become_probe();
            }
        }
    }

    pub(crate) fn transfer_leader(&mut self, to: NodeId) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if !self.membership.is_voter(to) {
            return Err(Error::UnknownNode(to));
        }
        if to == self.id || self.lead_transferee == Some(to) {
            return Ok(());
        }
        tracing::info!(node = %self.id, term = %self.term, %to, "transferring leadership");
        self.lead_transferee = Some(to);
        self.transfer_elapsed = 0;
        let caught_up =
            self.progress.get(&to).map(|p| p.match_index) == Some(self.log.last_index());
        if caught_up {
            self.send(to, MessageBody::TimeoutNow);
        } else {
            self.send_append(to, true);
        }
        Ok(())
    }

    /// Starts an election now (tests, or an operator forcing one).
    pub(crate) fn campaign_now(&mut self) {
        if self.role == Role::Leader {
            return;
        }
        let kind = if self.cfg.pre_vote {
            CampaignKind::PreVote
        } else {
            CampaignKind::Election
        };
        self.campaign(kind);
    }

    pub(crate) fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The membership in effect at `index` (at or after the log start).
    pub(crate) fn membership_at(&self, index: LogIndex) -> Membership {
        self.conf_history
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .or(self.conf_history.first())
            .map_or_else(|| self.membership.clone(), |(_, m)| m.clone())
    }

    // ---------------------------------------------------------------- membership changes

    /// Proposes a membership change (thesis §4; see `membership.rs` for the rules).
    pub(crate) fn propose_conf_change(
        &mut self,
        steps: Vec<ConfChangeStep>,
    ) -> Result<LogIndex, Error> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if self.lead_transferee.is_some() {
            return Err(Error::ProposalDropped("leadership transfer in progress"));
        }
        if self.log.committed < self.pending_conf_index {
            return Err(Error::ConfChangeInFlight {
                pending: self.pending_conf_index,
                committed: self.log.committed,
            });
        }
        let result = next_membership(&self.membership, &steps)?;
        let last_index = self.log.last_index();
        for step in &steps {
            if let ConfChangeStep::Promote(id) = *step {
                let match_index = self
                    .progress
                    .get(&id)
                    .map_or(LogIndex(0), |p| p.match_index);
                if last_index.0 - match_index.0.min(last_index.0) > self.cfg.max_learner_lag_entries
                {
                    return Err(Error::LearnerBehind {
                        match_index,
                        last_index,
                    });
                }
            }
        }
        let uncommitted = self.log.last_index().0 - self.log.committed.0;
        if uncommitted >= self.cfg.max_uncommitted_entries {
            return Err(Error::ProposalDropped("too many uncommitted entries"));
        }
        tracing::info!(node = %self.id, term = %self.term, ?steps, from = %self.membership,
            to = %result, "proposing a membership change");
        Ok(self.append_conf_change(ConfChange { steps, result }))
    }

    fn append_conf_change(&mut self, cc: ConfChange) -> LogIndex {
        let data = encode_conf_change(&cc);
        let index = self.append_entry(EntryKind::ConfChange, data);
        self.pending_conf_index = index;
        if self.peers().is_empty() {
            self.broadcast_pending = false;
        }
        index
    }

    /// The index of the configuration entry the membership comes from (or of the snapshot
    /// or the log start, for the first membership).
    fn conf_index(&self) -> LogIndex {
        self.conf_history.last().map_or(LogIndex(0), |(i, _)| *i)
    }

    /// Entries were appended to the log (after truncating any suffix from the first one's
    /// index): a configuration entry takes effect at once (thesis §4.1), and one that was
    /// truncated takes its membership with it.
    fn note_appended(&mut self, entries: &[Entry]) {
        let Some(head) = entries.first() else { return };
        if self.conf_index() >= head.index {
            self.conf_history.retain(|(i, _)| *i < head.index);
            let (index, m) = self
                .conf_history
                .last()
                .cloned()
                .expect("the history keeps the membership at the log start");
            tracing::info!(node = %self.id, term = %self.term, truncated_from = %head.index,
                "configuration entry truncated");
            self.switch_membership(index, m);
        }
        for e in entries {
            if let Some(cc) = decode_conf_change(e) {
                self.conf_history.push((e.index, cc.result.clone()));
                self.switch_membership(e.index, cc.result);
            }
        }
        // Keep the history from the last membership at or before the log start.
        let start = self.log.first_index().prev();
        while self.conf_history.len() > 1 && self.conf_history[1].0 <= start {
            self.conf_history.remove(0);
        }
    }

    /// The membership of the entry at `index` is now in effect.
    fn switch_membership(&mut self, index: LogIndex, m: Membership) {
        if m == self.membership {
            return;
        }
        tracing::info!(node = %self.id, term = %self.term, %index, from = %self.membership,
            to = %m, "membership changed");
        self.membership = m;
        if self.membership.contains(self.id) {
            self.was_member = true;
        } else if self.was_member {
            tracing::warn!(node = %self.id, term = %self.term, %index,
                "this node is not in the new membership; it will not campaign");
        }
        if !self.promotable() && matches!(self.role, Role::Candidate | Role::PreCandidate) {
            let term = self.term;
            self.become_follower(term, None);
        }
        if self.role == Role::Leader {
            let next = self.log.last_index().next();
            let members = self.membership.members();
            let me = self.id;
            self.progress
                .retain(|id, _| *id == me || members.contains(id));
            for id in members {
                if self.progress.contains_key(&id) {
                    continue;
                }
                let mut pr = Progress::new(next);
                pr.recent_active = true;
                self.progress.insert(id, pr);
                // A probe now: the new member's log may be anything (empty if it joins).
                self.send_append(id, true);
            }
        }
    }

    /// Leader, after its commit index moved: a joint configuration with auto-leave is left
    /// once it is committed (etcd's ConfChangeV2 auto-leave), and a leader that is no longer
    /// a voter steps down once the configuration without it is committed (thesis §4.2.2),
    /// handing over to the most up-to-date voter so the cluster need not wait for an
    /// election timeout.
    fn after_commit(&mut self) {
        if self.role != Role::Leader || self.log.committed < self.pending_conf_index {
            return;
        }
        if self.membership.is_joint() && self.membership.auto_leave {
            let result = match next_membership(&self.membership, &[]) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(node = %self.id, term = %self.term, %e, "cannot leave joint");
                    return;
                }
            };
            tracing::info!(node = %self.id, term = %self.term, from = %self.membership,
                to = %result, "leaving the joint configuration");
            self.append_conf_change(ConfChange {
                steps: Vec::new(),
                result,
            });
            return;
        }
        if !self.promotable() {
            let last = self.log.last_index();
            let target = self
                .membership
                .all_voters()
                .into_iter()
                .filter_map(|v| self.progress.get(&v).map(|p| (p.match_index, v)))
                .filter(|&(m, _)| m == last)
                .max();
            if let Some((_, to)) = target {
                tracing::info!(node = %self.id, term = %self.term, %to,
                    "removed from the voters; handing leadership over");
                self.send(to, MessageBody::TimeoutNow);
            } else {
                tracing::info!(node = %self.id, term = %self.term,
                    "removed from the voters; stepping down");
            }
            let term = self.term;
            self.become_follower(term, None);
        }
    }
}

/// The payload of a configuration entry.
pub(crate) fn encode_conf_change(cc: &ConfChange) -> Vec<u8> {
    postcard::to_allocvec(cc).expect("postcard encoding of plain data")
}

/// The change a configuration entry carries; `None` for other entries and for a payload that
/// does not decode (logged: it cannot come from a correct leader).
pub(crate) fn decode_conf_change(e: &Entry) -> Option<ConfChange> {
    if e.kind != EntryKind::ConfChange {
        return None;
    }
    match postcard::from_bytes::<ConfChange>(&e.data) {
        Ok(cc) => Some(cc),
        Err(err) => {
            tracing::error!(index = %e.index, %err, "undecodable configuration entry ignored");
            None
        }
    }
}
