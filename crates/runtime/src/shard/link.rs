//! Connections from the sharded KV's clients (the routing client and the controller) to
//! servers: one lazily opened TCP connection per server address, shared by every client of a
//! [`Links`], each answer handed to the client waiting for the ids it echoes.
//!
//! The KV client's pool (`crate::kv::ClientPool`) routes an answer by the client id it echoes,
//! which is enough there: a KV session id is unique in its cluster. Here it is not: a group
//! numbers sessions per shard (a session id is the shard store's apply index), so two clients
//! of one pool can hold the same session id on two shards of one group. Answers are therefore
//! routed by the (client, request) pair they echo, which the sender registers before sending
//! ([`Links::send`]); the routing client starts its request ids at a random point
//! (`ShardClerkConfig::first_request`), so two clients of one pool do not send the same pair.
//! A misrouted answer would only cost a resend: the sans-IO clients check the ids of every
//! answer and ignore the ones they are not waiting for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use shoal_wire::codec::{CodecError, PartCodec};
use shoal_wire::kv::{KvReply, KvRequest};
use shoal_wire::parts::InParts;
use shoal_wire::shard::{FromGroup, ToGroup};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::debug;

use crate::tls::Security;
use crate::transport::{connect_client_secure, send_queued, TransportError};

/// What a connection reports to the clients of its [`Links`].
#[derive(Debug)]
pub(crate) enum Event<Rep> {
    /// An answer from the server at this address.
    Reply(SocketAddr, Rep),
    /// The connection to this address failed (or never opened), and why, for a person.
    Lost(SocketAddr, String),
}

/// The key an answer is routed by: what the request it answers carried.
pub(crate) trait Routed {
    /// The route key.
    type Key: Copy + Ord + Send + 'static;
    /// The key of this message.
    fn route(&self) -> Self::Key;
}

impl Routed for KvRequest {
    type Key = (u64, u64);
    fn route(&self) -> (u64, u64) {
        (self.client, self.request)
    }
}

impl Routed for KvReply {
    type Key = (u64, u64);
    fn route(&self) -> (u64, u64) {
        self.ids()
    }
}

/// The request side of the group protocol: a client's request by its (client, request) ids,
/// a controller's by (`CONTROL`, tag).
impl Routed for ToGroup {
    type Key = (u64, u64);
    fn route(&self) -> (u64, u64) {
        match self {
            ToGroup::Request(r) => (r.client, r.request),
            ToGroup::Control(c) => (CONTROL, c.tag),
            // Never routed: the codec takes large messages apart and puts them together.
            ToGroup::Part { .. } => (CONTROL, u64::MAX),
        }
    }
}

impl Routed for FromGroup {
    type Key = (u64, u64);
    fn route(&self) -> (u64, u64) {
        match self {
            FromGroup::Reply(r) => r.ids(),
            FromGroup::Control(c) => (CONTROL, c.tag()),
            // Never routed (see `ToGroup`'s).
            FromGroup::Part { .. } => (CONTROL, u64::MAX),
        }
    }
}

/// The "client id" of a controller's control requests in a route key (a client's ids are
/// odd random numbers or small session ids, never this).
pub(crate) const CONTROL: u64 = u64::MAX;

/// Settings of the connections.
#[derive(Debug, Clone)]
pub(crate) struct LinkConfig {
    pub cluster_id: u64,
    pub max_frame_bytes: usize,
    /// Largest message, sent or accepted in parts when larger than a frame (only messages
    /// with a part variant: the group protocol's; a KV message must fit in a frame).
    pub max_message_bytes: usize,
    pub connect_timeout: Duration,
    /// Requests queued per connection before new ones are dropped (the clients resend).
    pub queue_len: usize,
    /// Plain TCP or TLS.
    pub security: Security,
}

type Routes<K, Rep> = Arc<Mutex<BTreeMap<K, mpsc::Sender<Event<Rep>>>>>;

/// Connections to servers speaking `Req` → `Rep`, shared by many clients.
pub(crate) struct Links<Req: Routed, Rep: Routed<Key = Req::Key>> {
    config: LinkConfig,
    connections: Arc<Mutex<BTreeMap<SocketAddr, mpsc::Sender<Req>>>>,
    routes: Routes<Req::Key, Rep>,
    /// Every answer and failure goes here, whatever it echoes (a controller's own links).
    catch_all: Option<mpsc::Sender<Event<Rep>>>,
}

impl<Req: Routed, Rep: Routed<Key = Req::Key>> Clone for Links<Req, Rep> {
    fn clone(&self) -> Self {
        Links {
            config: self.config.clone(),
            connections: Arc::clone(&self.connections),
            routes: Arc::clone(&self.routes),
            catch_all: self.catch_all.clone(),
        }
    }
}

