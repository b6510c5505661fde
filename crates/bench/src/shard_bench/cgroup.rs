//! CPU quotas as a scale model: each server process in its own cgroup with a fixed CFS quota
//! (cgroup v1 `cpu.cfs_period_us` + `cpu.cfs_quota_us`, v2 `cpu.max`), the throttling each
//! cgroup suffered (`cpu.stat`), and the host's CPU use over a run (`/proc/stat`).
//!
//! The cgroups live under `<cpu hierarchy>/shoal-bench/<pid>-<run>/<server>`; [`CpuCgroups`]
//! removes them (and `shoal-bench` when it is empty) on drop, so drop it after the processes
//! inside are gone (a cgroup with a live member cannot be removed).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Where the cpu controller is mounted on most machines.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The directory every run's cgroups go under.
pub const BENCH_DIR: &str = "shoal-bench";
/// The kernel's smallest CFS quota (1 ms).
pub const MIN_QUOTA_US: u64 = 1_000;

/// Which cgroup interface holds the cpu controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `…/cpu/` (or `cpu,cpuacct`): `cpu.cfs_period_us`, `cpu.cfs_quota_us`, `cgroup.procs`.
    V1,
    /// The unified hierarchy: `cpu.max`, `cgroup.procs`, `+cpu` in `cgroup.subtree_control`.
    V2,
}

/// The cpu controller's hierarchy: its version and the directory of its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: Version,
    pub root: PathBuf,
}

impl Hierarchy {
    /// Finds the cpu controller under `base` (normally [`CGROUP_ROOT`]): v2 if `base` is a
    /// unified hierarchy listing `cpu` in `cgroup.controllers`, else v1 at `base/cpu` or
    /// `base/cpu,cpuacct`. `Err` says why there is none.
    pub fn find(base: &Path) -> Result<Hierarchy, String> {
        if let Ok(controllers) = fs::read_to_string(base.join("cgroup.controllers")) {
            if controllers.split_whitespace().any(|c| c == "cpu") {
                return Ok(Hierarchy {
                    version: Version::V2,
                    root: base.to_path_buf(),
                });
            }
        }
        for dir in ["cpu", "cpu,cpuacct", "cpuacct,cpu"] {
            let root = base.join(dir);
            if root.join("cpu.cfs_quota_us").exists() {
                return Ok(Hierarchy {
                    version: Version::V1,
                    root,
                });
            }
        }
        Err(format!(
            "no cpu controller under {} (neither a v2 hierarchy listing `cpu` in \
             cgroup.controllers nor a v1 `cpu` mount with cpu.cfs_quota_us)",
            base.display()
        ))
    }

    /// The directory of cgroup `name` of run `run`.
    pub fn cgroup_dir(&self, run: &str, name: &str) -> PathBuf {
        self.root.join(BENCH_DIR).join(run).join(name)
    }
}

/// A CPU quota: `quota` of CPU time in every `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub period_us: u64,
    pub quota_us: u64,
}

impl Quota {
    /// Checks the kernel's bounds (quota ≥ 1 ms, period 1 ms … 1 s).
    pub fn new(period: Duration, quota: Duration) -> Result<Quota> {
        let period_us = period.as_micros() as u64;
        let quota_us = quota.as_micros() as u64;
        if !(1_000..=1_000_000).contains(&period_us) {
            bail!("a CFS period must be 1 to 1000 ms, not {period:?}: change --period-ms");
        }
        if quota_us < MIN_QUOTA_US {
            bail!("a CFS quota must be at least 1 ms, not {quota:?}: raise --quota-ms");
        }
        Ok(Quota {
            period_us,
            quota_us,
        })
    }

    /// The share of one core this quota allows.
    pub fn cores(&self) -> f64 {
        self.quota_us as f64 / self.period_us as f64
    }

    /// The files to write, in order, and their contents.
    pub fn files(&self, version: Version) -> Vec<(&'static str, String)> {
        match version {
            // The period first: a quota is checked against the period in force.
            Version::V1 => vec![
                ("cpu.cfs_period_us", self.period_us.to_string()),
                ("cpu.cfs_quota_us", self.quota_us.to_string()),
            ],
            Version::V2 => vec![("cpu.max", format!("{} {}", self.quota_us, self.period_us))],
        }
    }
}

