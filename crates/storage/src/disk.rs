//! The file operations storage needs, behind a small trait so the same code runs on a real
//! directory ([`StdDisk`]) and on simulated disks ([`MemDisk`] here; the simulator's disk via
//! glue, see `docs/raft.md`).
//!
//! The namespace is flat: one directory per node, files named by `&str`.

use std::collections::BTreeMap;

/// A failed file operation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No file of that name.
    #[error("{op} {name}: no such file")]
    NotFound {
        /// The operation.
        op: &'static str,
        /// The file.
        name: String,
    },
    /// A simulated disk refused.
    #[error("{op} {name}: {reason}")]
    Other {
        /// The operation.
        op: &'static str,
        /// The file.
        name: String,
        /// Why.
        reason: String,
    },
    /// Another process holds the directory's lock ([`Disk::lock`]).
    #[error("data directory {dir} is in use by {}", holder_text(*.pid))]
    Locked {
        /// The directory.
        dir: String,
        /// The holder's pid as recorded in its [`LOCK_FILE`], if readable (informative only:
        /// the lock is the kernel's flock, not the file's content).
        pid: Option<u32>,
    },
    /// The operating system refused. The cause is the error's `source()`, not repeated in its
    /// message: `{:#}` of an `anyhow` chain would print it twice.
    #[error("{op} {name}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "another process".into(),
    }
}

/// The file [`StdDisk::lock`] holds an exclusive `flock` on, for as long as the disk lives; it
/// contains the holder's pid (for the error message only). It is never removed: removing a
/// lock file races with a process that just opened it, and a stale one is harmless (the
/// kernel drops a flock when its holder exits, even by SIGKILL). Not listed by
/// [`Disk::list`]: the storage never sees it.
pub const LOCK_FILE: &str = "LOCK";

/// File operations with explicit durability: writes are visible at once and durable only after
/// [`Disk::sync`] of the file (data) and [`Disk::sync_dir`] (names: create, rename, remove).
pub trait Disk {
    /// Names of all files.
    fn list(&self) -> Result<Vec<String>, DiskError>;
    /// The whole content of a file, or `None` if it does not exist.
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, DiskError>;
    /// A reader of a file's content from its start, or `None` if it does not exist: how a
    /// large file (a snapshot) is read without holding it whole. The default reads it whole
    /// (simulated disks hold their files in memory anyway); a real disk streams it.
    fn open_read(&self, name: &str) -> Result<Option<Box<dyn std::io::Read + Send>>, DiskError> {
        Ok(self
            .read(name)?
            .map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn std::io::Read + Send>))
    }
    /// Creates an empty file, replacing any file of that name.
    fn create(&mut self, name: &str) -> Result<(), DiskError>;
    /// Appends bytes to an existing file.
    fn append(&mut self, name: &str, bytes: &[u8]) -> Result<(), DiskError>;
    /// Cuts a file to `len` bytes.
    fn truncate(&mut self, name: &str, len: u64) -> Result<(), DiskError>;
    /// Renames a file, atomically replacing `to`.
    fn rename(&mut self, from: &str, to: &str) -> Result<(), DiskError>;
    /// Removes a file (no error if it does not exist).
    fn remove(&mut self, name: &str) -> Result<(), DiskError>;
    /// Makes a file's data durable (fsync).
    fn sync(&mut self, name: &str) -> Result<(), DiskError>;
    /// Makes the directory's names durable (fsync of the directory).
    fn sync_dir(&mut self) -> Result<(), DiskError>;
    /// Releases whatever the disk keeps open for a file it will not write again soon (a hint:
    /// the file and its content stay). A file written once through a second handle, such as a
    /// snapshot prepared on another thread, is closed so the handle holds no descriptor for it.
    fn close(&mut self, name: &str) {
        let _ = name;
    }
    /// Takes an exclusive lock on the directory for as long as this disk lives, so that no
    /// second process uses it at once (fails with [`DiskError::Locked`]). Taking it again
    /// through the same disk is a no-op. [`crate::DurableStorage::open`] calls it first, so
    /// every owner of a data directory gets the lock. A simulated disk has nothing to lock.
    fn lock(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    /// How messages name this disk: a real directory's path.
    fn location(&self) -> String {
        "the data directory".into()
    }
}

