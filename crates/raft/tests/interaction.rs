//! Interaction scripts (in the style of etcd raft's `testdata/`): every file in
//! `crates/raft/testdata/*.txt` is a sequence of commands run against a small in-memory
//! cluster of `RawNode`s, each followed by the output it must produce. The network is a
//! queue the script drives by hand (`deliver-msgs`, `drop-msgs`, `stabilize`), so every
//! interleaving a script shows is exactly reproducible.
//!
//! Run one file: `SHOAL_SCRIPT=name cargo test -p shoal-raft --test interaction`. After a
//! deliberate change of behaviour, `SHOAL_REWRITE=1` rewrites the expected outputs in place
//! (review the diff before committing it).
//!
//! # Format
//!
//! A case is a command line, optional input lines, a `----` line, then the expected output
//! up to a blank line. Lines starting with `#` between cases are comments. Commands:
//!
//! - `add-nodes N [voters=(1,2,3)] [prevote=false] [checkquorum=false] [max-learner-lag=K]`:
//!   N new nodes with the next free ids; `voters=()` starts servers that join (they learn
//!   the membership from the log or a snapshot).
//! - `campaign ID`, `tick ID [n=K]`, `propose ID DATA`, `transfer-leader ID to=ID`.
//! - `propose-conf-change ID`, input one line of steps: `v4` add voter, `l4` add learner,
//!   `p4` promote, `r4` remove; an empty input leaves a joint configuration.
//! - `process-ready ID...`: carry out each node's pending `Ready` (printed).
//! - `deliver-msgs [ID...]`: deliver the queued messages addressed to these nodes (all if
//!   none); `drop-msgs [ID...]`: lose them.
//! - `stabilize [ID...]`: process Readies and deliver messages among these nodes (all if
//!   none) until nothing is left to do.
//! - `status ID`, `raft-log ID`, `snapshot ID` (compact the log at the applied index),
//!   `restart ID` (crash: keep only what was persisted; the state machine is durable up to
//!   what it applied).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use shoal_raft::{
    ConfChange, ConfChangeStep, Config, Entry, EntryKind, LogIndex, MemStorage, Membership,
    Message, MessageBody, NodeId, RawNode, Ready,
};

struct Node {
    raw: RawNode<MemStorage>,
    config: Config,
    /// Applied commands (the state machine, durable in this harness).
    applied: Vec<Vec<u8>>,
    /// The membership last printed for it.
    shown: Membership,
}

#[derive(Default)]
struct Env {
    nodes: BTreeMap<u64, Node>,
    queue: VecDeque<Message>,
}

fn ids_arg(v: &str) -> Result<Vec<u64>, String> {
    let inner = v
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or(v);
    inner
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| format!("bad id list {v:?}")))
        .collect()
}

fn fmt_entry(e: &Entry) -> String {
    let body = match e.kind {
        EntryKind::Normal => format!("{:?}", String::from_utf8_lossy(&e.data)),
        EntryKind::Noop => "noop".to_string(),
        EntryKind::ConfChange => match postcard::from_bytes::<ConfChange>(&e.data) {
            Ok(cc) if cc.steps.is_empty() => format!("leave-joint -> {}", cc.result),
            Ok(cc) => format!("{} -> {}", fmt_steps(&cc.steps), cc.result),
            Err(_) => "undecodable conf change".to_string(),
        },
    };
    format!("{}/{} {body}", e.term, e.index)
}