impl<Req, Rep> Links<Req, Rep>
where
    Req: Routed + Serialize + InParts + Send + 'static,
    Rep: Routed<Key = Req::Key> + DeserializeOwned + InParts + Send + 'static,
{
    /// Links routing each answer to whoever registered the ids it echoes.
    pub fn new(config: LinkConfig) -> Self {
        Links {
            config,
            connections: Arc::default(),
            routes: Arc::default(),
            catch_all: None,
        }
    }

    /// Links delivering every answer and failure to `to`.
    pub fn to_one(config: LinkConfig, to: mpsc::Sender<Event<Rep>>) -> Self {
        Links {
            catch_all: Some(to),
            ..Links::new(config)
        }
    }

    /// Sends `request` to `addr` (connecting if needed), its answer to go to `reply_to`
    /// (ignored by catch-all links). Never waits: a full queue drops the request, as a
    /// network would, and the sender's retry timer resends it.
    pub fn send(&self, addr: SocketAddr, request: Req, reply_to: &mpsc::Sender<Event<Rep>>) {
        if self.catch_all.is_none() {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            routes.insert(request.route(), reply_to.clone());
        }
        let _ = self.sender(addr).try_send(request);
    }

    /// Forgets the routes of these keys (the operation that sent them is over).
    pub fn unroute(&self, keys: impl IntoIterator<Item = Req::Key>) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            routes.remove(&k);
        }
    }

    fn sender(&self, addr: SocketAddr) -> mpsc::Sender<Req> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        match connections.get(&addr) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(self.config.queue_len);
                tokio::spawn(connection(
                    addr,
                    self.config.clone(),
                    rx,
                    Arc::clone(&self.routes),
                    self.catch_all.clone(),
                ));
                connections.insert(addr, tx.clone());
                tx
            }
        }
    }
}

/// One connection: connects, writes the queued requests in batches, hands each answer to the
/// client routed for it; when it fails, tells every client of the links (each ignores a
/// failure of a server it is not waiting for). It is replaced on the next send.
async fn connection<Req, Rep>(
    addr: SocketAddr,
    config: LinkConfig,
    mut requests: mpsc::Receiver<Req>,
    routes: Routes<Req::Key, Rep>,
    catch_all: Option<mpsc::Sender<Event<Rep>>>,
) where
    Req: Routed + Serialize + InParts + Send + 'static,
    Rep: Routed<Key = Req::Key> + DeserializeOwned + InParts + Send + 'static,
{
    let why = run(addr, config, &mut requests, |reply: Rep| {
        let to = match &catch_all {
            Some(to) => Some(to.clone()),
            None => {
                let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                routes.get(&reply.route()).cloned()
            }
        };
        // A client that is gone or does not read: the answer is lost (it resends).
        if let Some(to) = to {
            let _ = to.try_send(Event::Reply(addr, reply));
        }
    })
    .await;
    debug!(%addr, %why, "connection ended");
    // Close the queue before telling anyone, so that a resend opens a new connection.
    requests.close();
    let mut told: Vec<mpsc::Sender<Event<Rep>>> = Vec::new();
    let all: Vec<mpsc::Sender<Event<Rep>>> = match &catch_all {
        Some(to) => vec![to.clone()],
        None => {
            let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
            routes.values().cloned().collect()
        }
    };
    for c in all {
        if !told.iter().any(|t| t.same_channel(&c)) {
            let _ = c.try_send(Event::Lost(addr, why.clone()));
            told.push(c);
        }
    }
}

/// Runs one connection until it fails; returns why, for a person.
async fn run<Req, Rep>(
    addr: SocketAddr,
    config: LinkConfig,
    requests: &mut mpsc::Receiver<Req>,
    mut deliver: impl FnMut(Rep),
) -> String
where
    Req: Serialize + InParts,
    Rep: DeserializeOwned + InParts,
{
    let framed = match connect_client_secure::<Rep, Req>(
        &config.security,
        addr,
        config.cluster_id,
        config.max_frame_bytes,
        config.connect_timeout,
    )
    .await
    {
        Ok(f) => f,
        Err(TransportError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            return "connection refused".into()
        }
        Err(TransportError::Connect { source, .. }) => return source.to_string(),
        Err(e) => return e.to_string(),
    };
    // The hello went straight to the socket: nothing is buffered in `framed`. Messages larger
    // than a frame (a shard's Install, its Export answer) travel in parts.
    let (read, write) = tokio::io::split(framed.into_inner());
    let codec = || PartCodec::<Rep, Req>::new(config.max_frame_bytes, config.max_message_bytes);
    let mut stream = FramedRead::new(read, codec());
    let mut sink = FramedWrite::new(write, codec());
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                Some(request) => {
                    if let Err(e) = send_queued(&mut sink, request, requests).await {
                        return format!("connection lost: {e}");
                    }
                }
                None => return "connection no longer needed".into(),
            },
            frame = stream.next() => match frame {
                Some(Ok(reply)) => deliver(reply),
                Some(Err(e @ CodecError::Parts(_))) => return format!("bad answer: {e}"),
                // A refusal (another cluster) or another protocol does not decode as an
                // answer: the server is of no use to this client.
                Some(Err(e)) => return format!("bad answer ({e}): another cluster, or not a server of this kind?"),
                None => return "connection closed".into(),
            },
        }
    }
}

/// The timers a sans-IO machine asked for (`SetTimer { after, token }`), for a driver loop that
/// waits on [`Timers::next_due`] beside its sockets and then fires [`Timers::take_due`]. Stale
/// tokens are the machine's to ignore, so a timer is never cancelled.
#[derive(Debug, Default)]
pub(crate) struct Timers(std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u64)>>);

impl Timers {
    /// Fires `token` after `after`.
    pub fn set(&mut self, after: Duration, token: u64) {
        self.0
            .push(std::cmp::Reverse((Instant::now() + after, token)));
    }

    /// Resolves when the earliest timer is due; never while there is none.
    pub fn next_due(&self) -> impl std::future::Future<Output = ()> + 'static {
        let at = self.0.peek().map(|std::cmp::Reverse((at, _))| *at);
        async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        }
    }

    /// The tokens of every timer due now, earliest first, removed.
    pub fn take_due(&mut self) -> Vec<u64> {
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(&std::cmp::Reverse((at, token))) = self.0.peek() {
            if at > now {
                break;
            }
            self.0.pop();
            due.push(token);
        }
        due
    }
}