/// Buffer of a [`StdDisk::open_read`] reader (256 KiB).
const STREAM_READ_BUFFER_BYTES: usize = 256 * 1024;

/// A real directory through `std::fs`.
///
/// Several `StdDisk`s may use the same directory (e.g. one per thread) as long as no two
/// write the same file at once: each keeps its own handles of the files it appends to, which
/// `create`, `rename`, `remove` and `close` drop for the names involved.
pub struct StdDisk {
    dir: std::path::PathBuf,
    /// Open handles of files being appended to, kept to avoid reopening per write.
    open: BTreeMap<String, std::fs::File>,
    /// The [`LOCK_FILE`], flocked, once [`Disk::lock`] succeeded; closing it releases the lock.
    lock: Option<std::fs::File>,
}

impl StdDisk {
    /// Uses (and creates if needed) `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Result<StdDisk, DiskError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| DiskError::Io {
            op: "create dir",
            name: dir.display().to_string(),
            source,
        })?;
        Ok(StdDisk {
            dir,
            open: BTreeMap::new(),
            lock: None,
        })
    }

    /// If `name` is a large file, a second name (hard link) for it that keeps its blocks
    /// allocated once `name` is replaced; `None` if it is small, missing, or cannot be linked.
    fn doomed_link(&self, name: &str) -> Option<std::path::PathBuf> {
        let path = self.dir.join(name);
        if !is_large(&path) {
            return None;
        }
        let doomed = self.dir.join(doomed_name(name));
        std::fs::hard_link(&path, &doomed).ok().map(|()| doomed)
    }

    /// Files this disk keeps a handle of.
    #[cfg(test)]
    pub(crate) fn open_handles(&self) -> usize {
        self.open.len()
    }

    fn io(op: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> DiskError {
        let name = name.to_string();
        move |source| DiskError::Io { op, name, source }
    }

    fn handle(&mut self, op: &'static str, name: &str) -> Result<&mut std::fs::File, DiskError> {
        if !self.open.contains_key(name) {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(self.dir.join(name))
                .map_err(|source| {
                    if source.kind() == std::io::ErrorKind::NotFound {
                        DiskError::NotFound {
                            op,
                            name: name.to_string(),
                        }
                    } else {
                        DiskError::Io {
                            op,
                            name: name.to_string(),
                            source,
                        }
                    }
                })?;
            self.open.insert(name.to_string(), f);
        }
        Ok(self.open.get_mut(name).expect("just inserted"))
    }
}

