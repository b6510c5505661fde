//! Processes as /proc shows them, for the real-process tests that check no child outlives its
//! supervisor (`kv up`, `mr run`).

#![allow(dead_code)]

/// (parent pid, state letter) of `pid` from /proc/PID/stat, or `None` if it is gone.
pub fn ppid_and_state(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid …": comm may hold spaces and parentheses; the last ')' ends it.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Whether `pid` still runs (a zombie waiting for its reaper does not).
pub fn running(pid: u32) -> bool {
    ppid_and_state(pid).is_some_and(|(_, state)| state != 'Z' && state != 'X')
}

/// Pids of the running processes whose parent is `parent`, in order.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            ppid_and_state(pid)
                .is_some_and(|(ppid, state)| ppid == parent && state != 'Z' && state != 'X')
        })
        .collect();
    pids.sort_unstable();
    pids
}
