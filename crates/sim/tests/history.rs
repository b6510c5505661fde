//! Client actors recording a history against a toy register server over a lossy network.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_sim::{Ctx, NetConfig, Node, NodeId, OpId, Sim, SimConfig};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Msg {
    Write { req: u64, value: u64 },
    Read { req: u64 },
    WriteOk { req: u64 },
    ReadOk { req: u64, value: u64 },
}

/// Checker-side view of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Input {
    Write(u64),
    Read,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Output {
    Written,
    Value(u64),
}

/// A single-register server; idempotent writes make client retries safe enough here.
struct Server {
    value: u64,
}

impl Node<Msg> for Server {
    fn on_start(&mut self, _ctx: &mut Ctx<'_, Msg>) {}
    fn on_message(&mut self, ctx: &mut Ctx<'_, Msg>, from: NodeId, msg: Msg) {
        match msg {
            Msg::Write { req, value } => {
                self.value = value;
                ctx.send(from, Msg::WriteOk { req });
            }
            Msg::Read { req } => ctx.send(
                from,
                Msg::ReadOk {
                    req,
                    value: self.value,
                },
            ),
            _ => {}
        }
    }
    fn on_timer(&mut self, _ctx: &mut Ctx<'_, Msg>, _token: u64) {}
}

const RETRY: Duration = Duration::from_millis(100);
const THINK: Duration = Duration::from_millis(30);
const TOKEN_RETRY: u64 = 1;
const TOKEN_NEXT: u64 = 2;

/// A client that issues `ops` random reads and writes one at a time, retrying until answered.
struct Client {
    server: NodeId,
    ops_left: u32,
    req: u64,
    pending: Option<(OpId, Msg)>,
}

impl Client {
    fn next(&mut self, ctx: &mut Ctx<'_, Msg>) {
        if self.ops_left == 0 {
            return;
        }
        self.ops_left -= 1;
        self.req += 1;
        let req = self.req;
        let (input, msg) = if rand::Rng::gen_bool(ctx.rng(), 0.5) {
            let value = u64::from(ctx.id().0) * 1_000 + req;
            (Input::Write(value), Msg::Write { req, value })
        } else {
            (Input::Read, Msg::Read { req })
        };
        let op = ctx.invoke(input);
        ctx.send(self.server, msg.clone());
        self.pending = Some((op, msg));
        ctx.set_timer(RETRY, TOKEN_RETRY);
    }
}

impl Node<Msg> for Client {
    fn on_start(&mut self, ctx: &mut Ctx<'_, Msg>) {
        ctx.set_timer(THINK, TOKEN_NEXT);
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, Msg>, _from: NodeId, msg: Msg) {
        let Some((op, _)) = &self.pending else { return };
        let (req, output) = match msg {
            Msg::WriteOk { req } => (req, Output::Written),
            Msg::ReadOk { req, value } => (req, Output::Value(value)),
            _ => return,
        };
        if req != self.req {
            return; // a stale reply to an earlier attempt
        }
        ctx.complete(*op, output);
        self.pending = None;
        ctx.set_timer(THINK, TOKEN_NEXT);
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_, Msg>, token: u64) {
        match token {
            TOKEN_NEXT if self.pending.is_none() => self.next(ctx),
            TOKEN_RETRY => {
                if let Some((_, msg)) = &self.pending {
                    ctx.send(self.server, msg.clone());
                    ctx.set_timer(RETRY, TOKEN_RETRY);
                }
            }
            _ => {}
        }
    }
}

#[test]
fn clients_record_a_history_over_a_lossy_network() {
    shoal_sim::check_seeds!(5, |seed| {
        let mut sim = Sim::new(
            seed,
            SimConfig {
                net: NetConfig::unreliable(),
                ..SimConfig::default()
            },
        );
        let server = sim.add_node(|_| Server { value: 0 });
        let clients: Vec<NodeId> = (0..3)
            .map(|_| {
                sim.add_node(move |_| Client {
                    server,
                    ops_left: 20,
                    req: 0,
                    pending: None,
                })
            })
            .collect();
        sim.run_for(Duration::from_secs(30));
        // Crash a client that is idle by now: its history stays as recorded.
        sim.crash(clients[0]);

        let history = sim
            .history::<Input, Output>()
            .map_err(|e| sim.failure(e.to_string()))?;
        if history.len() != 60 {
            return Err(sim.failure(format!("{} operations recorded, want 60", history.len())));
        }
        let mut writes = std::collections::BTreeSet::from([0]);
        for op in &history {
            if let Input::Write(v) = op.input {
                writes.insert(v);
            }
        }
        for op in &history {
            let (Some(out), Some(ret)) = (&op.output, op.returned_at) else {
                return Err(sim.failure(format!("{op:?} never returned")));
            };
            if ret < op.called_at {
                return Err(sim.failure(format!("{op:?} returned before it was called")));
            }
            match (&op.input, out) {
                (Input::Write(_), Output::Written) => {}
                (Input::Read, Output::Value(v)) if writes.contains(v) => {}
                _ => return Err(sim.failure(format!("{op:?} has an impossible output"))),
            }
        }
        if sim.history::<u64, u64>().is_ok() {
            return Err(sim.failure("type mismatch not detected"));
        }
        Ok::<(), shoal_sim::Failure>(())
    });
}

#[test]
fn an_operation_cut_short_by_a_crash_stays_open() {
    let mut sim: Sim<Msg> = Sim::new(1, SimConfig::default());
    let server = sim.add_node(|_| Server { value: 0 });
    let client = sim.add_node(move |_| Client {
        server,
        ops_left: 5,
        req: 0,
        pending: None,
    });
    sim.isolate(server);
    sim.run_for(Duration::from_secs(1));
    sim.crash(client);
    let history = sim.history::<Input, Output>().expect("types match");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].output, None);
    assert_eq!(history[0].returned_at, None);
    assert_eq!(history[0].client, client);
}