impl Disk for StdDisk {
    fn list(&self) -> Result<Vec<String>, DiskError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(Self::io("list", "."))?;
        for e in rd {
            let e = e.map_err(Self::io("list", "."))?;
            if let Some(n) = e.file_name().to_str() {
                if n != LOCK_FILE {
                    out.push(n.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, DiskError> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DiskError::Io {
                op: "read",
                name: name.to_string(),
                source,
            }),
        }
    }

    fn open_read(&self, name: &str) -> Result<Option<Box<dyn std::io::Read + Send>>, DiskError> {
        match std::fs::File::open(self.dir.join(name)) {
            Ok(f) => Ok(Some(Box::new(std::io::BufReader::with_capacity(
                STREAM_READ_BUFFER_BYTES,
                f,
            )))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DiskError::Io {
                op: "open",
                name: name.to_string(),
                source,
            }),
        }
    }

    fn create(&mut self, name: &str) -> Result<(), DiskError> {
        self.open.remove(name);
        std::fs::File::create(self.dir.join(name)).map_err(Self::io("create", name))?;
        Ok(())
    }

    fn append(&mut self, name: &str, bytes: &[u8]) -> Result<(), DiskError> {
        use std::io::Write;
        self.handle("append", name)?
            .write_all(bytes)
            .map_err(Self::io("append", name))
    }

    fn truncate(&mut self, name: &str, len: u64) -> Result<(), DiskError> {
        self.handle("truncate", name)?
            .set_len(len)
            .map_err(Self::io("truncate", name))
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), DiskError> {
        self.open.remove(from);
        self.open.remove(to);
        // Replacing a large file would free its blocks inside the rename: keep them linked
        // under a doomed name and free them on another thread (see `reap_later`).
        let doomed = self.doomed_link(to);
        std::fs::rename(self.dir.join(from), self.dir.join(to))
            .map_err(Self::io("rename", from))?;
        if let Some(path) = doomed {
            reap_later(path);
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<(), DiskError> {
        self.open.remove(name);
        let path = self.dir.join(name);
        if is_large(&path) {
            let doomed = self.dir.join(doomed_name(name));
            if std::fs::rename(&path, &doomed).is_ok() {
                reap_later(doomed);
                return Ok(());
            }
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DiskError::Io {
                op: "remove",
                name: name.to_string(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn sync(&mut self, name: &str) -> Result<(), DiskError> {
        self.handle("sync", name)?
            .sync_data()
            .map_err(Self::io("sync", name))
    }

    fn sync_dir(&mut self) -> Result<(), DiskError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io("sync dir", "."))
    }

    fn close(&mut self, name: &str) {
        self.open.remove(name);
    }

    /// `flock(LOCK_EX | LOCK_NB)` on [`LOCK_FILE`], as etcd flocks its WAL: the kernel releases
    /// it when the process exits however it exits, so a crashed owner never blocks a restart,
    /// and it belongs to this open file, so other `StdDisk`s of the directory in this process
    /// (a snapshot thread's) neither take nor need it. Through `libc` (already a dependency of
    /// the workspace) rather than `std::fs::File::try_lock`, which needs Rust 1.89 (the
    /// workspace supports 1.85), or `fs2`, which is unmaintained.
    fn lock(&mut self) -> Result<(), DiskError> {
        if self.lock.is_some() {
            return Ok(());
        }
        let path = self.dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Self::io("lock", LOCK_FILE))?;
        if !try_flock(&file).map_err(Self::io("lock", LOCK_FILE))? {
            use std::io::Read as _;
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(DiskError::Locked {
                dir: self.dir.display().to_string(),
                pid,
            });
        }
        // Ours now: record our pid for the message a second process prints.
        use std::io::Write as _;
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(Self::io("lock", LOCK_FILE))?;
        self.lock = Some(file);
        Ok(())
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Tries `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` if another open file holds a lock on it.
#[cfg(unix)]
fn try_flock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd as _;
    loop {
        // SAFETY: flock(2) on a descriptor `file` owns and keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// No `flock` here: the directory is not locked.
#[cfg(not(unix))]
fn try_flock(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true)
}

/// Files at least this large are freed off the caller's thread (`reap_later`).
const REAP_LATER_BYTES: u64 = 1 << 20;

/// Freeing a large file is slow, and worse, slows everyone's fsyncs: unlinking takes 11 ms
/// for a 30 MB snapshot and 24 ms for a 64 MB segment on this project's test machine (ext4
/// mounted with `discard`), and the discards of the freed blocks then ride on the next
/// journal commit, so an fsync of the log right after unlinking 89 MB took 34–40 ms instead
/// of 0.3 (`docs/benchmarks.md`). The KV server calls `rename` and `remove` from its loop.
/// So `StdDisk` renames a large file it removes (or hard-links one a rename replaces) to a
/// name ending in `.tmp` — a directory entry, no freeing — and a short-lived thread frees it
/// gradually, as RocksDB's delete scheduler does: it makes that rename durable, then cuts the
/// file 4 MiB at a time with a pause in between (worst log fsync meanwhile: 3 ms), then
/// unlinks it. The original name is gone exactly as before (durably after `sync_dir`); a crash
/// before the end leaves a `*.tmp` file, which `DurableStorage::open` removes. Nothing in the
/// standard library or a well-kept crate does this, hence this.
fn reap_later(path: std::path::PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("shoal-reap".into())
        .spawn({
            let path = path.clone();
            move || {
                if let Err(e) = free_gradually(&path) {
                    tracing::warn!(file = %path.display(), error = %e,
                        "could not remove a replaced file");
                }
            }
        });
    if spawned.is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// Keeps an open file whole while it is held: a large file the storage replaces or removes
/// is normally cut down gradually in place (see `reap_later`), which a reader of the same file
/// through another handle (the snapshot stream, sending the snapshot file) would see shrink
/// under it. A pinned file is only unlinked; its blocks are freed when the last handle closes.
/// A pin taken after cutting began stops it; the reader then sees a file shorter than its
/// header says and must open the new one.
#[derive(Debug)]
pub struct FilePin {
    key: (u64, u64),
}

static PINNED: std::sync::Mutex<BTreeMap<(u64, u64), usize>> =
    std::sync::Mutex::new(BTreeMap::new());

fn pins() -> std::sync::MutexGuard<'static, BTreeMap<(u64, u64), usize>> {
    match PINNED.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn file_key(file: &std::fs::File) -> std::io::Result<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok((m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok((0, 0))
    }
}

impl FilePin {
    /// Pins the file `file` is open on, until the pin is dropped.
    pub fn new(file: &std::fs::File) -> std::io::Result<FilePin> {
        let key = file_key(file)?;
        *pins().entry(key).or_insert(0) += 1;
        Ok(FilePin { key })
    }

    fn is_pinned(file: &std::fs::File) -> bool {
        file_key(file).is_ok_and(|k| pins().contains_key(&k))
    }
}

impl Drop for FilePin {
    fn drop(&mut self) {
        let mut pins = pins();
        if let Some(n) = pins.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

/// Bytes cut per step when freeing a large file, and the pause after each.
const REAP_STEP_BYTES: u64 = 4 << 20;
const REAP_STEP_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

fn free_gradually(path: &std::path::Path) -> std::io::Result<()> {
    // The doomed name must be durable before the data goes: after a crash the file is either
    // whole under its old name or (cut or not) under the `.tmp` name, never cut under the old.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > REAP_STEP_BYTES {
        // A reader still sends this file (a snapshot stream): cutting it would cut what it
        // reads. Only unlink it; its blocks go when the reader closes it.
        if FilePin::is_pinned(&file) {
            break;
        }
        len -= REAP_STEP_BYTES;
        file.set_len(len)?;
        std::thread::sleep(REAP_STEP_PAUSE);
    }
    drop(file);
    std::fs::remove_file(path)
}

fn is_large(path: &std::path::Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() >= REAP_LATER_BYTES)
}

/// A unique name (within the process) for a file about to be freed.
fn doomed_name(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}.{}-{n}.doomed.tmp", std::process::id())
}

#[derive(Debug, Clone, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link(String, u64),
    Rename(String, String),
    Unlink(String),
}

/// An in-memory disk with crash semantics, for tests: data is durable only once synced, names
/// only once the directory is synced, and a crash loses the rest — optionally keeping a prefix
/// of the unsynced directory operations (in order) and a torn prefix of unsynced appended bytes.
#[derive(Debug, Clone, Default)]
pub struct MemDisk {
    inodes: BTreeMap<u64, Inode>,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    /// Directory operations since the last directory sync, oldest first.
    dir_ops: Vec<DirOp>,
    next_ino: u64,
    /// fsyncs issued (files and directory), for group-commit tests.
    pub syncs: u64,
}

impl MemDisk {
    /// An empty disk.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    fn ino(&self, op: &'static str, name: &str) -> Result<u64, DiskError> {
        self.names.get(name).copied().ok_or(DiskError::NotFound {
            op,
            name: name.to_string(),
        })
    }

    /// Simulates power loss that keeps no unsynced directory operation. `keep_unsynced(file,
    /// n)` says how many of the `n` unsynced bytes appended after a file's durable content
    /// survive (0 = lose all; a partial count is a torn write).
    pub fn crash(&mut self, keep_unsynced: impl FnMut(&str, usize) -> usize) {
        self.crash_keeping(0, keep_unsynced);
    }

    /// Like [`MemDisk::crash`], but the first `keep_dir_ops` unsynced directory operations
    /// (create, rename, remove) survive, in order.
    pub fn crash_keeping(
        &mut self,
        keep_dir_ops: usize,
        mut keep_unsynced: impl FnMut(&str, usize) -> usize,
    ) {
        let mut names = self.durable_names.clone();
        for op in self.dir_ops.drain(..).take(keep_dir_ops) {
            match op {
                DirOp::Link(n, i) => {
                    names.insert(n, i);
                }
                DirOp::Rename(from, to) => {
                    if let Some(i) = names.remove(&from) {
                        names.insert(to, i);
                    }
                }
                DirOp::Unlink(n) => {
                    names.remove(&n);
                }
            }
        }
        self.names = names.clone();
        self.durable_names = names;
        let live: BTreeMap<u64, String> = self.names.iter().map(|(n, &i)| (i, n.clone())).collect();
        self.inodes.retain(|i, _| live.contains_key(i));
        for (ino, inode) in self.inodes.iter_mut() {
            let name = &live[ino];
            let d = &inode.durable;
            let extra = if inode.data.len() > d.len() && inode.data.starts_with(d) {
                let n = inode.data.len() - d.len();
                keep_unsynced(name, n).min(n)
            } else {
                0
            };
            let mut data = d.clone();
            data.extend_from_slice(&inode.data[d.len()..d.len() + extra]);
            inode.data = data.clone();
            inode.durable = data;
        }
    }

    /// Unsynced directory operations pending.
    pub fn unsynced_dir_ops(&self) -> usize {
        self.dir_ops.len()
    }

    /// Flips a byte of a file (durably), to test corruption detection.
    pub fn corrupt(&mut self, name: &str, offset: usize) {
        if let Some(&i) = self.names.get(name) {
            let inode = self.inodes.get_mut(&i).expect("inode");
            inode.data[offset] ^= 0x5a;
            inode.durable = inode.data.clone();
        }
    }
}

impl Disk for MemDisk {
    fn list(&self) -> Result<Vec<String>, DiskError> {
        Ok(self.names.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, DiskError> {
        Ok(self.names.get(name).map(|i| self.inodes[i].data.clone()))
    }

    fn create(&mut self, name: &str) -> Result<(), DiskError> {
        self.next_ino += 1;
        self.inodes.insert(self.next_ino, Inode::default());
        self.names.insert(name.to_string(), self.next_ino);
        self.dir_ops
            .push(DirOp::Link(name.to_string(), self.next_ino));
        Ok(())
    }

    fn append(&mut self, name: &str, bytes: &[u8]) -> Result<(), DiskError> {
        let i = self.ino("append", name)?;
        self.inodes
            .get_mut(&i)
            .expect("inode")
            .data
            .extend_from_slice(bytes);
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> Result<(), DiskError> {
        let i = self.ino("truncate", name)?;
        self.inodes
            .get_mut(&i)
            .expect("inode")
            .data
            .truncate(len as usize);
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), DiskError> {
        let i = self.ino("rename", from)?;
        self.names.remove(from);
        self.names.insert(to.to_string(), i);
        self.dir_ops
            .push(DirOp::Rename(from.to_string(), to.to_string()));
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<(), DiskError> {
        if self.names.remove(name).is_some() {
            self.dir_ops.push(DirOp::Unlink(name.to_string()));
        }
        Ok(())
    }

    fn sync(&mut self, name: &str) -> Result<(), DiskError> {
        let i = self.ino("sync", name)?;
        let inode = self.inodes.get_mut(&i).expect("inode");
        inode.durable = inode.data.clone();
        self.syncs += 1;
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), DiskError> {
        self.durable_names = self.names.clone();
        self.dir_ops.clear();
        self.syncs += 1;
        Ok(())
    }
}

/// The simulator's disk (feature `sim`). Its fsyncs are asynchronous events of the simulation
/// (`Ctx::fsync`), but the storage needs a barrier (an atomic replace must not rename before
/// the data is durable), so `sync`/`sync_dir` make everything durable at once with
/// `SimDisk::sync_all_now`. Crash coverage comes from the driver: it writes on every event and
/// syncs on a group-commit timer, so crashes in between lose or tear unsynced writes. Model
/// fsync latency by delaying the acknowledgement (see `docs/raft.md`).
#[cfg(feature = "sim")]
impl Disk for shoal_sim::SimDisk {
    fn list(&self) -> Result<Vec<String>, DiskError> {
        Ok(shoal_sim::SimDisk::list(self))
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, DiskError> {
        if !self.exists(name) {
            return Ok(None);
        }
        self.read_all(name)
            .map(Some)
            .map_err(|e| sim_err("read", name, e))
    }

    fn create(&mut self, name: &str) -> Result<(), DiskError> {
        if self.exists(name) {
            shoal_sim::SimDisk::remove(self, name).map_err(|e| sim_err("create", name, e))?;
        }
        shoal_sim::SimDisk::create(self, name).map_err(|e| sim_err("create", name, e))
    }

    fn append(&mut self, name: &str, bytes: &[u8]) -> Result<(), DiskError> {
        shoal_sim::SimDisk::append(self, name, bytes)
            .map(|_| ())
            .map_err(|e| sim_err("append", name, e))
    }

    fn truncate(&mut self, name: &str, len: u64) -> Result<(), DiskError> {
        shoal_sim::SimDisk::truncate(self, name, len).map_err(|e| sim_err("truncate", name, e))
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), DiskError> {
        shoal_sim::SimDisk::rename(self, from, to).map_err(|e| sim_err("rename", from, e))
    }

    fn remove(&mut self, name: &str) -> Result<(), DiskError> {
        if !self.exists(name) {
            return Ok(());
        }
        shoal_sim::SimDisk::remove(self, name).map_err(|e| sim_err("remove", name, e))
    }

    fn sync(&mut self, _name: &str) -> Result<(), DiskError> {
        self.sync_all_now();
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), DiskError> {
        self.sync_all_now();
        Ok(())
    }
}

#[cfg(feature = "sim")]
fn sim_err(op: &'static str, name: &str, e: shoal_sim::DiskError) -> DiskError {
    match e {
        shoal_sim::DiskError::NotFound(_) => DiskError::NotFound {
            op,
            name: name.to_string(),
        },
        other => DiskError::Other {
            op,
            name: name.to_string(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod std_disk_tests {
    use super::*;

    fn files(disk: &StdDisk) -> Vec<String> {
        let mut names = disk.list().unwrap();
        names.sort();
        names
    }

    /// Waits (up to ~10 s) for the reaper threads to free every doomed file.
    fn until_reaped(disk: &StdDisk) -> Vec<String> {
        for _ in 0..1000 {
            let names = files(disk);
            if !names.iter().any(|n| n.ends_with(".doomed.tmp")) {
                return names;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        files(disk)
    }

    /// Large files removed or replaced are freed on another thread, with the same visible
    /// result as an unlink: the name is gone (or holds the new content) at once, and the
    /// doomed name disappears soon after. Small files take the direct path.
    #[test]
    fn large_files_are_freed_off_the_callers_thread_with_the_same_result() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = StdDisk::new(dir.path()).unwrap();
        let big = vec![7u8; REAP_LATER_BYTES as usize + 1];
        for name in ["a", "b", "c"] {
            disk.create(name).unwrap();
            disk.append(name, &big).unwrap();
        }
        disk.create("small").unwrap();
        disk.append("small", b"x").unwrap();
        disk.create("new").unwrap();
        disk.append("new", b"fresh").unwrap();

        disk.remove("a").unwrap();
        assert_eq!(disk.read("a").unwrap(), None);
        disk.rename("new", "b").unwrap();
        assert_eq!(disk.read("b").unwrap().unwrap(), b"fresh");
        disk.remove("small").unwrap();
        disk.remove("missing").unwrap();
        disk.sync_dir().unwrap();
        assert_eq!(until_reaped(&disk), vec!["b".to_string(), "c".to_string()]);
        assert_eq!(disk.read("c").unwrap().unwrap(), big);
    }
}
