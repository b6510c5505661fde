//! The simulated shard controller: a [`Controller`] (sans-IO) whose store requests go to the
//! store servers and whose control requests go to the group servers named in the
//! configurations, through the world's [`Directory`]. A crash loses it; the new incarnation
//! (under a new lock-holder name: `ctl-{node}-{incarnation}`, unique per node and
//! incarnation) calls [`Controller::start`] again, which takes the lock once
//! the old lease ran out and finishes any incomplete change. Operations come from the test ([`ControllerNode::submit`]);
//! their results, over every incarnation, go to a shared [`CtlLog`].

use std::cell::RefCell;
use std::rc::Rc;

use shoal_shard::controller::{Controller, ControllerConfig, CtlAction, CtlPhase};
use shoal_shard::Op;
use shoal_sim::{Ctx, Node};
use shoal_wire::kv::KvMessage;

use super::{Directory, SM};
use crate::kv_client::SimId;

/// What the controller did, over all its incarnations.
#[derive(Debug, Clone, Default)]
pub struct CtlLog {
    /// (ticket, operation) of every submission, in order.
    pub submitted: Vec<(u64, Op)>,
    /// (ticket, the new configuration's number or the refusal) of every finished submission.
    pub finished: Vec<(u64, Result<u64, String>)>,
    /// The first thing the controller asked that the world cannot do (a server name no
    /// directory entry has): a bug.
    pub violation: Option<String>,
}

/// The controller actor.
pub struct ControllerNode {
    dir: Directory,
    shards: u32,
    log: Rc<RefCell<CtlLog>>,
    /// `ControllerConfig::delta_min_bytes` (the default unless set).
    delta_min_bytes: Option<u64>,
    /// The controller, once started.
    pub ctl: Option<Controller>,
}

impl ControllerNode {
    /// A controller of a world with `shards` shards, reporting to `log`.
    pub fn new(dir: Directory, shards: u32, log: Rc<RefCell<CtlLog>>) -> ControllerNode {
        ControllerNode {
            dir,
            shards,
            log,
            delta_min_bytes: None,
            ctl: None,
        }
    }

    /// Stages delta rounds down to `bytes` (0: whatever their size, while they shrink; the
    /// simulator's data is small, so with the default only the first round is staged).
    pub fn with_delta_min_bytes(mut self, bytes: u64) -> ControllerNode {
        self.delta_min_bytes = Some(bytes);
        self
    }

    /// Whether it holds the lock, the latest change is complete and nothing is queued.
    pub fn is_idle(&self) -> bool {
        self.ctl.as_ref().is_some_and(|c| {
            let s = c.status();
            s.phase == CtlPhase::Idle && s.complete && s.queued == 0
        })
    }

    /// Submits `op` under `ticket`.
    pub fn submit(&mut self, ctx: &mut Ctx<'_, SM>, ticket: u64, op: Op) {
        let Some(ctl) = self.ctl.as_mut() else {
            return;
        };
        self.log.borrow_mut().submitted.push((ticket, op.clone()));
        let actions = ctl.submit(ticket, op);
        self.perform(ctx, actions);
    }

    fn perform(&mut self, ctx: &mut Ctx<'_, SM>, actions: Vec<CtlAction>) {
        for a in actions {
            match a {
                CtlAction::Store { server, request } => match self.dir.store_sim(server) {
                    Some(to) => ctx.send(to, SM::Kv(KvMessage::Request(request))),
                    None => self.violation(format!("no store server {server}")),
                },
                CtlAction::Group {
                    gid,
                    server,
                    request,
                } => match self.dir.sim_of(&server) {
                    Some(to) if self.dir.group_server(to).map(|g| g.0) == Some(gid) => {
                        ctx.send(to, SM::Control(request))
                    }
                    _ => self.violation(format!("no server {server} in group {gid}")),
                },
                CtlAction::SetTimer { after, token } => {
                    ctx.set_timer(after, token);
                }
                CtlAction::Finished { ticket, result } => {
                    self.log.borrow_mut().finished.push((ticket, result));
                }
            }
        }
    }

    fn violation(&mut self, v: String) {
        let mut log = self.log.borrow_mut();
        if log.violation.is_none() {
            log.violation = Some(v);
        }
    }
}

/// Bytes per chunk of a moving shard in the simulator: one key per chunk (the workloads'
/// shards hold a few small keys), so a shard with several keys moves in several chunks.
pub const SIM_CHUNK_BYTES: u64 = 1;

/// The lock-holder name of controller node `id` in its incarnation `incarnation`: unique per
/// node and incarnation.
fn controller_name(id: SimId, incarnation: u32) -> String {
    format!("ctl-{}-{incarnation}", id.0)
}

impl Node<SM> for ControllerNode {
    fn on_start(&mut self, ctx: &mut Ctx<'_, SM>) {
        let me = u64::from(ctx.id().0);
        // A name per node and incarnation: two controller nodes of one world never share a
        // lock-holder name (both would believe they hold the lock), and a restarted one waits
        // for its old incarnation's lease to run out, a delayed request of the old one fenced
        // like another controller's.
        let name = controller_name(ctx.id(), ctx.incarnation()).into_bytes();
        let mut cfg = ControllerConfig::new(name, me, self.dir.store_ids(), self.shards);
        // Small chunks: a moving shard of the simulator's small data travels in several
        // chunks, with stages in flight and answered in any order.
        cfg.chunk_bytes = SIM_CHUNK_BYTES;
        if let Some(bytes) = self.delta_min_bytes {
            cfg.delta_min_bytes = bytes;
        }
        match Controller::new(cfg) {
            Ok(mut ctl) => {
                let actions = ctl.start();
                self.ctl = Some(ctl);
                self.perform(ctx, actions);
            }
            Err(e) => self.violation(format!("the controller does not start: {e}")),
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, SM>, from: SimId, msg: SM) {
        let Some(ctl) = self.ctl.as_mut() else {
            return;
        };
        let actions = match msg {
            SM::Kv(KvMessage::Reply(r)) => ctl.on_store_reply(r),
            SM::ControlReply(r) => match self.dir.group_server(from) {
                Some((gid, i)) => ctl.on_group_reply(gid, &Directory::server_name(gid, i), r),
                None => return,
            },
            _ => return,
        };
        self.perform(ctx, actions);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, SM>, token: u64) {
        let Some(ctl) = self.ctl.as_mut() else {
            return;
        };
        let actions = ctl.on_timer(token);
        self.perform(ctx, actions);
    }
}
