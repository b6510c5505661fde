//! `shoal shard server` as real processes: a group of three on 127.0.0.1 adopts a
//! configuration (sent by hand, as the controller will), serves puts and gets, keeps serving
//! with one server SIGKILLed, logs the adoption, and a server restarted on its directory with
//! another --gid is refused with a message naming the group file.

mod kv_support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kv_support::{free_ports, wait_listening, SHOAL, WAIT};
use shoal_cluster::{Procs, Spec};
use shoal_shard::{join, shard_of, Config};
use shoal_wire::kv::{Expected, KvOp, KvResult};
use shoal_wire::shard::{
    ControlOp, ControlReply, ControlRequest, ControlStatus, FromGroup, ShardReply, ShardRequest,
    ToGroup,
};
use shoal_wire::{decode_frame, encode_frame, Hello, Role};

const SHARDS: u32 = 8;
const GID: u64 = 1;

struct Group {
    dir: tempfile::TempDir,
    addrs: Vec<String>,
    procs: Procs,
}

impl Group {
    fn args(&self, id: u64, gid: u64) -> Vec<String> {
        let mut a: Vec<String> = [
            "shard",
            "server",
            "--gid",
            &gid.to_string(),
            "--id",
            &id.to_string(),
        ]
        .map(String::from)
        .to_vec();
        a.extend(["--listen".into(), self.addrs[id as usize - 1].clone()]);
        a.extend(["--peers".into(), self.addrs.join(",")]);
        a.extend(["--shards".into(), SHARDS.to_string()]);
        a.extend(["--tick-ms".into(), "10".into()]);
        a.extend(["--data".into(), self.data(id)]);
        a
    }

    fn data(&self, id: u64) -> String {
        self.dir.path().join(format!("n{id}")).display().to_string()
    }

    fn log(&self, id: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("n{id}.log"))
    }

    fn start(&mut self, id: u64) {
        let spec = Spec::new(format!("server {id}"), SHOAL, self.log(id))
            .args(self.args(id, GID))
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .append_log()
            .stdout_null();
        self.procs
            .spawn_at(id as usize - 1, spec)
            .expect("start a server");
        wait_listening(&self.addrs[id as usize - 1]);
    }

    /// Sends `message` to each running server in turn until one that is not a follower
    /// answers.
    #[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
    fn ask(&self, message: &ToGroup) -> FromGroup {
        let start = std::time::Instant::now();
        loop {
            for addr in &self.addrs {
                if let Ok(reply) = call(addr, message) {
                    // A leader just elected may not have applied the adoption yet: it
                    // answers WrongGroup at configuration 0, and the routing client retries.
                    if !matches!(
                        reply,
                        FromGroup::Reply(ShardReply::WrongLeader { .. })
                            | FromGroup::Reply(ShardReply::WrongGroup { config: 0, .. })
                            | FromGroup::Control(ControlReply::NotLeader { .. })
                    ) {
                        return reply;
                    }
                }
            }
            assert!(start.elapsed() < WAIT, "no leader answered within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn request(&self, client: u64, request: u64, shard: u32, op: KvOp) -> KvResult {
        let req = ToGroup::Request(ShardRequest {
            client,
            request,
            shard,
            config: 1,
            op,
            serializable: false,
        });
        match self.ask(&req) {
            FromGroup::Reply(ShardReply::Done { result, .. }) => result,
            other => panic!("answered {other:?}"),
        }
    }
}

/// One request on a fresh connection, one reply (blocking, bounded by timeouts).
fn call(addr: &str, message: &ToGroup) -> Result<FromGroup, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    encode_frame(&Hello::new(Role::Client, 1), 64, &mut out).map_err(|e| e.to_string())?;
    encode_frame(message, 1 << 20, &mut out).map_err(|e| e.to_string())?;
    s.write_all(&out).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((reply, _)) =
            decode_frame::<FromGroup>(&buf, 1 << 20).map_err(|e| e.to_string())?
        {
            return Ok(reply);
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_group_of_three_processes_serves_survives_a_kill_and_refuses_another_gid() {
    let ports = free_ports(3);
    let mut g = Group {
        dir: tempfile::tempdir().expect("temp dir"),
        addrs: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        procs: Procs::with_slots(3),
    };
    for id in 1..=3 {
        g.start(id);
    }
    let c1 = join(
        &Config::empty(SHARDS).expect("config 0"),
        &BTreeMap::from([(GID, g.addrs.clone())]),
    )
    .expect("config 1");
    let adopt = ToGroup::Control(ControlRequest {
        tag: 1,
        gid: GID,
        op: ControlOp::Adopt {
            config: c1.encode(),
        },
    });
    match g.ask(&adopt) {
        FromGroup::Control(ControlReply::Done {
            status: ControlStatus::Applied,
            adopted: 1,
            ..
        }) => {}
        other => panic!("adopt answered {other:?}"),
    }
    // A request naming another gid changes nothing.
    let wrong = ToGroup::Control(ControlRequest {
        tag: 2,
        gid: 9,
        op: ControlOp::Adopted,
    });
    assert!(matches!(
        call(&g.addrs[0], &wrong),
        Ok(FromGroup::Control(ControlReply::WrongGid {
            tag: 2,
            gid: GID
        }))
    ));

    let shard = shard_of(b"greeting", SHARDS);
    let session = match g.request(5, 1, shard, KvOp::Register) {
        KvResult::Registered { session } => session,
        other => panic!("register answered {other:?}"),
    };
    let put = |value: &[u8]| KvOp::Put {
        key: b"greeting".to_vec(),
        value: value.to_vec(),
        expected: Expected::Any,
    };
    assert_eq!(
        g.request(session, 1, shard, put(b"hello")),
        KvResult::Written { version: 1 }
    );
    let get = KvOp::Get {
        key: b"greeting".to_vec(),
    };
    assert_eq!(
        g.request(6, 2, shard, get.clone()),
        KvResult::Found {
            value: b"hello".to_vec(),
            version: 1
        }
    );

    // One server of three SIGKILLed: the group still writes and reads.
    g.procs.kill(0);
    assert_eq!(
        g.request(session, 2, shard, put(b"bye")),
        KvResult::Written { version: 2 }
    );
    assert_eq!(
        g.request(6, 3, shard, get.clone()),
        KvResult::Found {
            value: b"bye".to_vec(),
            version: 2
        }
    );
    // The adoption was logged by the leader that decided it.
    let logged = (1..=3).any(|id| log_text(&g.log(id)).contains("configuration adoption decided"));
    assert!(logged, "no server logged the adoption");

    // Server 1's directory started as another group: refused, naming the group file.
    let out = Command::new(SHOAL)
        .args(g.args(1, 2))
        .stdout(Stdio::null())
        .output()
        .expect("run shoal");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("shard-group says gid 1") && err.contains("started as gid 2"),
        "{err}"
    );
    // Restarted as itself, it catches up and serves the latest value when it leads or not:
    // a serializable read at it sees the write made while it was down.
    g.start(1);
    let local = ToGroup::Request(ShardRequest {
        client: 6,
        request: 4,
        shard,
        config: 1,
        op: get,
        serializable: true,
    });
    wait_for(|| {
        matches!(
            call(&g.addrs[0], &local),
            Ok(FromGroup::Reply(ShardReply::Done {
                result: KvResult::Found { version: 2, .. },
                ..
            }))
        )
    });
}

/// Waits until `done` holds; fails the test after [`WAIT`].
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn wait_for(mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < WAIT,
            "server 1 did not catch up within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