/// Throttling counters of `cpu.stat` (summed over cgroups, or a difference of two reads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttling {
    /// Enforcement periods with activity.
    pub periods: u64,
    /// Periods in which the cgroup hit its quota and was stopped.
    pub throttled: u64,
    /// Total time its tasks were stopped.
    pub throttled_us: u64,
}

impl Throttling {
    /// Parses `cpu.stat`: v1 `throttled_time` is in nanoseconds, v2 `throttled_usec` in µs.
    pub fn parse(text: &str) -> Throttling {
        let mut t = Throttling::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(v) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "nr_periods" => t.periods = v,
                "nr_throttled" => t.throttled = v,
                "throttled_time" => t.throttled_us = v / 1_000,
                "throttled_usec" => t.throttled_us = v,
                _ => {}
            }
        }
        t
    }

    pub fn plus(self, o: Throttling) -> Throttling {
        Throttling {
            periods: self.periods + o.periods,
            throttled: self.throttled + o.throttled,
            throttled_us: self.throttled_us + o.throttled_us,
        }
    }

    /// `self − earlier` (counters only grow; saturating in case a cgroup was recreated).
    pub fn since(self, earlier: Throttling) -> Throttling {
        Throttling {
            periods: self.periods.saturating_sub(earlier.periods),
            throttled: self.throttled.saturating_sub(earlier.throttled),
            throttled_us: self.throttled_us.saturating_sub(earlier.throttled_us),
        }
    }
}

/// The cgroups of one run (one cluster): created one per process, removed on drop.
#[derive(Debug)]
pub struct CpuCgroups {
    hierarchy: Hierarchy,
    quota: Quota,
    run: String,
    dirs: Vec<PathBuf>,
}

impl CpuCgroups {
    /// Prepares the run's directory (`shoal-bench/<pid>-<run>`); v2 also enables the cpu
    /// controller for the children of the root and of `shoal-bench`.
    pub fn new(hierarchy: &Hierarchy, run: &str, quota: Quota) -> Result<CpuCgroups> {
        let run = format!("{}-{run}", std::process::id());
        let bench = hierarchy.root.join(BENCH_DIR);
        let run_dir = bench.join(&run);
        let cgroups = CpuCgroups {
            hierarchy: hierarchy.clone(),
            quota,
            run,
            dirs: Vec::new(),
        };
        if hierarchy.version == Version::V2 {
            enable_cpu(&hierarchy.root)?;
        }
        // In one step: another run may remove an empty `shoal-bench` at any moment.
        fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating cgroup {}", run_dir.display()))?;
        if hierarchy.version == Version::V2 {
            enable_cpu(&bench)?;
            enable_cpu(&run_dir)?;
        }
        Ok(cgroups)
    }

    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Creates cgroup `name` with the quota and moves process `pid` into it.
    pub fn add(&mut self, name: &str, pid: u32) -> Result<()> {
        let dir = self.hierarchy.cgroup_dir(&self.run, name);
        mkdir(&dir)?;
        self.dirs.push(dir.clone());
        for (file, value) in self.quota.files(self.hierarchy.version) {
            write(&dir.join(file), &value)?;
        }
        write(&dir.join("cgroup.procs"), &pid.to_string())
    }

    /// The throttling counters summed over this run's cgroups.
    pub fn throttling(&self) -> Throttling {
        self.dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cpu.stat")).ok())
            .map(|s| Throttling::parse(&s))
            .fold(Throttling::default(), Throttling::plus)
    }