fn fmt_steps(steps: &[ConfChangeStep]) -> String {
    steps
        .iter()
        .map(|s| match s {
            ConfChangeStep::AddVoter(n) => format!("v{n}"),
            ConfChangeStep::AddLearner(n) => format!("l{n}"),
            ConfChangeStep::Promote(n) => format!("p{n}"),
            ConfChangeStep::Remove(n) => format!("r{n}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_msg(m: &Message) -> String {
    let body = match &m.body {
        MessageBody::RequestVote {
            pre_vote,
            last_log_index,
            last_log_term,
            leadership_transfer,
        } => format!(
            "{} last={last_log_term}/{last_log_index}{}",
            if *pre_vote { "PreVote" } else { "Vote" },
            if *leadership_transfer {
                " transfer"
            } else {
                ""
            }
        ),
        MessageBody::RequestVoteResponse { pre_vote, granted } => format!(
            "{}{}",
            if *pre_vote { "PreVoteResp" } else { "VoteResp" },
            if *granted { "" } else { " rejected" }
        ),
        MessageBody::AppendEntries {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
        } => {
            let es: Vec<String> = entries.iter().map(fmt_entry).collect();
            format!(
                "App prev={prev_log_term}/{prev_log_index} commit={leader_commit} [{}]",
                es.join(", ")
            )
        }
        MessageBody::AppendEntriesResponse { index, reject } => match reject {
            None => format!("AppResp index={index}"),
            Some(h) => format!(
                "AppResp rejected index={index} hint={:?}/{}",
                h.conflict_term.map(|t| t.0),
                h.conflict_index
            ),
        },
        MessageBody::Heartbeat { commit, .. } => format!("Heartbeat commit={commit}"),
        MessageBody::HeartbeatResponse { .. } => "HeartbeatResp".to_string(),
        MessageBody::InstallSnapshot { snapshot } => format!(
            "Snapshot index={} term={} {}",
            snapshot.meta.index,
            snapshot.meta.term,
            snapshot.meta.membership()
        ),
        MessageBody::TimeoutNow => "TimeoutNow".to_string(),
        MessageBody::ReadIndex { .. } => "ReadIndex".to_string(),
        MessageBody::ReadIndexResponse { index, .. } => format!("ReadIndexResp index={index}"),
    };
    format!("{}->{} term={} {body}", m.from, m.to, m.term)
}

impl Env {
    fn node(&mut self, id: u64) -> Result<&mut Node, String> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| format!("no node {id}"))
    }

    fn add_nodes(&mut self, args: &BTreeMap<String, String>, n: u64) -> Result<String, String> {
        let first = self.nodes.keys().last().map_or(1, |&k| k + 1);
        let voters: Vec<u64> = match args.get("voters") {
            Some(v) => ids_arg(v)?,
            None => (first..first + n).collect(),
        };
        let mut out = String::new();
        for id in first..first + n {
            let mut c = Config::new(NodeId(id), voters.iter().map(|&v| NodeId(v)).collect());
            c.pre_vote = args.get("prevote").is_none_or(|v| v == "true");
            c.check_quorum = args.get("checkquorum").is_none_or(|v| v == "true");
            if let Some(l) = args.get("max-learner-lag") {
                c.max_learner_lag_entries = l.parse().map_err(|_| "bad max-learner-lag")?;
            }
            let raw = RawNode::new(c.clone(), MemStorage::new()).map_err(|e| e.to_string())?;
            writeln!(out, "node {id}: {}", raw.membership()).unwrap();
            let shown = raw.membership().clone();
            self.nodes.insert(
                id,
                Node {
                    raw,
                    config: c,
                    applied: Vec::new(),
                    shown,
                },
            );
        }
        Ok(out)
    }

    /// Carries out one Ready of `id` (if any), in the documented order; prints it.
    fn process_ready(&mut self, id: u64, out: &mut String) -> bool {
        let node = self.nodes.get_mut(&id).expect("node exists");
        if !node.raw.has_ready() {
            return false;
        }
        let rd: Ready = node.raw.ready();
        writeln!(out, "> {id} handling Ready").unwrap();
        if let Some(ss) = rd.soft_state {
            writeln!(
                out,
                "  State: {:?} leader={:?}",
                ss.role,
                ss.leader.map(|l| l.0)
            )
            .unwrap();
        }
        if let Some(hs) = rd.hard_state {
            writeln!(
                out,
                "  HardState term={} vote={:?} commit={}",
                hs.term,
                hs.vote.map(|v| v.0),
                hs.commit
            )
            .unwrap();
        }
        if let Some(s) = &rd.snapshot {
            writeln!(
                out,
                "  Snapshot index={} term={} {}",
                s.meta.index,
                s.meta.term,
                s.meta.membership()
            )
            .unwrap();
            node.raw.storage_mut().apply_snapshot(s.clone());
            node.applied = postcard::from_bytes(&s.data).unwrap_or_default();
        }
        if !rd.entries.is_empty() {
            let es: Vec<String> = rd.entries.iter().map(fmt_entry).collect();
            writeln!(out, "  Entries: {}", es.join(", ")).unwrap();
        }
        node.raw.storage_mut().append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            node.raw.storage_mut().set_hard_state(hs);
        }
        if !rd.committed_entries.is_empty() {
            let es: Vec<String> = rd.committed_entries.iter().map(fmt_entry).collect();
            writeln!(out, "  Committed: {}", es.join(", ")).unwrap();
        }
        for e in &rd.committed_entries {
            if e.kind == EntryKind::Normal {
                node.applied.push(e.data.clone());
            }
        }
        if let Some(s) = &rd.compact {
            node.raw.storage_mut().compact(s.clone());
        }
        let msgs: Vec<Message> = rd
            .messages
            .into_iter()
            .chain(rd.persisted_messages)
            .collect();
        for m in &msgs {
            writeln!(out, "  {}", fmt_msg(m)).unwrap();
        }
        let was_removed = node.raw.status().removed;
        node.raw.advance();
        let after = node.raw.status();
        if after.membership != node.shown {
            writeln!(out, "  Membership now {}", after.membership).unwrap();
            node.shown = after.membership.clone();
        }
        if after.removed && !was_removed {
            writeln!(out, "  Removed: this node no longer campaigns").unwrap();
        }
        self.queue.extend(msgs);
        true
    }

    fn deliver(&mut self, to: &[u64], drop: bool, out: &mut String) {
        let mut keep = VecDeque::new();
        while let Some(m) = self.queue.pop_front() {
            if !to.is_empty() && !to.contains(&m.to.0) {
                keep.push_back(m);
                continue;
            }
            if drop {
                writeln!(out, "dropped: {}", fmt_msg(&m)).unwrap();
                continue;
            }
            let line = fmt_msg(&m);
            let Some(node) = self.nodes.get_mut(&m.to.0) else {
                writeln!(out, "undeliverable: {line}").unwrap();
                continue;
            };
            match node.raw.step(m) {
                Ok(()) => writeln!(out, "{line}").unwrap(),
                Err(e) => writeln!(out, "{line}: ignored ({e})").unwrap(),
            }
        }
        self.queue = keep;
    }

    fn stabilize(&mut self, ids: &[u64], out: &mut String) {
        let ids: Vec<u64> = if ids.is_empty() {
            self.nodes.keys().copied().collect()
        } else {
            ids.to_vec()
        };
        for _ in 0..1000 {
            let mut busy = false;
            for &id in &ids {
                while self.process_ready(id, out) {
                    busy = true;
                }
            }
            let pending = self.queue.iter().any(|m| ids.contains(&m.to.0));
            if pending {
                self.deliver(&ids, false, out);
                busy = true;
            }
            if !busy {
                return;
            }
        }
        panic!("stabilize did not settle");
    }

    fn status(&mut self, id: u64) -> Result<String, String> {
        let s = self.node(id)?.raw.status();
        let mut out = format!(
            "{:?} term={} leader={:?} commit={} applied={} last={} {}{}\n",
            s.role,
            s.term,
            s.leader.map(|l| l.0),
            s.commit,
            s.applied,
            s.last_index,
            s.membership,
            if s.removed { " REMOVED" } else { "" }
        );
        for p in &s.peers {
            writeln!(
                out,
                "  {}: {} match={} {:?}",
                p.id,
                if p.voter { "voter" } else { "learner" },
                p.match_index,
                p.state
            )
            .unwrap();
        }
        Ok(out)
    }

    fn run(&mut self, cmd: &str, args: &[String], input: &[String]) -> Result<String, String> {
        let mut positional = Vec::new();
        let mut named = BTreeMap::new();
        for a in args {
            match a.split_once('=') {
                Some((k, v)) => {
                    named.insert(k.to_string(), v.to_string());
                }
                None => positional.push(a.clone()),
            }
        }
        let id = |i: usize| -> Result<u64, String> {
            positional
                .get(i)
                .ok_or_else(|| format!("{cmd}: missing argument {}", i + 1))?
                .parse()
                .map_err(|_| format!("{cmd}: bad id"))
        };
        let ids: Vec<u64> = positional.iter().filter_map(|p| p.parse().ok()).collect();
        let mut out = String::new();
        match cmd {
            "add-nodes" => return self.add_nodes(&named, id(0)?),
            "campaign" => self.node(id(0)?)?.raw.campaign(),
            "tick" => {
                let n: u32 = named
                    .get("n")
                    .map_or(Ok(1), |v| v.parse())
                    .map_err(|_| "n")?;
                for _ in 0..n {
                    self.node(id(0)?)?.raw.tick();
                }
            }
            "propose" => {
                let data = positional.get(1).cloned().unwrap_or_default();
                match self.node(id(0)?)?.raw.propose(data.into_bytes()) {
                    Ok(i) => writeln!(out, "ok: index {i}").unwrap(),
                    Err(e) => writeln!(out, "error: {e}").unwrap(),
                }
            }
            "propose-conf-change" => {
                let mut steps = Vec::new();
                for tok in input.iter().flat_map(|l| l.split_whitespace()) {
                    let (k, n) = tok.split_at(1);
                    let n = NodeId(n.parse().map_err(|_| format!("bad step {tok}"))?);
                    steps.push(match k {
                        "v" => ConfChangeStep::AddVoter(n),
                        "l" => ConfChangeStep::AddLearner(n),
                        "p" => ConfChangeStep::Promote(n),
                        "r" => ConfChangeStep::Remove(n),
                        _ => return Err(format!("bad step {tok}")),
                    });
                }
                match self.node(id(0)?)?.raw.propose_conf_change(steps) {
                    Ok(i) => writeln!(out, "ok: index {i}").unwrap(),
                    Err(e) => writeln!(out, "error: {e}").unwrap(),
                }
            }
            "transfer-leader" => {
                let to: u64 = named.get("to").ok_or("to=")?.parse().map_err(|_| "to")?;
                if let Err(e) = self.node(id(0)?)?.raw.transfer_leader(NodeId(to)) {
                    writeln!(out, "error: {e}").unwrap();
                }
            }
            "process-ready" => {
                for &i in &ids {
                    self.node(i)?;
                    self.process_ready(i, &mut out);
                }
            }
            "deliver-msgs" => self.deliver(&ids, false, &mut out),
            "drop-msgs" => self.deliver(&ids, true, &mut out),
            "stabilize" => self.stabilize(&ids, &mut out),
            "status" => return self.status(id(0)?),
            "raft-log" => {
                let raw = &self.node(id(0)?)?.raw;
                let s = raw.status();
                let es = raw
                    .log_entries(s.first_index, s.last_index.next())
                    .map_err(|e| e.to_string())?;
                if s.first_index > LogIndex(1) {
                    writeln!(out, "(compacted up to {})", s.first_index.prev()).unwrap();
                }
                for e in &es {
                    writeln!(out, "{}", fmt_entry(e)).unwrap();
                }
                if es.is_empty() {
                    writeln!(out, "(empty)").unwrap();
                }
            }
            "snapshot" => {
                let node = self.node(id(0)?)?;
                let applied = node.raw.status().applied;
                let data = postcard::to_allocvec(&node.applied).map_err(|e| e.to_string())?;
                node.raw
                    .snapshot(applied, data)
                    .map_err(|e| e.to_string())?;
                let mut rd_out = String::new();
                self.process_ready(id(0)?, &mut rd_out);
                let node = self.node(id(0)?)?;
                let meta = node.raw.storage().snapshot_meta().clone();
                writeln!(
                    out,
                    "snapshot at {} term={} {}",
                    meta.index,
                    meta.term,
                    meta.membership()
                )
                .unwrap();
            }
            "restart" => {
                let i = id(0)?;
                let node = self.node(i)?;
                let storage = node.raw.storage().clone();
                let mut config = node.config.clone();
                // The state machine is durable here: it restarts at what it had applied.
                config.applied = node.raw.status().applied;
                node.raw = RawNode::new(config, storage).map_err(|e| e.to_string())?;
                node.shown = node.raw.membership().clone();
                writeln!(out, "restarted {i}: {}", self.node(i)?.raw.membership()).unwrap();
            }
            other => return Err(format!("unknown command {other:?}")),
        }
        Ok(out)
    }
}

