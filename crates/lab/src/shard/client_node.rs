//! The simulated routing client: a [`ShardClerk`] (sans-IO) reading configurations from the
//! controller's store and sending requests to the group servers named there, through the
//! world's [`Directory`]; every operation's invoke and return is recorded in the simulator's
//! history for the versioned-KV checker ([`crate::kv_client::check_kv_history`]), as the KV
//! client actor does.

use shoal_kv::Outcome;
use shoal_shard::client::{ClientAction, ShardClerk, ShardClerkConfig};
use shoal_sim::{Ctx, Node, OpId, SimTime};
use shoal_wire::kv::{KvMessage, KvOp, KvResult};

use super::{Directory, SM};
use crate::kv_client::{to_input, to_output, PutLoop, SimId};

/// What a routing client does.
#[derive(Debug, Clone)]
pub enum ShardWork {
    /// Runs these operations in order, once.
    Script(Vec<KvOp>),
    /// Put at the last known version, then get, on random `keys` until `until`
    /// ([`PutLoop`]).
    PutLoop {
        /// The keys.
        keys: Vec<String>,
        /// When to stop (after the current put's get).
        until: SimTime,
    },
}

/// A routing client actor.
pub struct ShardClientNode {
    dir: Directory,
    clerk: ShardClerk,
    work: ShardWork,
    put_loop: PutLoop,
    current: Option<(Option<OpId>, KvOp)>,
    /// Every finished operation with its outcome, in order.
    pub results: Vec<(KvOp, Outcome)>,
    /// Puts answered `Written`.
    pub ok_puts: u64,
    /// Operations answered `Maybe`.
    pub maybes: u64,
    /// The workload is done.
    pub finished: bool,
    /// The first thing this client saw that it must never see.
    pub violation: Option<String>,
}

impl ShardClientNode {
    /// Client `client` (its sim id: its id in the store and at the groups) of the world `dir`,
    /// running `work`.
    pub fn new(client: u64, dir: Directory, work: ShardWork) -> ShardClientNode {
        let clerk = ShardClerk::new(ShardClerkConfig::new(client, dir.store_ids()))
            .expect("the world has store servers");
        ShardClientNode {
            dir,
            clerk,
            work,
            put_loop: PutLoop::default(),
            current: None,
            results: Vec::new(),
            ok_puts: 0,
            maybes: 0,
            finished: false,
            violation: None,
        }
    }

    /// Where it is, for a failure report: its operation in flight and cached configuration.
    pub fn describe(&self) -> String {
        format!(
            "{:?} with configuration {:?} cached, {} done",
            self.current.as_ref().map(|c| &c.1),
            self.clerk.config().map(|c| c.num),
            self.results.len()
        )
    }

    /// The configuration this client last read from the controller's store (the lab's
    /// `Query()` as a client sees it), if it has read one.
    pub fn config(&self) -> Option<&shoal_shard::Config> {
        self.clerk.config()
    }

    fn violation(&mut self, v: String) {
        if self.violation.is_none() {
            self.violation = Some(v);
        }
    }

    fn run(&mut self, ctx: &mut Ctx<'_, SM>, op: KvOp) {
        let id = to_input(&op).map(|i| ctx.invoke(i));
        self.current = Some((id, op.clone()));
        match self.clerk.start(op) {
            Ok(actions) => self.perform(ctx, actions),
            Err(e) => self.violation(format!("the clerk refused: {e}")),
        }
    }

    fn perform(&mut self, ctx: &mut Ctx<'_, SM>, actions: Vec<ClientAction>) {
        for a in actions {
            match a {
                ClientAction::Store { server, request } => match self.dir.store_sim(server) {
                    Some(to) => ctx.send(to, SM::Kv(KvMessage::Request(request))),
                    None => self.violation(format!("no store server {server}")),
                },
                ClientAction::Group {
                    gid,
                    server,
                    request,
                } => match self.dir.sim_of(&server) {
                    Some(to) if self.dir.group_server(to).map(|g| g.0) == Some(gid) => {
                        ctx.send(to, SM::Shard(request))
                    }
                    _ => self.violation(format!("no server {server} in group {gid}")),
                },
                ClientAction::SetTimer { after, token } => {
                    ctx.set_timer(after, token);
                }
                ClientAction::Finished(outcome) => self.finished_op(ctx, outcome),
            }
        }
    }

    fn finished_op(&mut self, ctx: &mut Ctx<'_, SM>, outcome: Outcome) {
        let Some((id, op)) = self.current.take() else {
            return;
        };
        if let Some(id) = id {
            ctx.complete(id, to_output(&outcome));
        }
        match (&op, &outcome) {
            (_, Outcome::Maybe) => self.maybes += 1,
            (KvOp::Put { .. }, Outcome::Done(KvResult::Written { .. })) => self.ok_puts += 1,
            // Refusals mean the routing client sent something a group cannot take (a key in
            // the wrong shard, a stale session misused): never expected here.
            (_, Outcome::Done(KvResult::Refused { reason })) => {
                self.violation(format!("{op:?} refused: {reason}"))
            }
            _ => {}
        }
        self.results.push((op, outcome));
        self.next(ctx);
    }

    fn next(&mut self, ctx: &mut Ctx<'_, SM>) {
        match &self.work {
            ShardWork::Script(ops) => match ops.get(self.results.len()).cloned() {
                Some(op) => self.run(ctx, op),
                None => self.finished = true,
            },
            ShardWork::PutLoop { keys, until } => {
                let past = ctx.now() >= *until;
                let me = u64::from(ctx.id().0);
                let keys = keys.clone();
                match self
                    .put_loop
                    .next(ctx.rng(), me, &keys, past, self.results.last())
                {
                    Some(op) => self.run(ctx, op),
                    None => self.finished = true,
                }
            }
        }
    }
}

impl Node<SM> for ShardClientNode {
    fn on_start(&mut self, ctx: &mut Ctx<'_, SM>) {
        self.next(ctx);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, SM>, _from: SimId, msg: SM) {
        let actions = match msg {
            SM::Kv(KvMessage::Reply(r)) => self.clerk.on_store_reply(r),
            SM::ShardReply(r) => self.clerk.on_group_reply(r),
            _ => return,
        };
        self.perform(ctx, actions);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, SM>, token: u64) {
        let actions = self.clerk.on_timer(token);
        self.perform(ctx, actions);
    }
}
