//! Membership requests of the KV server (issue 15): `shoal kv member list/add/promote/remove`,
//! answered by the leader.
//!
//! A change is a Raft configuration entry ([`shoal_replica::Replica::propose_conf_change`]),
//! answered once it is committed. The members' **addresses** are not Raft's business: right
//! after each change the leader proposes a [`KvOp::MemberAddresses`] entry with every
//! member's address, which the store keeps (and its snapshots carry), so a joining server and
//! a restarted one learn where everybody is from the log or a snapshot. The leader knows the
//! addresses of the servers it was started with (`--peers`) and those of later changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use shoal_raft::{ConfChangeStep, NodeId, Role};
use shoal_replica::ConfChangeDone;
use shoal_wire::kv::{KvOp, KvRequest, KvResult, MemberInfo};

use crate::rsm::{KvRsm, Waiter};

impl KvRsm {
    /// Addresses this server knows without the log: its own and its `--peers` (the
    /// replicated table overrides them).
    pub fn set_known_addresses(&mut self, known: BTreeMap<u64, String>) {
        self.known_addresses = known;
    }

    /// Every address this server knows: the ones it was started with, overridden by the
    /// replicated table.
    pub fn addresses(&self) -> BTreeMap<u64, String> {
        let mut all = self.known_addresses.clone();
        for (id, addr) in self.store().member_addresses().iter() {
            all.insert(*id, addr.clone());
        }
        all
    }

    /// Server `id`'s address as this server knows it: the replicated table's, else the one
    /// it was started with.
    pub fn address_of(&self, id: u64) -> Option<String> {
        self.store()
            .member_addresses()
            .get(&id)
            .or_else(|| self.known_addresses.get(&id))
            .filter(|a| !a.is_empty())
            .cloned()
    }

    /// The other members and their addresses (those known): whom the transport connects to
    /// and accepts. Changes as the membership does.
    pub fn peer_addresses(&self) -> BTreeMap<u64, String> {
        let me = self.raw().status().id;
        let addresses = self.addresses();
        self.raw()
            .membership()
            .members()
            .into_iter()
            .filter(|&id| id != me)
            .filter_map(|id| addresses.get(&id.0).map(|a| (id.0, a.clone())))
            .collect()
    }

    /// The members as the leader knows them: id, address, role, match index, lag.
    pub fn member_infos(&self) -> Vec<MemberInfo> {
        let status = self.raw().status();
        let addresses = self.addresses();
        let last = status.last_index.0;
        let progress: BTreeMap<NodeId, u64> = status
            .peers
            .iter()
            .map(|p| (p.id, p.match_index.0))
            .collect();
        status
            .membership
            .members()
            .into_iter()
            .map(|id| {
                let match_index = if id == status.id {
                    last
                } else {
                    progress.get(&id).copied().unwrap_or(0)
                };
                MemberInfo {
                    id: id.0,
                    addr: addresses.get(&id.0).cloned().unwrap_or_default(),
                    voter: status.membership.is_voter(id),
                    match_index,
                    behind: last.saturating_sub(match_index),
                }
            })
            .collect()
    }

    fn members_result(&self) -> KvResult {
        KvResult::Members {
            leader: self.raw().status().id.0,
            members: self.member_infos(),
            // The driver adds the snapshot sends its transport has under way.
            transfers: Vec::new(),
        }
    }

