//! Three in-process Raft nodes over real sockets keep their logs consistent and keep
//! committing while a fourth, impersonated voter sends forged, stale and impossible messages:
//! wrong sender or receiver, stale terms, indices far beyond any log, absurd commit indices.
//! (Raft assumes peers are not malicious, so same-term leader messages are not forged here:
//! those are bugs of a peer, not bad input the protocol can defend against.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_raft::{
    Entry, EntryKind, LogIndex, Message, MessageBody, NodeId, RejectHint, Role, Snapshot,
    SnapshotMeta, Term,
};
use shoal_runtime::demo::DemoStateMachine;
use shoal_runtime::{Node, NodeConfig, ProposeError, Transport, TransportConfig, TransportStats};
use tokio::net::TcpListener;

const CLUSTER: u64 = 11;
const POLL: Duration = Duration::from_millis(20);
const MAX_POLLS: u32 = 1500; // 30 s liveness bound

struct Running {
    nodes: Vec<Node>,
    sms: Vec<DemoStateMachine>,
    _dirs: tempfile::TempDir,
}

async fn start() -> (Running, Transport<Message>, BTreeMap<u64, SocketAddr>) {
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=4u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, l.local_addr().unwrap());
        listeners.push(l);
    }
    let dirs = tempfile::tempdir().unwrap();
    let impostor_listener = listeners.pop().unwrap();
    let mut nodes = Vec::new();
    let mut sms = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let mut c = NodeConfig::new(
            NodeId(id),
            CLUSTER,
            peers.clone(),
            dirs.path().join(format!("n{id}")),
        );
        c.tick_interval = Duration::from_millis(10);
        c.snapshot_every = Some(8);
        let sm = DemoStateMachine::default();
        nodes.push(Node::start(c, l, sm.clone()).await.unwrap());
        sms.push(sm);
    }
    let (impostor, _inbound, _clients) = Transport::<Message>::start(
        TransportConfig::new(4, CLUSTER, peers.clone()),
        impostor_listener,
    )
    .unwrap();
    (
        Running {
            nodes,
            sms,
            _dirs: dirs,
        },
        impostor,
        peers,
    )
}

