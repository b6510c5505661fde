//! Test nodes shared by the simulator's integration tests.
#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use shoal_sim::{Ctx, FsyncId, Node, NodeId, SimTime};

/// Messages of the probe tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TMsg {
    /// A numbered datagram stamped with its send time.
    Data { id: u64, sent_nanos: u64 },
    /// A payload of some size.
    Blob(Vec<u8>),
}

/// A node that does nothing by itself and records what it receives; tests make it send with
/// `sim.call`.
#[derive(Debug, Default)]
pub struct Probe {
    pub received: Vec<(SimTime, NodeId, TMsg)>,
    pub timers: Vec<(SimTime, u64)>,
    pub fsyncs: Vec<(SimTime, FsyncId)>,
    pub starts: u32,
}

impl Node<TMsg> for Probe {
    fn on_start(&mut self, _ctx: &mut Ctx<'_, TMsg>) {
        self.starts += 1;
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, TMsg>, from: NodeId, msg: TMsg) {
        self.received.push((ctx.now(), from, msg));
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_, TMsg>, token: u64) {
        self.timers.push((ctx.now(), token));
    }
    fn on_fsync_complete(&mut self, ctx: &mut Ctx<'_, TMsg>, fsync: FsyncId) {
        self.fsyncs.push((ctx.now(), fsync));
    }
}

/// Sends `Data` from `from` to `to` with the current time stamped.
pub fn send_data(sim: &mut shoal_sim::Sim<TMsg>, from: NodeId, to: NodeId, id: u64) {
    sim.call::<Probe, _>(from, |_, ctx| {
        let sent_nanos = ctx.now().as_nanos();
        ctx.send(to, TMsg::Data { id, sent_nanos });
    })
    .expect("probe is up");
}

/// Ids of the `Data` messages a probe received.
pub fn received_ids(sim: &shoal_sim::Sim<TMsg>, at: NodeId) -> Vec<u64> {
    sim.node::<Probe>(at)
        .map(|p| {
            p.received
                .iter()
                .filter_map(|(_, _, m)| match m {
                    TMsg::Data { id, .. } => Some(*id),
                    TMsg::Blob(_) => None,
                })
                .collect()
        })
        .unwrap_or_default()
}
