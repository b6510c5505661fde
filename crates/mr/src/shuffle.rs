//! The shuffle without a shared file system (paper §3.1): what is served and the checks made
//! on every request. Each worker keeps the output of its completed attempts on its local disk
//! and serves it over TCP; reduce workers (and the coordinator, committing reduce outputs)
//! fetch files from it; the coordinator serves job inputs to workers that cannot open them.
//!
//! One connection per file: `Hello` (role `Shuffle`, cluster id = job id), one
//! [`ShuffleRequest`](shoal_wire::mr::ShuffleRequest), then `ShuffleReply::Data` chunks and an
//! `End` carrying the file's length. Every frame carries a CRC32C; the fetcher writes to a
//! temporary name and renames it only once the length matches, so a half-fetched file is never
//! used. The servers and fetchers (tokio, TCP, TLS) are in `shoal_runtime::mr::shuffle`; this
//! module holds what they decide with: the [`FileTable`] of served files (keys, never paths),
//! the job inputs the coordinator may serve ([`InputFiles`], with their range and staleness
//! checks), and the handshake's refusal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shoal_wire::mr::FileKey;
use shoal_wire::{Hello, Role};

/// Files a worker may serve: only outputs of attempts it completed. Keys, not paths, come over
/// the wire, so a fetcher can never name an arbitrary file.
#[derive(Debug, Clone, Default)]
pub struct FileTable {
    files: Arc<Mutex<BTreeMap<FileKey, Served>>>,
    job_id: Arc<AtomicU64>,
}

#[derive(Debug, Clone)]
struct Served {
    path: PathBuf,
    /// Served once, then this directory (holding the file) is deleted: a reduce output, which
    /// only the coordinator fetches, once, to commit it.
    once: Option<PathBuf>,
}

impl FileTable {
    /// Makes `path` available under `key`.
    pub fn insert(&self, key: FileKey, path: PathBuf) {
        if let Ok(mut files) = self.files.lock() {
            files.insert(key, Served { path, once: None });
        }
    }

    /// Makes `path` available under `key` for one fetch; after it (whether it succeeded or
    /// not) the entry is dropped and `dir` deleted. For reduce outputs: the coordinator fetches
    /// each winning output exactly once, and a failed commit runs the task again as a new
    /// attempt, so the file is never needed twice and must not pile up on the worker's disk.
    pub fn insert_once(&self, key: FileKey, path: PathBuf, dir: PathBuf) {
        if let Ok(mut files) = self.files.lock() {
            files.insert(
                key,
                Served {
                    path,
                    once: Some(dir),
                },
            );
        }
    }

    /// Stops serving `key` (its files are about to be deleted).
    pub fn remove(&self, key: &FileKey) {
        if let Ok(mut files) = self.files.lock() {
            files.remove(key);
        }
    }

    /// Forgets every file (a new coordinator session).
    pub fn clear(&self) {
        if let Ok(mut files) = self.files.lock() {
            files.clear();
        }
    }

    /// The path served under `key`.
    pub fn get(&self, key: &FileKey) -> Option<PathBuf> {
        Some(self.files.lock().ok()?.get(key)?.path.clone())
    }

    /// The path under `key` and, for a served-once entry, the directory to delete after this
    /// fetch (the entry is then gone, so no second fetch can start).
    pub fn take_for_serving(&self, key: &FileKey) -> Option<(PathBuf, Option<PathBuf>)> {
        let mut files = self.files.lock().ok()?;
        let served = files.get(key)?.clone();
        if served.once.is_some() {
            files.remove(key);
        }
        Some((served.path, served.once))
    }

    /// Sets the job id fetchers must present (0: refuse everyone).
    pub fn set_job_id(&self, job_id: u64) {
        self.job_id.store(job_id, Ordering::SeqCst);
    }

    /// The job id fetchers must present (0: none yet).
    pub fn job_id(&self) -> u64 {
        self.job_id.load(Ordering::SeqCst)
    }
}

/// Why a shuffle handshake is refused by a server of job `job_id` (0: no job yet), if it is;
/// `server` names the server in the message ("worker", "coordinator").
pub fn shuffle_hello_refusal(hello: &Hello, job_id: u64, server: &str) -> Option<String> {
    match hello.validate() {
        Err(e) => Some(e),
        Ok(()) if hello.role != Role::Shuffle => Some("not a shuffle connection".to_string()),
        Ok(()) if job_id == 0 || hello.cluster_id != job_id => Some(format!(
            "job id {:#x} does not match this {server}'s job",
            hello.cluster_id
        )),
        Ok(()) => None,
    }
}

/// Size and modification time of a job input when the job was planned: a file that differs
/// when a worker asks for it has changed under the job, and is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InputStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl InputStamp {
    fn of(meta: &std::fs::Metadata) -> InputStamp {
        InputStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// The job inputs the coordinator serves to workers that cannot open them
/// ([`ShuffleRequest::FetchInput`]): exactly the planned input paths, nothing else, so a
/// worker can never name an arbitrary file of the coordinator's host.
#[derive(Debug, Clone, Default)]
pub struct InputFiles {
    files: Arc<BTreeMap<PathBuf, InputStamp>>,
}

impl InputFiles {
    /// Records the size and modification time of each input (as named in the splits).
    pub fn snapshot(paths: &[PathBuf]) -> std::io::Result<InputFiles> {
        let mut files = BTreeMap::new();
        for path in paths {
            let meta = std::fs::metadata(path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot stat input {}: {e}", path.display()),
                )
            })?;
            files.insert(path.clone(), InputStamp::of(&meta));
        }
        Ok(InputFiles {
            files: Arc::new(files),
        })
    }
}

