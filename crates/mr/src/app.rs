//! The `App` trait that MapReduce applications implement, and the registry of built-in apps.
//!
//! An app is a pair of functions (paper §2): `map(name, contents)` emits intermediate
//! key/value pairs, `reduce(key, values)` turns all values of one key into one output value.
//! Keys and values are raw bytes: the engine never interprets them, and sorts keys in byte
//! order. Optional hooks let an app add a combiner (paper §4.3), choose its own partitioning
//! function (§4.2), see where its split comes from, or consume a whole reduce task at once
//! (streaming apps).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};

use crate::apps;

/// Where map output goes: the map task engine implements it, apps call it.
pub trait Emit {
    /// Emits one intermediate pair. Keys and values may hold any bytes (spaces, tabs,
    /// newlines, invalid UTF-8); they are stored length-prefixed.
    fn emit(&mut self, key: &[u8], value: &[u8]);

    /// Adds `delta` to the user counter `name`, reported as `user.<name>` in the task's
    /// counters.
    fn counter(&mut self, name: &str, delta: u64);
}

/// How map output is combined before it is written (paper §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combiner {
    /// No combiner: every emitted pair reaches the reducers.
    None,
    /// Values are unsigned decimal integers (ASCII digits); pairs with the same key are
    /// combined into one pair whose value is their sum. The engine does it natively with a
    /// hash table of 64-bit counters in the map buffer, which is far cheaper than calling
    /// [`App::combine`] per pair.
    SumDecimal,
    /// The app's own [`App::combine`], run on each sorted run of equal keys when the map
    /// buffer is spilled and when spills are merged.
    Custom,
}

/// One map input: a split of a file, with where it comes from.
#[derive(Clone, Copy, Debug)]
pub struct MapInput<'a> {
    /// The input's name: the path as given by the user.
    pub name: &'a str,
    /// The input file.
    pub path: &'a Path,
    /// Byte offset of `contents` in the file (0 unless the file was split).
    pub offset: u64,
    /// The split's bytes (whole lines, see [`crate::split`]).
    pub contents: &'a [u8],
}

/// A MapReduce application.
///
/// Every method but `map` and `reduce` has a default. Implementations must be deterministic
/// for a given input (a re-executed task must produce the same output, paper §3.3), and may
/// panic: the task engine catches the panic and fails the task with an error naming the app
/// and the input.
pub trait App: Send + Sync + 'static {
    /// The app's name, used in error messages.
    fn name(&self) -> &str {
        "custom"
    }

    /// Maps one input split: `name` is the input path as given by the user, `contents` the
    /// split's raw bytes (not necessarily valid UTF-8).
    fn map(&self, name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()>;

    /// Maps one input split, knowing where it comes from. The default calls [`App::map`];
    /// apps that need the split's offset (e.g. `grep`, for line numbers) override it.
    fn map_input(&self, input: &MapInput<'_>, emit: &mut dyn Emit) -> anyhow::Result<()> {
        self.map(input.name, input.contents, emit)
    }

    /// Reduces all values of one key (streamed in no particular order) into `out`, the value
    /// written after `"key "` on the key's output line.
    fn reduce(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()>;

    /// Which combiner runs on this app's map output. Default: none.
    fn combiner(&self) -> Combiner {
        Combiner::None
    }

    /// The custom combiner (used when [`App::combiner`] is [`Combiner::Custom`]): combines
    /// values of one key into one value of the same kind, written to `out`. It must be
    /// associative and commutative in effect, since it may run any number of times on any
    /// subsets of a key's values.
    fn combine(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let _ = (key, values, out);
        bail!("app `{}` has no combiner", self.name())
    }

    /// The reduce task (0..reduces) that receives `key`. The default is FNV-1a 32 of the key
    /// modulo `reduces`: stable across processes, machines and versions.
    fn partition(&self, key: &[u8], reduces: u32) -> u32 {
        fnv1a32(key) % reduces.max(1)
    }

    /// Records in a map split, for the `map.input.records` counter. Default: lines.
    fn input_records(&self, contents: &[u8]) -> u64 {
        memchr::memchr_iter(b'\n', contents).count() as u64
            + u64::from(contents.last().is_some_and(|&b| b != b'\n'))
    }

    /// Records in bytes a whole-task reducer wrote, for `reduce.output.records`. Default:
    /// lines.
    fn output_records(&self, bytes: &[u8]) -> u64 {
        memchr::memchr_iter(b'\n', bytes).count() as u64
    }

    /// Whether this app consumes a whole reduce task at once through
    /// [`App::reduce_task_stream`] instead of one [`App::reduce`] call per key.
    fn reduces_whole_task(&self) -> bool {
        false
    }

    /// Whole-task reduce: `records` yields every (key, value) of the task sorted by key;
    /// `out` receives the task's output file contents (lines `key value`). Only called when
    /// [`App::reduces_whole_task`] is true.
    fn reduce_task_stream(
        &self,
        records: &mut dyn Iterator<Item = (&[u8], &[u8])>,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<()> {
        let _ = (records, out);
        bail!("app `{}` does not reduce whole tasks", self.name())
    }
}

/// FNV-1a, 32 bits: the default partitioning hash (stable, simple, good enough spread).
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let mut hash = OFFSET_BASIS;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// Which app a job runs, and its parameters: what the coordinator sends to workers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppConfig {
    /// A name from [`app_names`].
    pub name: String,
    /// `grep`: the regular expression (Rust `regex` syntax, matched against each line's bytes).
    pub pattern: Option<String>,
    /// `stream`: the mapper command (`sh -c`).
    pub mapper: Option<String>,
    /// `stream`: the reducer command (`sh -c`); none means the identity reducer.
    pub reducer: Option<String>,
    /// `stream`: files (scripts) materialized into `<work_dir>/ship/` before commands run.
    pub shipped: Vec<ShippedFile>,
    /// `sort`: the record format and the range partitioner's cut points (placed by the
    /// coordinator from a sample of the input).
    pub sort: Option<apps::sort::SortConfig>,
}

impl AppConfig {
    /// The app as a worker receives it in the coordinator's welcome (the inverse of
    /// `PreparedJob::spec`); an unknown sort format is an error.
    pub fn from_spec(spec: &shoal_wire::mr::AppSpec) -> anyhow::Result<AppConfig> {
        Ok(AppConfig {
            name: spec.name.clone(),
            pattern: spec.pattern.clone(),
            mapper: spec.mapper.clone(),
            reducer: spec.reducer.clone(),
            shipped: spec
                .shipped
                .iter()
                .map(|f| ShippedFile {
                    name: f.name.clone(),
                    contents: f.contents.clone(),
                    executable: f.executable,
                })
                .collect(),
            sort: match &spec.sort {
                None => None,
                Some(sort) => Some(apps::sort::SortConfig {
                    format: apps::sort::SortFormat::parse(&sort.format)?,
                    cut_points: sort.cut_points.clone(),
                }),
            },
        })
    }
}

/// A file shipped with a streaming job (a mapper or reducer script and its data).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShippedFile {
    /// Plain file name (no directory part).
    pub name: String,
    /// The file's bytes.
    pub contents: Vec<u8>,
    /// Whether to mark it executable (mode 0755).
    pub executable: bool,
}

