//! The KV client commands on real processes: how they find a cluster (--endpoints, host
//! names, SHOAL_ENDPOINTS, --dir), values as bytes (stdin, --file, non-UTF-8), the shell's
//! quoted form and its scan/status/help, and scans longer than the servers' cap.

mod kv_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};

use kv_support::{Cluster, SHOAL};

/// `shoal kv ARGS` with `--timeout 20`, from `cwd`, with `env` set (and SHOAL_ENDPOINTS unset
/// unless `env` sets it), feeding `stdin`.
fn kv(
    cwd: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&std::ffi::OsStr],
    stdin: &[u8],
) -> Output {
    let mut cmd = Command::new(SHOAL);
    cmd.current_dir(cwd)
        .env_remove("SHOAL_ENDPOINTS")
        .args(["kv", "--timeout", "20"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run shoal kv");
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().expect("wait for shoal kv");
    writer.join().expect("stdin writer");
    out
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(Into::into).collect()
}

fn refs(args: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    args.iter().map(|a| a.as_os_str()).collect()
}

fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deterministic pseudo-random byte string (every byte value occurs).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn clients_find_the_cluster_by_host_name_env_and_dir() {
    // A one-server cluster listening on a host name, not an IP.
    let port = kv_support::free_ports(1)[0];
    let addr = format!("localhost:{port}");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Command::new(SHOAL)
        .args(["kv", "server", "--id", "1", "--listen", &addr])
        .args(["--peers", &format!("1={addr}"), "--data"])
        .arg(dir.path().join("node1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a server");
    let cwd = tempfile::tempdir().expect("an empty working directory");
    let put = kv(
        cwd.path(),
        &[],
        &refs(&os(&["--endpoints", &addr, "put", "k", "by-name"])),
        b"",
    );
    assert_eq!(assert_ok(&put), "ok 1\n");

    // SHOAL_ENDPOINTS, as etcdctl's ETCDCTL_ENDPOINTS.
    let get = kv(
        cwd.path(),
        &[("SHOAL_ENDPOINTS", &addr)],
        &refs(&os(&["get", "k"])),
        b"",
    );
    assert_eq!(assert_ok(&get), "by-name\n");

    // --dir of a `kv up` cluster: DIR/endpoints (here written by hand, with a host name).
    std::fs::write(dir.path().join("endpoints"), format!("{addr}\n")).expect("endpoints");
    let dir_arg = dir.path().to_string_lossy().into_owned();
    let get = kv(
        cwd.path(),
        &[],
        &refs(&os(&["--dir", &dir_arg, "get", "k"])),
        b"",
    );
    assert_eq!(assert_ok(&get), "by-name\n");
    // SHOAL_ENDPOINTS comes before --dir.
    let get = kv(
        cwd.path(),
        &[("SHOAL_ENDPOINTS", &addr)],
        &refs(&os(&["--dir", "/nonexistent-shoal-dir", "get", "k"])),
        b"",
    );
    assert_eq!(assert_ok(&get), "by-name\n");

    // Nothing given and no ./shoal-data: the error names all three ways.
    let none = kv(cwd.path(), &[], &refs(&os(&["get", "k"])), b"");
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    for way in ["--endpoints", "SHOAL_ENDPOINTS", "--dir"] {
        assert!(err.contains(way), "{way} not named in: {err}");
    }
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn values_are_bytes_from_stdin_files_and_arguments() {
    let c = Cluster::start(1);
    let cwd = tempfile::tempdir().expect("temp dir");
    let ep = c.endpoints();
    let with = |args: &[&str]| {
        let mut v = os(&["--endpoints", &ep]);
        v.extend(os(args));
        v
    };
    // 300 KiB of every byte value, through stdin, back byte-exact with --raw.
    let blob = noise(300 * 1024);
    let put = kv(cwd.path(), &[], &refs(&with(&["put", "blob", "-"])), &blob);
    assert_eq!(assert_ok(&put), "ok 1\n");
    let get = kv(
        cwd.path(),
        &[],
        &refs(&with(&["get", "blob", "--raw"])),
        b"",
    );
    assert_ok(&get);
    assert!(
        get.stdout == blob,
        "the value read back differs from the one stored"
    );

    // --file, and a file over the 1 MiB limit is refused with a clear error.
    let file = cwd.path().join("small.bin");
    std::fs::write(&file, &blob[..1000]).expect("write");
    let f = file.to_string_lossy().into_owned();
    assert_eq!(
        assert_ok(&kv(
            cwd.path(),
            &[],
            &refs(&with(&["put", "small", "--file", &f])),
            b""
        )),
        "ok 1\n"
    );
    let get = kv(
        cwd.path(),
        &[],
        &refs(&with(&["get", "small", "--raw"])),
        b"",
    );
    assert_eq!(get.stdout, &blob[..1000]);
    let big = cwd.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 1024 * 1024 + 1]).expect("write");
    let b = big.to_string_lossy().into_owned();
    let over = kv(
        cwd.path(),
        &[],
        &refs(&with(&["put", "big", "--file", &b])),
        b"",
    );
    assert!(!over.status.success());
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(err.contains("exceeds the limit"), "{err}");

    // Non-UTF-8 key and value as arguments; scan quotes them.
    let key = std::ffi::OsStr::from_bytes(b"k\xff y").to_os_string();
    let value = std::ffi::OsStr::from_bytes(b"v\xfe\n").to_os_string();
    let mut args = with(&["put"]);
    args.push(key.clone());
    args.push(value);
    assert_eq!(assert_ok(&kv(cwd.path(), &[], &refs(&args), b"")), "ok 1\n");
    let mut args = with(&["get", "--raw"]);
    args.push(key);
    assert_eq!(kv(cwd.path(), &[], &refs(&args), b"").stdout, b"v\xfe\n");
    let scan = assert_ok(&kv(cwd.path(), &[], &refs(&with(&["scan", "k", "l"])), b""));
    assert_eq!(scan, "\"k\\xff y\" 1 \"v\\xfe\\n\"\n");
}

#[test]
fn shell_quotes_keys_and_values_and_has_scan_status_help() {
    let c = Cluster::start(1);
    let mut sh = c.shell("20");
    // The answers for plain values are as they always were; two spaces are fine.
    assert_eq!(sh.ask("put  k any hello world"), "ok 1");
    assert_eq!(sh.ask("get k"), "value 1 hello world");
    // A key with a space, a value with a newline and a 0xff byte.
    assert_eq!(sh.ask(r#"put "a key" 0 "line1\nline2\xff""#), "ok 1");
    assert_eq!(sh.ask(r#"get "a key""#), r#"value 1 "line1\nline2\xff""#);
    assert!(sh.ask(r#"get "unterminated"#).starts_with("error "));
    // scan: a count line, then one line per key, quoted where needed.
    assert_eq!(sh.ask("scan"), "scanned 2");
    assert_eq!(sh.read_line(), r#""a key" 1 "line1\nline2\xff""#);
    assert_eq!(sh.read_line(), "k 1 hello world");
    assert_eq!(sh.ask("scan k"), "scanned 1");
    assert_eq!(sh.read_line(), "k 1 hello world");
    assert_eq!(sh.ask("scan 1"), "scanned 1");
    assert_eq!(sh.read_line(), r#""a key" 1 "line1\nline2\xff""#);
    // status and help.
    assert_eq!(sh.ask("status"), "servers 1");
    let line = sh.read_line();
    assert!(
        line.starts_with("1 127.0.0.1:") && line.contains(" leader "),
        "{line}"
    );
    let help = sh.ask("help");
    let n: usize = help
        .strip_prefix("help ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{help}"));
    let text: Vec<String> = (0..n).map(|_| sh.read_line()).collect();
    assert!(text
        .iter()
        .any(|l| l.contains("scan [START [END]] [LIMIT]")));
    // Still one answer per line afterwards.
    assert_eq!(sh.ask("del k 1"), "deleted");
}

#[test]
fn scan_pages_through_the_servers_cap() {
    let c = Cluster::start(1);
    // 1,200 keys through one shell, all lines written first, then the answers read.
    let mut child = Command::new(SHOAL)
        .args([
            "kv",
            "--endpoints",
            &c.endpoints(),
            "--timeout",
            "20",
            "shell",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a shell");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        for i in 0..1200 {
            writeln!(stdin, "put key{i:05} any v{i}").expect("write to the shell");
        }
    });
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    for line in stdout.lines().take(1200) {
        assert_eq!(line.expect("an answer"), "ok 1");
    }
    writer.join().expect("writer");
    let _ = child.kill();
    let _ = child.wait();

    let all = c.ok(&["scan", "--limit", "5000"]);
    assert_eq!(all.lines().count(), 1200);
    assert!(all.ends_with("key01199 1 v1199\n"));
    let some = c.ok(&["scan", "--limit", "1100"]);
    assert_eq!(some.lines().count(), 1100);
    assert!(some.ends_with("key01099 1 v1099\n"));
    assert_eq!(
        c.ok(&["scan", "key01150", "--limit", "5000"])
            .lines()
            .count(),
        50
    );
}