    /// Number of cgroups (processes under quota).
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

impl Drop for CpuCgroups {
    fn drop(&mut self) {
        let run_dir = self.hierarchy.root.join(BENCH_DIR).join(&self.run);
        for dir in self.dirs.iter().chain([&run_dir]) {
            // A killed process leaves its cgroup a moment after it is reaped.
            for attempt in 0..50 {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if attempt == 49 => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cgroup not removed");
                        eprintln!(
                            "shard bench: could not remove cgroup {} ({e}): rmdir it by hand",
                            dir.display()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // Shared by concurrent runs: removed only when empty.
        let _ = fs::remove_dir(self.hierarchy.root.join(BENCH_DIR));
    }
}

fn mkdir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", dir.display())),
    }
}

fn write(file: &Path, value: &str) -> Result<()> {
    fs::write(file, value).with_context(|| format!("writing {value:?} to {}", file.display()))
}

/// v2: lets the children of `dir` use the cpu controller.
fn enable_cpu(dir: &Path) -> Result<()> {
    let file = dir.join("cgroup.subtree_control");
    if fs::read_to_string(&file)
        .map(|s| s.split_whitespace().any(|c| c == "cpu"))
        .unwrap_or(false)
    {
        return Ok(());
    }
    write(&file, "+cpu")
}

/// Checks that quotas can be applied here (root, a cpu controller, a writable hierarchy) by
/// creating and removing a probe cgroup. `Err` says why not.
pub fn probe(quota: Quota) -> Result<Hierarchy, String> {
    let hierarchy = Hierarchy::find(Path::new(CGROUP_ROOT))?;
    let mut cgroups = CpuCgroups::new(&hierarchy, "probe", quota).map_err(|e| format!("{e:#}"))?;
    let probe = hierarchy.cgroup_dir(&cgroups.run, "probe");
    let made = mkdir(&probe).and_then(|()| {
        quota
            .files(hierarchy.version)
            .into_iter()
            .try_for_each(|(f, v)| write(&probe.join(f), &v))
    });
    cgroups.dirs.push(probe);
    drop(cgroups);
    made.map_err(|e| format!("{e:#}"))?;
    Ok(hierarchy)
}

/// CPU time counters of the host (`/proc/stat`'s `cpu` line, in clock ticks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCpu {
    pub busy: u64,
    pub total: u64,
}

impl HostCpu {
    /// Parses the first line of `/proc/stat`: `cpu user nice system idle iowait irq softirq
    /// steal …`; idle and iowait are not busy (guest time is already in user).
    pub fn parse(text: &str) -> Option<HostCpu> {
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        if v.len() < 4 {
            return None;
        }
        let total: u64 = v.iter().sum();
        let idle = v[3] + v.get(4).copied().unwrap_or(0);
        Some(HostCpu {
            busy: total - idle,
            total,
        })
    }

    /// Now, or `None` where /proc/stat cannot be read.
    pub fn read() -> Option<HostCpu> {
        HostCpu::parse(&fs::read_to_string("/proc/stat").ok()?)
    }

    /// Cores busy on average between `earlier` and `self`, out of `cpus`.
    pub fn cores_busy_since(&self, earlier: HostCpu, cpus: usize) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| busy as f64 / total as f64 * cpus as f64)
    }
}