    /// A membership request from a client (the caller checked [`KvOp::is_membership`]).
    pub(crate) fn handle_membership(&mut self, reply_to: u64, req: KvRequest) {
        if req.op == KvOp::MemberList && req.serializable {
            // Any server's own view (a joining server asks for the addresses this way).
            let result = KvResult::Members {
                leader: self.raw().leader().map_or(0, |l| l.0),
                members: self.member_infos(),
                transfers: Vec::new(),
            };
            self.answer(reply_to, req.client, req.request, result);
            return;
        }
        if self.raw().role() != Role::Leader {
            self.wrong_leader(reply_to, req.client, req.request);
            return;
        }
        let refuse = |reason: String| KvResult::Refused { reason };
        let membership = self.raw().membership().clone();
        let addresses = self.addresses();
        let (steps, new_addr) = match &req.op {
            KvOp::MemberList => {
                let result = self.members_result();
                self.answer(reply_to, req.client, req.request, result);
                return;
            }
            KvOp::MemberAdd { id, addr, learner } => {
                let id = *id;
                if id == 0 {
                    let r = refuse("server id 0 is reserved: pick another id".into());
                    self.answer(reply_to, req.client, req.request, r);
                    return;
                }
                if addr.parse::<SocketAddr>().is_err() {
                    let r = refuse(format!(
                        "{addr:?} is not an address: give IP:PORT, e.g. 127.0.0.1:7004"
                    ));
                    self.answer(reply_to, req.client, req.request, r);
                    return;
                }
                if membership.contains(NodeId(id)) {
                    let same_addr = addresses.get(&id) == Some(addr);
                    let same_role = membership.is_learner(NodeId(id)) == *learner;
                    // A retried request that already took effect: its answer.
                    let r = if same_addr && same_role {
                        self.members_result()
                    } else {
                        let role = if membership.is_learner(NodeId(id)) {
                            "learner"
                        } else {
                            "voter"
                        };
                        let at = addresses.get(&id).map(String::as_str).unwrap_or("?");
                        refuse(format!(
                            "server id {id} is already in use (a {role} at {at}): pick \
                             another id, or remove it first with `shoal kv member remove {id}`"
                        ))
                    };
                    self.answer(reply_to, req.client, req.request, r);
                    return;
                }
                let step = if *learner {
                    ConfChangeStep::AddLearner(NodeId(id))
                } else {
                    ConfChangeStep::AddVoter(NodeId(id))
                };
                (vec![step], Some((id, addr.clone())))
            }
            KvOp::MemberPromote { id } => {
                let id = NodeId(*id);
                if membership.is_voter(id) {
                    let r = self.members_result();
                    self.answer(reply_to, req.client, req.request, r);
                    return;
                }
                if !membership.is_learner(id) {
                    let r = refuse(format!(
                        "server {id} is not a member (see `shoal kv member list`); add it \
                         with `shoal kv member add {id} ADDR --learner` first"
                    ));
                    self.answer(reply_to, req.client, req.request, r);
                    return;
                }
                let heard = self
                    .raw()
                    .status()
                    .peers
                    .iter()
                    .any(|p| p.id == id && p.match_index.0 > 0);
                if !heard {
                    let r = refuse(format!(
                        "learner {id} has received none of the log yet: is it running (`shoal \
                         kv server --id {id} --join …`)? Retry once `shoal kv member list` \
                         shows it catching up"
                    ));
                    self.answer(reply_to, req.client, req.request, r);
                    return;
                }
                (vec![ConfChangeStep::Promote(id)], None)
            }
            KvOp::MemberRemove { id } => {
                let id = NodeId(*id);
                if !membership.contains(id) {
                    // A former member (its address was replicated): a retried removal.
                    let r = if self.store().member_addresses().contains_key(&id.0) {
                        self.members_result()
                    } else {
                        refuse(format!(
                            "server {id} is not a member (see `shoal kv member list`)"
                        ))
                    };
                    self.answer(reply_to, req.client, req.request, r);
                    return;
                }
                (vec![ConfChangeStep::Remove(id)], None)
            }
            _ => return,
        };
        let waiter = Waiter {
            reply_to,
            client: req.client,
            request: req.request,
            read: None,
        };
        match self.replica_mut().propose_conf_change(steps, waiter) {
            Ok(index) => {
                tracing::info!(index = index.0, op = ?req.op, "membership change proposed");
                // Right behind it, every member's address (the new one included).
                let mut table = addresses;
                if let Some((id, addr)) = new_addr {
                    // The leader reaches the new member at once, before the table commits
                    // (a voter added to a cluster of one is needed for that commit).
                    self.known_addresses.insert(id, addr.clone());
                    table.insert(id, addr);
                }
                // Former members keep their entry: a retried removal is recognised by it.
                self.propose_internal(KvOp::MemberAddresses {
                    members: table.into_iter().collect(),
                });
            }
            Err((e, w)) => {
                let reason = match e {
                    shoal_raft::Error::NotLeader { .. } => {
                        self.wrong_leader(w.reply_to, w.client, w.request);
                        return;
                    }
                    shoal_raft::Error::LearnerBehind {
                        match_index,
                        last_index,
                    } => format!(
                        "the learner is behind: it holds the log up to {match_index}, the \
                         leader up to {last_index} ({} entries behind); retry once it has \
                         caught up (`shoal kv member list` shows how far behind it is)",
                        last_index.0.saturating_sub(match_index.0)
                    ),
                    shoal_raft::Error::ConfChangeInFlight { .. } => {
                        format!("{e} (another membership change is being committed)")
                    }
                    other => other.to_string(),
                };
                self.answer(w.reply_to, w.client, w.request, refuse(reason));
            }
        }
    }

    /// Answers the membership changes the replica decided.
    pub(crate) fn collect_conf_done(&mut self) {
        if !self.replica().has_conf_done() {
            return;
        }
        for done in self.replica_mut().take_conf_done() {
            match done {
                ConfChangeDone::Committed {
                    tag: w,
                    index,
                    membership,
                } => {
                    tracing::info!(index = index.0, %membership, "membership change committed");
                    let result = self.members_result();
                    self.answer(w.reply_to, w.client, w.request, result);
                }
                ConfChangeDone::NotLeader { tag: w, .. } => {
                    self.wrong_leader(w.reply_to, w.client, w.request)
                }
            }
        }
    }
}