async fn leader(r: &Running) -> (usize, Term) {
    for _ in 0..MAX_POLLS {
        for (i, n) in r.nodes.iter().enumerate() {
            let st = n.handle.status().await.expect("node alive");
            if st.role == Role::Leader {
                return (i, st.term);
            }
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("no leader within the liveness bound");
}

async fn commit(r: &Running, data: Vec<u8>) {
    for _ in 0..MAX_POLLS {
        let (l, _) = leader(r).await;
        let wait = r.nodes[l].handle.propose_and_wait(data.clone());
        match tokio::time::timeout(Duration::from_secs(2), wait).await {
            Ok(Ok(_)) => return,
            Ok(Err(ProposeError::Stopped)) => panic!("node stopped"),
            _ => tokio::time::sleep(POLL).await,
        }
    }
    panic!("proposal never committed");
}

async fn converged(r: &Running, count: u64) {
    for _ in 0..MAX_POLLS {
        let states: Vec<_> = r.sms.iter().map(|s| s.get()).collect();
        if states.iter().all(|s| s.count == count) {
            assert!(
                states.windows(2).all(|w| w[0].hash == w[1].hash),
                "applied logs diverge"
            );
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("nodes did not converge on {count} applied commands");
}

fn forged(to: u64, leader_term: Term) -> Vec<Message> {
    let far = LogIndex(u64::MAX - 1);
    let stale = Term(leader_term.0.saturating_sub(1));
    let msg = |from: u64, to: u64, term: Term, body: MessageBody| Message {
        from: NodeId(from),
        to: NodeId(to),
        term,
        body,
    };
    let entry = |index: u64, term: Term| Entry {
        term,
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: b"forged".to_vec(),
    };
    vec![
        // Claims to come from another node than the connection proved.
        msg(1, to, Term(leader_term.0 + 50), MessageBody::TimeoutNow),
        // Addressed to someone else.
        msg(4, 9, leader_term, MessageBody::TimeoutNow),
        // Stale term, impossible indices.
        msg(
            4,
            to,
            stale,
            MessageBody::AppendEntries {
                prev_log_index: far,
                prev_log_term: stale,
                entries: vec![entry(u64::MAX, stale), entry(3, stale)],
                leader_commit: far,
            },
        ),
        msg(
            4,
            to,
            stale,
            MessageBody::Heartbeat {
                commit: far,
                read_context: Some(vec![1; 3]),
            },
        ),
        msg(
            4,
            to,
            stale,
            MessageBody::InstallSnapshot {
                snapshot: Snapshot {
                    meta: SnapshotMeta {
                        index: far,
                        term: stale,
                        voters: vec![NodeId(4)],
                        ..Default::default()
                    },
                    data: vec![0xff; 16],
                },
            },
        ),
        msg(
            4,
            to,
            Term(0),
            MessageBody::RequestVoteResponse {
                pre_vote: false,
                granted: true,
            },
        ),
        // Responses at the current term naming indices no log has.
        msg(
            4,
            to,
            leader_term,
            MessageBody::AppendEntriesResponse {
                index: far,
                reject: None,
            },
        ),
        msg(
            4,
            to,
            leader_term,
            MessageBody::AppendEntriesResponse {
                index: far,
                reject: Some(RejectHint {
                    conflict_term: Some(Term(u64::MAX)),
                    conflict_index: far,
                }),
            },
        ),
        msg(
            4,
            to,
            leader_term,
            MessageBody::AppendEntriesResponse {
                index: LogIndex(0),
                reject: Some(RejectHint {
                    conflict_term: None,
                    conflict_index: LogIndex(0),
                }),
            },
        ),
        msg(
            4,
            to,
            leader_term,
            MessageBody::HeartbeatResponse {
                read_context: Some(vec![9; 40]),
            },
        ),
        msg(
            4,
            to,
            leader_term,
            MessageBody::ReadIndexResponse {
                context: vec![7; 8],
                index: far,
            },
        ),
        msg(
            4,
            to,
            leader_term,
            MessageBody::ReadIndex { context: vec![] },
        ),
        // A vote request with an absurd log, at a stale term.
        msg(
            4,
            to,
            stale,
            MessageBody::RequestVote {
                pre_vote: false,
                last_log_index: far,
                last_log_term: Term(u64::MAX),
                leadership_transfer: false,
            },
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_impossible_messages_do_no_harm() {
    let (r, impostor, _peers) = start().await;
    for k in 0..10u32 {
        commit(&r, format!("before-{k}").into_bytes()).await;
    }
    converged(&r, 10).await;

    for round in 0..3 {
        let (_, term) = leader(&r).await;
        for to in 1..=3u64 {
            for m in forged(to, term) {
                impostor.send(to, m).unwrap();
            }
        }
        commit(&r, format!("during-{round}").into_bytes()).await;
    }
    // Every forged frame reached the nodes (the impostor's writer sent them all).
    let forged_count = 3 * 3 * forged(1, Term(1)).len() as u64;
    let mut polls = 0;
    while TransportStats::get(&impostor.stats().frames_sent) < forged_count {
        polls += 1;
        assert!(polls < MAX_POLLS, "forged messages were not sent");
        tokio::time::sleep(POLL).await;
    }
    for k in 0..10u32 {
        commit(&r, format!("after-{k}").into_bytes()).await;
    }
    converged(&r, 23).await;
    for n in &r.nodes {
        n.handle.status().await.expect("every node still running");
    }
    // Linearizable read points, on the leader and (forwarded) on followers: each covers
    // everything committed before it and is already applied where it is answered.
    let committed = r.sms[0].get().last_index;
    for (i, n) in r.nodes.iter().enumerate() {
        let mut answered = None;
        for _ in 0..MAX_POLLS {
            match tokio::time::timeout(Duration::from_secs(2), n.handle.read_index()).await {
                Ok(Ok(index)) => {
                    answered = Some(index);
                    break;
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
        let index = answered.expect("read index answered");
        assert!(
            index.0 >= committed,
            "node {i}: read index {index} below commit {committed}"
        );
        assert!(r.sms[i].get().last_index >= committed);
    }
    // Clean shutdown.
    for mut n in r.nodes {
        n.handle.shutdown().await;
        tokio::time::timeout(Duration::from_secs(10), n.wait())
            .await
            .expect("node stops")
            .expect("node stops without error");
    }
}