/// One case of a script: where it starts, its command line, input and expected output.
struct Case {
    line: usize,
    command: String,
    input: Vec<String>,
    expected: String,
}

fn parse(text: &str) -> Result<(Vec<Case>, Vec<String>), String> {
    // Returns the cases and, for rewriting, the text before each case (comments, blanks).
    let lines: Vec<&str> = text.lines().collect();
    let mut cases = Vec::new();
    let mut preludes = Vec::new();
    let mut prelude = String::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.trim().is_empty() || l.starts_with('#') {
            prelude.push_str(l);
            prelude.push('\n');
            i += 1;
            continue;
        }
        let line = i + 1;
        let command = l.to_string();
        i += 1;
        let mut input = Vec::new();
        while i < lines.len() && lines[i] != "----" {
            input.push(lines[i].to_string());
            i += 1;
        }
        if i == lines.len() {
            return Err(format!("line {line}: case without a ---- line"));
        }
        i += 1;
        let mut expected = String::new();
        while i < lines.len() && !lines[i].is_empty() {
            expected.push_str(lines[i]);
            expected.push('\n');
            i += 1;
        }
        cases.push(Case {
            line,
            command,
            input,
            expected,
        });
        preludes.push(std::mem::take(&mut prelude));
    }
    preludes.push(prelude);
    Ok((cases, preludes))
}

