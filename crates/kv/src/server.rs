//! The single-server service (the classic lab's kvsrv): one [`KvStore`], no Raft. Every
//! request is answered at once. Sessions follow the store's rule: `register` opens one (its id
//! is the server's apply counter), a write from an unknown or expired session is refused with
//! `SessionExpired` and never applied.

use shoal_wire::kv::{KvOp, KvReply, KvRequest, KvResult, ServerRole, ServerStatus};

use crate::store::{KvStore, Limits};

/// A single KV server, sans-IO: hand it a request, send back the reply.
#[derive(Debug, Clone)]
pub struct SingleServer {
    store: KvStore,
    next_index: u64,
}

impl SingleServer {
    /// A server with an empty store.
    pub fn new(limits: Limits) -> SingleServer {
        SingleServer {
            store: KvStore::new(limits),
            next_index: 1,
        }
    }

    /// The state machine, for inspection.
    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// Serves one request.
    pub fn handle(&mut self, req: &KvRequest) -> KvReply {
        let result = if req.op == KvOp::Status {
            // One server: always the leader of its own term 1, everything applied at once.
            let last = self.next_index.saturating_sub(1);
            KvResult::Status(ServerStatus {
                id: 1,
                role: ServerRole::Leader,
                term: 1,
                leader: Some(1),
                commit: last,
                applied: last,
                last_index: last,
            })
        } else if req.op.is_internal() {
            // Lease expiry and checkpoints come from a replicated leader's clock only; this
            // server has none (its leases end when revoked).
            KvResult::Refused {
                reason: "lease expiry and checkpoints are proposed by the leader only".into(),
            }
        } else if req.op.is_read() {
            match self.store.read(&req.op) {
                Ok(r) => r,
                Err(_) => KvResult::Stale,
            }
        } else {
            let index = self.next_index;
            self.next_index += 1;
            self.store.apply(index, req)
        };
        KvReply::Done {
            client: req.client,
            request: req.request,
            result,
        }
    }
}
