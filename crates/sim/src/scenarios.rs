//! Small built-in scenarios: a heartbeat cluster used by `shoal sim`, `shoal bench sim`, the
//! crate's own tests, and as a worked example of a [`Node`].

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{Ctx, NetConfig, Node, NodeId, Sim, SimConfig};

/// Period between two heartbeats from one node to each peer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);

/// Name of the file a heartbeat node persists its beat counter in.
pub const BEATS_FILE: &str = "beats";

/// Messages of the heartbeat cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeartbeatMsg {
    /// "I am alive": sent to every peer each interval.
    Beat {
        /// Sender's beat counter.
        seq: u64,
    },
    /// Reply to a beat.
    Ack {
        /// The beat acknowledged.
        seq: u64,
    },
}

/// A node that sends a heartbeat to every peer each [`HEARTBEAT_INTERVAL`] and acks beats it
/// receives. With `persist_every = Some(k)` it also appends its counter to its disk every `k`
/// beats and fsyncs it, recovering the counter on restart.
#[derive(Debug)]
pub struct HeartbeatNode {
    peers: Vec<NodeId>,
    persist_every: Option<u64>,
    /// Beats sent in this incarnation plus the recovered counter.
    pub seq: u64,
    /// Acks received in this incarnation.
    pub acks_received: u64,
    /// Beats received in this incarnation.
    pub beats_received: u64,
}

impl HeartbeatNode {
    /// A node beating to `peers`.
    pub fn new(peers: Vec<NodeId>, persist_every: Option<u64>) -> Self {
        HeartbeatNode {
            peers,
            persist_every,
            seq: 0,
            acks_received: 0,
            beats_received: 0,
        }
    }
}

impl Node<HeartbeatMsg> for HeartbeatNode {
    fn on_start(&mut self, ctx: &mut Ctx<'_, HeartbeatMsg>) {
        if self.persist_every.is_some() {
            // Recover the last whole counter record (8 bytes LE); a torn tail is ignored.
            let data = ctx.disk().read_all(BEATS_FILE).unwrap_or_default();
            let whole = data.len() / 8 * 8;
            if whole >= 8 {
                let mut word = [0u8; 8];
                word.copy_from_slice(&data[whole - 8..whole]);
                self.seq = u64::from_le_bytes(word);
            }
            if whole != data.len() {
                let _ = ctx.disk().truncate(BEATS_FILE, whole as u64);
            }
        }
        // Spread the first beats so the nodes do not all fire at the same instant.
        let jitter_nanos = ctx.rng().gen_range(0..HEARTBEAT_INTERVAL.as_nanos() as u64);
        ctx.set_timer(Duration::from_nanos(jitter_nanos), 0);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, HeartbeatMsg>, from: NodeId, msg: HeartbeatMsg) {
        match msg {
            HeartbeatMsg::Beat { seq } => {
                self.beats_received += 1;
                ctx.send_now(from, HeartbeatMsg::Ack { seq });
            }
            HeartbeatMsg::Ack { .. } => self.acks_received += 1,
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, HeartbeatMsg>, _token: u64) {
        self.seq += 1;
        for &p in &self.peers {
            ctx.send_now(p, HeartbeatMsg::Beat { seq: self.seq });
        }
        if let Some(k) = self.persist_every {
            if self.seq.checked_rem(k) == Some(0) {
                let fresh = !ctx.disk().exists(BEATS_FILE);
                let ok = ctx.disk().open_or_create(BEATS_FILE).is_ok()
                    && ctx
                        .disk()
                        .append(BEATS_FILE, &self.seq.to_le_bytes())
                        .is_ok();
                if ok {
                    let _ = ctx.fsync(BEATS_FILE);
                    if fresh {
                        ctx.fsync_dir();
                    }
                }
            }
        }
        ctx.set_timer(HEARTBEAT_INTERVAL, 0);
    }
}

/// A simulation of `n` heartbeat nodes (ids `0..n`), each beating to all others.
pub fn heartbeat_cluster(
    seed: u64,
    n: u32,
    net: NetConfig,
    persist_every: Option<u64>,
    mut config: SimConfig,
) -> Sim<HeartbeatMsg> {
    config.net = net;
    let mut sim = Sim::new(seed, config);
    for i in 0..n {
        let peers: Vec<NodeId> = (0..n).filter(|&j| j != i).map(NodeId).collect();
        sim.add_node(move |_| HeartbeatNode::new(peers.clone(), persist_every));
    }
    sim
}