/// Runs one script; returns the mismatches (or rewrites the file under `SHOAL_REWRITE=1`).
fn run_script(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("script readable");
    let (cases, preludes) = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut env = Env::default();
    let mut failures = Vec::new();
    let mut rewritten = String::new();
    for (case, prelude) in cases.iter().zip(&preludes) {
        let mut words = case.command.split_whitespace().map(str::to_string);
        let cmd = words.next().unwrap_or_default();
        let args: Vec<String> = words.collect();
        let mut actual = match env.run(&cmd, &args, &case.input) {
            Ok(s) => s,
            Err(e) => format!("command error: {e}\n"),
        };
        if actual.is_empty() {
            actual = "ok\n".to_string();
        }
        if actual != case.expected {
            failures.push(format!(
                "{}:{}: {}\n--- expected\n{}--- actual\n{}",
                path.display(),
                case.line,
                case.command,
                case.expected,
                actual
            ));
        }
        rewritten.push_str(prelude);
        rewritten.push_str(&case.command);
        rewritten.push('\n');
        for l in &case.input {
            rewritten.push_str(l);
            rewritten.push('\n');
        }
        rewritten.push_str("----\n");
        rewritten.push_str(&actual);
    }
    rewritten.push_str(preludes.last().map_or("", String::as_str));
    if std::env::var_os("SHOAL_REWRITE").is_some() {
        std::fs::write(path, rewritten).expect("script writable");
        return Vec::new();
    }
    failures
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn check(paths: &[PathBuf]) {
    let failures: Vec<String> = paths.iter().flat_map(|p| run_script(p)).collect();
    assert!(
        failures.is_empty(),
        "{} case(s) differ (SHOAL_REWRITE=1 rewrites the expectations):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every script in `testdata/` (or the one named by `SHOAL_SCRIPT`).
#[test]
fn interaction_scripts() {
    let only = std::env::var("SHOAL_SCRIPT").ok();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(testdata())
        .expect("testdata directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .filter(|p| {
            only.as_deref()
                .is_none_or(|o| p.file_stem().is_some_and(|s| s == o))
        })
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no scripts found in {}",
        testdata().display()
    );
    check(&paths);
}

/// The single-server-change bug Ongaro reported on raft-dev in 2015: a leader elected in
/// term 2 that changes the membership before it has committed an entry of its own term can
/// let a stale leader of term 1 win term 3 and overwrite a committed entry. The fix (the
/// leader waits until its term's no-op is applied) is what this script exercises: the early
/// proposal is refused, and the stale leader can no longer win.
#[test]
fn ongaro_2015_single_server_change_counterexample() {
    check(&[testdata().join("single_server_change_bug_2015.txt")]);
}

/// The runner itself: a wrong expectation is reported, never silently accepted.
#[test]
fn a_wrong_expectation_fails() {
    let dir = std::env::temp_dir().join(format!("shoal-interaction-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wrong.txt");
    std::fs::write(&path, "add-nodes 1\n----\nnode 1: voters=(2)\n").unwrap();
    let failures = if std::env::var_os("SHOAL_REWRITE").is_some() {
        vec!["skipped under rewrite".to_string()]
    } else {
        run_script(&path)
    };
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(failures.len(), 1, "{failures:?}");
}
