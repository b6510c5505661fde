//! `shoal kv snapshot save|status|restore` on real processes: a backup of a running
//! three-server cluster, the cluster SIGKILLed and its directories deleted, three new
//! directories restored from the file, the servers started on them: every key is back with
//! its version, and the writes after the backup are not. Damaged and truncated files are
//! refused with a message naming what is wrong, and the target directory is left untouched.

mod kv_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use kv_support::{Cluster, SHOAL};

/// `shoal kv ARGS` (no cluster needed).
fn kv(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(SHOAL)
        .arg("kv")
        .args(args)
        .output()
        .expect("run shoal kv")
}

fn restore(file: &Path, data: &Path, id: u64, peers: &str) -> Output {
    kv(&[
        "snapshot".as_ref(),
        "restore".as_ref(),
        file.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--id".as_ref(),
        id.to_string().as_ref(),
        "--peers".as_ref(),
        peers.as_ref(),
    ])
}

/// `KEY VERSION VALUE` lines of `kv scan` (plain keys and values only).
fn parse_scan(text: &str) -> BTreeMap<String, (u64, String)> {
    text.lines()
        .map(|l| {
            let mut w = l.splitn(3, ' ');
            let key = w.next().expect("key").to_string();
            let version = w.next().expect("version").parse().expect("a version");
            (key, (version, w.next().unwrap_or("").to_string()))
        })
        .collect()
}

#[test]
fn save_destroy_restore_serves_every_key_with_its_version() {
    let mut c = Cluster::start(3);
    c.wait_leader();
    // 300 keys, a third of them written twice or three times, some deleted (servers snapshot
    // every 20 kB of log, so the backup comes from a store that was itself restored).
    let mut want = BTreeMap::new();
    let mut sh = c.shell("20");
    for i in 0..300u64 {
        let key = format!("key{i:03}");
        let mut version = 0;
        for round in 0..=(i % 3) {
            let value = format!("value-{i}-{round}");
            let answer = sh.ask(&format!("put {key} {version} {value}"));
            assert_eq!(answer, format!("ok {}", version + 1), "put {key}");
            version += 1;
            want.insert(key.clone(), (version, value));
        }
        if i % 10 == 9 {
            assert_eq!(sh.ask(&format!("del {key} {version}")), "deleted");
            want.remove(&key);
        }
    }
    let file = c.dir.path().join("backup.db");
    let saved = c.ok(&["snapshot", "save", file.to_str().expect("utf-8 path")]);
    assert!(saved.starts_with("saved "), "{saved}");
    assert!(
        saved.contains(&format!(", {} keys, ", want.len())),
        "{saved}"
    );
    // Written after the backup: must not come back.
    assert_eq!(sh.ask("put after-backup 0 x"), "ok 1");
    drop(sh);

    let status = kv(&[
        "snapshot".as_ref(),
        "status".as_ref(),
        file.as_os_str(),
        "-o".as_ref(),
        "json".as_ref(),
    ]);
    assert!(status.status.success(), "{status:?}");
    let json: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("one JSON document");
    assert_eq!(json["keys"].as_u64(), Some(want.len() as u64));
    assert_eq!(json["voters"], serde_json::json!([1, 2, 3]));
    assert!(json["index"].as_u64().expect("index") > 300);

    for id in 1..=3 {
        c.kill(id);
        std::fs::remove_dir_all(c.data_dir(id)).expect("delete a data directory");
    }
    for id in 1..=3 {
        let out = restore(&file, &c.data_dir(id), id, &c.peers());
        assert!(out.status.success(), "restore {id}: {out:?}");
    }
    for id in 1..=3 {
        c.restart(id);
    }
    c.wait_leader();
    let got = parse_scan(&c.ok(&["scan", "--limit", "5000"]));
    assert_eq!(got, want, "every key back with its value and version");
    assert_eq!(c.cli(&["get", "after-backup"]).status.code(), Some(1));
    // The new cluster takes writes, continuing each key's versions.
    assert_eq!(c.ok(&["put", "key000", "new", "--expect", "1"]), "ok 2\n");
    assert_eq!(c.ok(&["put", "fresh", "y"]), "ok 1\n");
}

#[test]
fn damaged_truncated_or_misdirected_backups_are_refused_and_write_nothing() {
    let c = Cluster::start(1);
    for i in 0..20 {
        c.ok(&["put", &format!("k{i}"), "some value"]);
    }
    let file = c.dir.path().join("backup.db");
    c.ok(&["snapshot", "save", file.to_str().expect("utf-8 path")]);
    let good = std::fs::read(&file).expect("the backup");
    assert!(good.starts_with(b"SHOALKVB"));
    let peers = "1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:3";
    let target = c.dir.path().join("restored");
    let leftovers = || {
        std::fs::read_dir(c.dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("restore"))
            .count()
    };

    // A flipped byte in the data: checksum mismatch.
    let flipped = c.dir.path().join("flipped.db");
    let mut bad = good.clone();
    let at = bad.len() - 10;
    bad[at] ^= 0x01;
    std::fs::write(&flipped, &bad).expect("write");
    let out = restore(&flipped, &target, 1, peers);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!target.exists() && leftovers() == 0, "nothing written");
    let status = kv(&["snapshot".as_ref(), "status".as_ref(), flipped.as_os_str()]);
    assert_eq!(status.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&status.stderr).contains("checksum mismatch"));

    // Truncated: the message says where the file ends and how long it should be.
    let truncated = c.dir.path().join("truncated.db");
    let cut = good.len() - 100;
    std::fs::write(&truncated, &good[..cut]).expect("write");
    std::fs::create_dir(&target).expect("an empty target");
    let out = restore(&truncated, &target, 2, peers);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains(&format!("truncated at byte {cut}"))
            && err.contains(&format!("{} bytes long", good.len())),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&target).expect("list").count(), 0);
    assert_eq!(leftovers(), 1, "only the empty target itself");

    // Not a backup at all.
    let out = restore(&c.log_path(1), &target, 1, peers);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad magic"),
        "{out:?}"
    );

    // A non-empty directory, and an id outside --peers, are refused before anything.
    std::fs::write(target.join("keep"), b"mine").expect("write");
    let out = restore(&file, &target, 1, peers);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not empty"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(target.join("keep")).expect("kept"), b"mine");
    let fresh = c.dir.path().join("fresh");
    let out = restore(&file, &fresh, 4, peers);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--id 4"),
        "{out:?}"
    );
    assert!(!fresh.exists());

    // Nothing listening: said at once (after the 2 s grace for a starting cluster), no file.
    let port = kv_support::free_ports(1)[0];
    let nowhere = c.dir.path().join("nowhere.db");
    let out = kv(&[
        "--endpoints".as_ref(),
        format!("127.0.0.1:{port}").as_ref(),
        "--timeout".as_ref(),
        "30".as_ref(),
        "snapshot".as_ref(),
        "save".as_ref(),
        nowhere.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is the cluster running?"),
        "{err}"
    );
    assert!(!nowhere.exists());

    // The good file restores into an empty directory.
    let out = restore(&file, &fresh, 3, peers);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("20 keys"),
        "{out:?}"
    );
}