/// What a fetched file is for, which decides whether it is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// A committed output: fsynced before the rename.
    Durable,
    /// A reduce task's input: renamed when whole, not fsynced (a worker that crashes loses its
    /// directory and the task runs again elsewhere; the kernel may never write it to disk).
    Scratch,
}

impl InputFiles {
    /// Checks a request for bytes `[offset, offset + len)` of `path` (to its end when `len` is
    /// `None`) against the inputs, given `current`, the file's metadata now: it must be an input
    /// of the job, unchanged since the job was planned, and the range inside it. Returns the end
    /// of the range, or the refusal to send (it says what is wrong and what to do).
    pub fn check_range(
        &self,
        path: &Path,
        offset: u64,
        len: Option<u64>,
        current: &std::fs::Metadata,
    ) -> Result<u64, String> {
        let stamp = self.stamp(path)?;
        check_stamped_range(path, stamp, InputStamp::of(current), offset, len)
    }

    /// Whether `path` is one of the job's inputs; the refusal if not.
    pub fn check_input(&self, path: &Path) -> Result<(), String> {
        self.stamp(path).map(|_| ())
    }

    fn stamp(&self, path: &Path) -> Result<InputStamp, String> {
        self.files
            .get(path)
            .copied()
            .ok_or_else(|| format!("{} is not an input of this job", path.display()))
    }
}

fn check_stamped_range(
    path: &Path,
    stamp: InputStamp,
    now: InputStamp,
    offset: u64,
    len: Option<u64>,
) -> Result<u64, String> {
    if now != stamp {
        return Err(format!(
            "input {} changed since the job started (size {} then, {} now, or a new \
             modification time): restart the job to read it again",
            path.display(),
            stamp.len,
            now.len
        ));
    }
    let end = match len {
        Some(len) => offset.checked_add(len).filter(|&end| end <= stamp.len),
        None => Some(stamp.len).filter(|&end| end >= offset),
    };
    end.ok_or_else(|| {
        format!(
            "range at offset {offset} ({len:?} bytes) is beyond input {} ({} bytes)",
            path.display(),
            stamp.len
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(role: Role, id: u64) -> Hello {
        Hello::new(role, id)
    }

    #[test]
    fn handshakes_of_another_job_or_role_are_refused() {
        assert_eq!(
            shuffle_hello_refusal(&hello(Role::Shuffle, 7), 7, "worker"),
            None
        );
        let other = shuffle_hello_refusal(&hello(Role::Shuffle, 8), 7, "worker").unwrap();
        assert!(
            other.contains("does not match this worker's job"),
            "{other}"
        );
        // No job yet: everyone is refused.
        assert!(shuffle_hello_refusal(&hello(Role::Shuffle, 7), 0, "worker").is_some());
        let role = shuffle_hello_refusal(&hello(Role::Client, 7), 7, "coordinator").unwrap();
        assert!(role.contains("not a shuffle connection"), "{role}");
    }

    #[test]
    fn the_table_serves_keys_and_once_entries_once() {
        let table = FileTable::default();
        assert_eq!(table.job_id(), 0);
        table.set_job_id(3);
        assert_eq!(table.job_id(), 3);
        let map = FileKey::MapOutput {
            map_task: 1,
            attempt: 0,
            partition: 2,
        };
        let out = FileKey::ReduceOutput {
            reduce_task: 0,
            attempt: 1,
        };
        table.insert(map, PathBuf::from("/w/m"));
        table.insert_once(out, PathBuf::from("/w/r/out"), PathBuf::from("/w/r"));
        assert_eq!(
            table.take_for_serving(&map),
            Some((PathBuf::from("/w/m"), None))
        );
        assert_eq!(table.get(&map), Some(PathBuf::from("/w/m")));
        assert_eq!(
            table.take_for_serving(&out),
            Some((PathBuf::from("/w/r/out"), Some(PathBuf::from("/w/r"))))
        );
        assert_eq!(
            table.take_for_serving(&out),
            None,
            "a reduce output is served once"
        );
        table.remove(&map);
        assert_eq!(table.get(&map), None);
        table.insert(map, PathBuf::from("/w/m"));
        table.clear();
        assert_eq!(table.get(&map), None);
    }

    #[test]
    fn ranges_must_lie_in_an_unchanged_input() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, vec![b'x'; 100]).unwrap();
        let inputs = InputFiles::snapshot(std::slice::from_ref(&input)).unwrap();
        let meta = std::fs::metadata(&input).unwrap();
        assert_eq!(inputs.check_range(&input, 10, Some(20), &meta), Ok(30));
        assert_eq!(inputs.check_range(&input, 40, None, &meta), Ok(100));
        assert_eq!(inputs.check_range(&input, 100, Some(0), &meta), Ok(100));
        for (offset, len) in [(90, Some(20)), (u64::MAX, Some(2)), (101, None)] {
            let e = inputs.check_range(&input, offset, len, &meta).unwrap_err();
            assert!(e.contains("beyond input"), "{e}");
        }
        let e = inputs.check_input(Path::new("/etc/passwd")).unwrap_err();
        assert!(e.contains("is not an input of this job"), "{e}");
        assert!(inputs.check_input(&input).is_ok());
        let stamp = InputStamp::of(&meta);
        let grown = InputStamp { len: 104, ..stamp };
        let e = check_stamped_range(&input, stamp, grown, 0, Some(10)).unwrap_err();
        assert!(e.contains("changed since the job started"), "{e}");
    }
}