/// The names of the built-in apps, as accepted by [`build_app`].
pub fn app_names() -> &'static [&'static str] {
    &[
        "wordcount",
        "indexer",
        "grep",
        "sort",
        "stream",
        "mtiming",
        "rtiming",
        "jobcount",
        "early_exit",
        "crash",
        "nocrash",
    ]
}

/// Builds the app described by `cfg`, validating it: an unknown name, `grep` without a
/// pattern, a bad regular expression, or `stream` without a mapper is an error. Streaming
/// apps materialize `cfg.shipped` into `work_dir/ship/` and run their commands there.
pub fn build_app(cfg: &AppConfig, work_dir: &Path) -> anyhow::Result<Arc<dyn App>> {
    let app: Arc<dyn App> = match cfg.name.as_str() {
        "wordcount" => Arc::new(apps::wordcount::WordCount),
        "indexer" => Arc::new(apps::indexer::Indexer),
        "grep" => {
            let pattern = cfg
                .pattern
                .as_deref()
                .ok_or_else(|| anyhow!("app `grep` needs a pattern (--pattern REGEX)"))?;
            Arc::new(apps::grep::Grep::new(pattern)?)
        }
        "sort" => {
            let config = cfg.sort.clone().unwrap_or(apps::sort::SortConfig {
                format: apps::sort::SortFormat::Lines,
                cut_points: Vec::new(),
            });
            Arc::new(apps::sort::Sort::new(&config)?)
        }
        "stream" => {
            let mapper = cfg
                .mapper
                .clone()
                .ok_or_else(|| anyhow!("app `stream` needs a mapper command (--mapper CMD)"))?;
            let ship_dir = work_dir.join("ship");
            apps::stream::materialize(&cfg.shipped, &ship_dir)
                .with_context(|| format!("shipping files into {}", ship_dir.display()))?;
            Arc::new(apps::stream::Stream::new(
                mapper,
                cfg.reducer.clone(),
                ship_dir,
            ))
        }
        "mtiming" => Arc::new(apps::faults::MapTiming),
        "rtiming" => Arc::new(apps::faults::ReduceTiming),
        "jobcount" => Arc::new(apps::faults::JobCount),
        "early_exit" => Arc::new(apps::faults::EarlyExit),
        "crash" => Arc::new(apps::faults::Crash { crashes: true }),
        "nocrash" => Arc::new(apps::faults::Crash { crashes: false }),
        other => bail!(
            "unknown app `{other}`; known apps: {}",
            app_names().join(", ")
        ),
    };
    if cfg.name != "sort" && cfg.sort.is_some() {
        bail!("--format is an option of the sort app (--app sort)");
    }
    if cfg.name != "grep" && cfg.pattern.is_some() {
        tracing::warn!(app = %cfg.name, "--pattern is ignored by this app");
    }
    Ok(app)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn unknown_app_lists_known_apps() {
        let cfg = AppConfig {
            name: "nope".into(),
            ..AppConfig::default()
        };
        let err = build_app(&cfg, Path::new("/nonexistent"))
            .err()
            .map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(
            msg.contains("wordcount") && msg.contains("nocrash"),
            "{msg}"
        );
    }

    #[test]
    fn grep_needs_a_valid_pattern() {
        let mut cfg = AppConfig {
            name: "grep".into(),
            ..AppConfig::default()
        };
        assert!(build_app(&cfg, Path::new("/nonexistent")).is_err());
        cfg.pattern = Some("(".into());
        assert!(build_app(&cfg, Path::new("/nonexistent")).is_err());
        cfg.pattern = Some("wh[ae]le".into());
        assert!(build_app(&cfg, Path::new("/nonexistent")).is_ok());
    }
}