/// CPU time (user + system, in clock ticks) of a process, from `/proc/PID/stat`: fields 14
/// and 15, counted after the command name (which may hold spaces and parentheses).
pub fn parse_proc_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds used so far by the processes `pids` (`None` for "this process"); processes
/// that are gone count nothing.
pub fn cpu_secs(pids: &[Option<u32>]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|pid| {
            let path = match pid {
                Some(p) => format!("/proc/{p}/stat"),
                None => "/proc/self/stat".to_string(),
            };
            parse_proc_ticks(&fs::read_to_string(path).ok()?)
        })
        .sum::<u64>() as f64
        / tck
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_cpu_stat() {
        let v1 = "nr_periods 120\nnr_throttled 30\nthrottled_time 4500000000\nnr_bursts 0\n";
        assert_eq!(
            Throttling::parse(v1),
            Throttling {
                periods: 120,
                throttled: 30,
                throttled_us: 4_500_000
            }
        );
        let v2 = "usage_usec 1000\nuser_usec 600\nsystem_usec 400\nnr_periods 10\n\
                  nr_throttled 2\nthrottled_usec 1500\n";
        let t = Throttling::parse(v2);
        assert_eq!((t.periods, t.throttled, t.throttled_us), (10, 2, 1500));
        assert_eq!(t.plus(t).since(t), t);
        assert_eq!(Throttling::default().since(t), Throttling::default());
        assert_eq!(
            Throttling::parse("garbage\n\nnr_throttled x"),
            Throttling::default()
        );
    }

    #[test]
    fn quota_files_and_paths() {
        let q = Quota::new(Duration::from_millis(100), Duration::from_millis(5)).unwrap();
        assert_eq!(q.cores(), 0.05);
        assert_eq!(
            q.files(Version::V1),
            vec![
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "5000".to_string())
            ]
        );
        assert_eq!(
            q.files(Version::V2),
            vec![("cpu.max", "5000 100000".to_string())]
        );
        assert!(Quota::new(Duration::from_millis(100), Duration::from_micros(500)).is_err());
        assert!(Quota::new(Duration::from_secs(2), Duration::from_millis(5)).is_err());
        let h = Hierarchy {
            version: Version::V1,
            root: PathBuf::from("/sys/fs/cgroup/cpu"),
        };
        assert_eq!(
            h.cgroup_dir("42-quota-g4", "g2s3"),
            Path::new("/sys/fs/cgroup/cpu/shoal-bench/42-quota-g4/g2s3")
        );
    }

    #[test]
    fn finds_v1_and_v2_hierarchies() {
        let base = tempfile::tempdir().unwrap();
        assert!(Hierarchy::find(base.path()).is_err());
        fs::create_dir(base.path().join("cpu")).unwrap();
        fs::write(base.path().join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        assert_eq!(
            Hierarchy::find(base.path()).unwrap(),
            Hierarchy {
                version: Version::V1,
                root: base.path().join("cpu")
            }
        );
        fs::write(
            base.path().join("cgroup.controllers"),
            "cpuset cpu io memory",
        )
        .unwrap();
        assert_eq!(Hierarchy::find(base.path()).unwrap().version, Version::V2);
        fs::write(base.path().join("cgroup.controllers"), "memory pids").unwrap();
        assert_eq!(Hierarchy::find(base.path()).unwrap().version, Version::V1);
    }

    #[test]
    fn process_cpu_from_proc_pid_stat() {
        let stat = "4242 (shoal (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 25 0 0 20 0 9 0";
        assert_eq!(parse_proc_ticks(stat), Some(175));
        assert_eq!(parse_proc_ticks("4242 (short) S 1"), None);
        let own = fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_proc_ticks(&own).is_some(), "{own}");
        assert_eq!(cpu_secs(&[Some(u32::MAX)]), 0.0);
    }

    #[test]
    fn host_cpu_from_proc_stat() {
        let a = HostCpu::parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            a,
            HostCpu {
                busy: 150,
                total: 1000
            }
        );
        let b = HostCpu::parse("cpu  400 0 150 1200 50 0 0 0 0 0\n").unwrap();
        // 400 busy of 800 ticks on 2 CPUs: one core busy.
        assert_eq!(b.cores_busy_since(a, 2), Some(1.0));
        assert_eq!(a.cores_busy_since(a, 2), None);
        assert_eq!(HostCpu::parse("intr 1 2 3"), None);
    }

    /// On a machine where quotas work (root, a cpu controller): a process goes into its own
    /// cgroup with the quota, the counters read, and drop removes everything. Elsewhere it
    /// says why it checked nothing.
    #[test]
    fn a_process_in_a_quota_cgroup_and_removal() {
        let quota = Quota::new(Duration::from_millis(100), Duration::from_millis(5)).unwrap();
        let h = match probe(quota) {
            Ok(h) => h,
            Err(why) => {
                eprintln!("cgroups unavailable, nothing checked: {why}");
                return;
            }
        };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut cg = CpuCgroups::new(&h, "unit-test", quota).unwrap();
        cg.add("sleeper", child.id()).unwrap();
        let dir = h.cgroup_dir(&cg.run, "sleeper");
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == child.id().to_string()),
            "{procs}"
        );
        let written = match h.version {
            Version::V1 => fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap(),
            Version::V2 => fs::read_to_string(dir.join("cpu.max")).unwrap(),
        };
        assert!(written.starts_with("5000"), "{written}");
        assert_eq!(cg.len(), 1);
        assert_eq!(
            cg.throttling().since(cg.throttling()),
            Throttling::default()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let run_dir = dir.parent().unwrap().to_path_buf();
        drop(cg);
        assert!(!dir.exists() && !run_dir.exists());
    }
}
