//! `NodeHandle::conf_change` on a real node: answered with the membership once committed;
//! Raft's refusals passed through typed.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_raft::{ConfChangeStep, NodeId, Role};
use shoal_runtime::demo::DemoStateMachine;
use shoal_runtime::{Node, NodeConfig, ProposeError};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn conf_change_answers_once_committed_and_passes_refusals_through() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peers = BTreeMap::from([(1, l.local_addr().unwrap())]);
    let dir = tempfile::tempdir().unwrap();
    let mut c = NodeConfig::new(NodeId(1), 5, peers, dir.path().join("n1"));
    c.tick_interval = Duration::from_millis(10);
    let node = Node::start(c, l, DemoStateMachine::default())
        .await
        .unwrap();
    let h = node.handle.clone();
    tokio::time::timeout(WAIT, async {
        while h.status().await.unwrap().role != Role::Leader {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The leader's own-term entry commits first; until then a change is in flight.
        h.propose_and_wait(vec![1]).await.unwrap();
    })
    .await
    .expect("a leader within the bound");
    let m = tokio::time::timeout(
        WAIT,
        h.conf_change(vec![ConfChangeStep::AddLearner(NodeId(2))]),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_eq!(m.learners, vec![NodeId(2)]);
    assert_eq!(h.status().await.unwrap().membership, m);
    let refused = h.conf_change(vec![ConfChangeStep::Remove(NodeId(1))]).await;
    assert!(
        matches!(
            refused,
            Err(ProposeError::ConfChange(
                shoal_raft::Error::InvalidConfChange(_)
            ))
        ),
        "{refused:?}"
    );
    let m = tokio::time::timeout(WAIT, h.conf_change(vec![ConfChangeStep::Remove(NodeId(2))]))
        .await
        .expect("answered")
        .unwrap();
    assert!(m.learners.is_empty() && m.voters == vec![NodeId(1)], "{m}");
}
