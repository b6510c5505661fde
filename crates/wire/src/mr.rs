//! MapReduce messages: worker ↔ coordinator (control) and worker ↔ worker (shuffle).
//!
//! Every connection starts with a [`crate::Hello`] frame. A worker calls its coordinator with
//! [`crate::Role::Client`] and cluster id [`MR_CONTROL_CLUSTER_ID`], then exchanges
//! [`ToCoordinator`] / [`ToWorker`] frames on the same connection until the job ends. A reduce
//! worker (or the coordinator committing a reduce output) calls another worker's shuffle server
//! with [`crate::Role::Shuffle`] and the job id as cluster id, sends one [`ShuffleRequest`] and
//! reads [`ShuffleReply`] frames until `End` or `Error`. A worker that cannot open a map
//! input calls the coordinator's port the same way (role `Shuffle`, the job id) and sends
//! [`ShuffleRequest::FetchInput`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest control frame (coordinator ↔ worker), in bytes. The job description carries shipped
/// files (scripts of streaming apps), so this is generous; everything else is tiny.
pub const MR_CONTROL_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of file data carried by one [`ShuffleReply::Data`] frame.
pub const SHUFFLE_CHUNK_BYTES: usize = 1024 * 1024;

/// Largest shuffle frame, in bytes: one chunk plus room for its encoding.
pub const SHUFFLE_MAX_FRAME_BYTES: usize = SHUFFLE_CHUNK_BYTES + 4096;

/// Cluster id sent in the [`crate::Hello`] of a worker calling its coordinator: a worker does
/// not know the job id until the coordinator tells it in [`ToWorker::Welcome`].
pub const MR_CONTROL_CLUSTER_ID: u64 = 0x4d52; // "MR"

/// Map or reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskKind {
    /// A map task: one input split in, one sorted partition file per reduce task out.
    Map,
    /// A reduce task: partition `r` of every map task in, `mr-out-<r>` out.
    Reduce,
}

/// One execution of one task. Attempt numbers start at 0 and are never reused for a task, so
/// a late report of an abandoned attempt is recognised and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttemptRef {
    /// Map or reduce.
    pub kind: TaskKind,
    /// Task index: the map task (split) number or the reduce partition.
    pub task: u32,
    /// Attempt number of this task.
    pub attempt: u32,
}

/// A file shipped with the job to every worker (scripts of the streaming app).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedFileSpec {
    /// File name (no directories).
    pub name: String,
    /// Its bytes.
    pub contents: Vec<u8>,
    /// Whether to mark it executable.
    pub executable: bool,
}

/// Which app to run and its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// App name (`wordcount`, `indexer`, `grep`, `stream`, …).
    pub name: String,
    /// `grep`'s pattern.
    pub pattern: Option<String>,
    /// `stream`'s map command.
    pub mapper: Option<String>,
    /// `stream`'s reduce command.
    pub reducer: Option<String>,
    /// Files shipped to every worker.
    pub shipped: Vec<ShippedFileSpec>,
    /// `sort`'s record format and total-order partitioner.
    pub sort: Option<SortSpec>,
}

/// The `sort` app's parameters: how records are read, and the range partitioner built by the
/// coordinator from a sample of the input before the maps run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SortSpec {
    /// Record format: `lines` or `terasort`.
    pub format: String,
    /// R-1 (or fewer, when the sample has duplicates) ascending cut points: partition `i`
    /// holds the keys `k` with `cut_points[i-1] <= k < cut_points[i]`.
    pub cut_points: Vec<Vec<u8>>,
}

/// Everything a worker needs to know about the job, sent once on registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Random id of this job; shuffle connections must present it.
    pub job_id: u64,
    /// The app.
    pub app: AppSpec,
    /// Number of reduce tasks (partitions).
    pub reduces: u32,
    /// Memory budget of one task, in bytes (sort buffers before spilling).
    pub memory_bytes: u64,
    /// How often the worker must send a heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
}

/// A byte range of an input file, read by one map task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Input file, as the coordinator names it. A worker that cannot open it at this path
    /// fetches the range from the coordinator ([`ShuffleRequest::FetchInput`]).
    pub path: PathBuf,
    /// First byte of the split.
    pub offset: u64,
    /// Length of the split in bytes.
    pub len: u64,
}

/// Where the winning output of one map task can be fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapOutputLocation {
    /// The map task.
    pub map_task: u32,
    /// Its winning attempt.
    pub attempt: u32,
    /// The shuffle server (`host:port`) of the worker that ran it.
    pub shuffle_addr: String,
}

/// Worker → coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// First message after the handshake.
    Register {
        /// Human-readable name (host and pid), for logs and the status page.
        name: String,
        /// Address of this worker's shuffle server (`host:port`).
        shuffle_addr: String,
    },
    /// "I am alive." Sent every `heartbeat_interval_ms`, also while a task runs.
    Heartbeat,
    /// "Give me work." The coordinator answers when it has some (long poll).
    RequestTask,
    /// An attempt finished; its output is on this worker's shuffle server.
    TaskDone {
        /// Which attempt.
        attempt: AttemptRef,
        /// Its counters (records and bytes in and out, user counters).
        counters: BTreeMap<String, u64>,
    },
    /// An attempt failed (the app returned an error or panicked).
    TaskFailed {
        /// Which attempt.
        attempt: AttemptRef,
        /// What went wrong.
        error: String,
    },
    /// A reduce attempt could not fetch a map task's output; the attempt is abandoned.
    FetchFailed {
        /// The reduce attempt.
        attempt: AttemptRef,
        /// The map task whose output could not be fetched.
        map_task: u32,
        /// The map attempt that was asked for.
        map_attempt: u32,
        /// What went wrong.
        error: String,
    },
}

/// Coordinator → worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Registration accepted.
    Welcome {
        /// The id the coordinator gave this worker.
        worker_id: u64,
        /// The job.
        job: JobSpec,
    },
    /// The handshake or registration was refused; the connection will be closed.
    Refused {
        /// Why.
        reason: String,
    },
    /// Run a map task.
    Map {
        /// Which attempt (kind is `Map`).
        attempt: AttemptRef,
        /// Its input.
        split: SplitSpec,
    },
    /// Run a reduce task: fetch partition `attempt.task` from each location, then reduce.
    Reduce {
        /// Which attempt (kind is `Reduce`).
        attempt: AttemptRef,
        /// One location per map task.
        inputs: Vec<MapOutputLocation>,
    },
    /// The job is complete and all output is in place: exit.
    JobDone,
    /// The job failed: exit.
    JobFailed {
        /// Why (the task, its input and the error).
        reason: String,
    },
    /// Answer to a [`ToCoordinator::Heartbeat`]: the coordinator is alive (a worker that hears
    /// nothing for its coordinator timeout reconnects, then gives up).
    HeartbeatAck,
    /// This worker's attempt finished after another attempt of its task had won: its output
    /// will never be fetched, so delete it. (Appended last: every earlier message keeps its
    /// encoding.)
    Discard {
        /// The losing attempt.
        attempt: AttemptRef,
    },
}

/// A file a worker's shuffle server may serve. Only files of completed attempts are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FileKey {
    /// Partition `partition` of map attempt `attempt` of map task `map_task`.
    MapOutput {
        /// Map task.
        map_task: u32,
        /// Attempt.
        attempt: u32,
        /// Reduce partition.
        partition: u32,
    },
    /// The `mr-out-<reduce_task>` written by a reduce attempt, fetched by the coordinator to
    /// commit it.
    ReduceOutput {
        /// Reduce task.
        reduce_task: u32,
        /// Attempt.
        attempt: u32,
    },
}

/// Fetcher → shuffle server (one per connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShuffleRequest {
    /// Send this file.
    Fetch(FileKey),
    /// Send bytes `[offset, offset + len)` of job input `path` (to the end of the file when
    /// `len` is `None`: a gzip input, read whole), for a worker that cannot open the input
    /// itself. Only the coordinator answers it, and only for a file that is an input of its
    /// job, unchanged (size and modification time) since the job was planned. (Appended last:
    /// `Fetch` keeps its encoding.)
    FetchInput {
        /// The input path exactly as in the map task's [`SplitSpec`].
        path: PathBuf,
        /// First byte.
        offset: u64,
        /// Bytes wanted; `None`: to the end of the file.
        len: Option<u64>,
    },
}

/// Shuffle server → fetcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShuffleReply {
    /// The next chunk of the file (at most [`SHUFFLE_CHUNK_BYTES`]).
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The whole file was sent; `total_bytes` lets the fetcher check nothing was lost.
    End {
        /// Length of the file.
        total_bytes: u64,
    },
    /// The file is unknown or unreadable.
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame};

    #[test]
    fn messages_round_trip() {
        let attempt = AttemptRef {
            kind: TaskKind::Reduce,
            task: 3,
            attempt: 1,
        };
        let msgs = vec![
            ToWorker::Reduce {
                attempt,
                inputs: vec![MapOutputLocation {
                    map_task: 0,
                    attempt: 2,
                    shuffle_addr: "127.0.0.1:9".into(),
                }],
            },
            ToWorker::JobFailed { reason: "x".into() },
            ToWorker::Discard { attempt },
        ];
        for m in msgs {
            let mut buf = Vec::new();
            encode_frame(&m, MR_CONTROL_MAX_FRAME_BYTES, &mut buf).unwrap();
            let (d, _) = decode_frame::<ToWorker>(&buf, MR_CONTROL_MAX_FRAME_BYTES)
                .unwrap()
                .unwrap();
            assert_eq!(d, m);
        }
        let mut buf = Vec::new();
        let chunk = ShuffleReply::Data((0..SHUFFLE_CHUNK_BYTES).map(|i| i as u8).collect());
        encode_frame(&chunk, SHUFFLE_MAX_FRAME_BYTES, &mut buf).unwrap();
        let (d, _) = decode_frame::<ShuffleReply>(&buf, SHUFFLE_MAX_FRAME_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(d, chunk);
    }

    #[test]
    fn an_input_fetch_round_trips_and_fetch_keeps_its_encoding() {
        let key = FileKey::MapOutput {
            map_task: 1,
            attempt: 2,
            partition: 3,
        };
        // `Fetch` is variant 0, as before `FetchInput` was appended.
        assert_eq!(
            postcard::to_stdvec(&ShuffleRequest::Fetch(key)).unwrap()[0],
            0
        );
        for len in [Some(1 << 20), None] {
            let m = ShuffleRequest::FetchInput {
                path: PathBuf::from("in/a.txt"),
                offset: 7,
                len,
            };
            let mut buf = Vec::new();
            encode_frame(&m, SHUFFLE_MAX_FRAME_BYTES, &mut buf).unwrap();
            let (d, _) = decode_frame::<ShuffleRequest>(&buf, SHUFFLE_MAX_FRAME_BYTES)
                .unwrap()
                .unwrap();
            assert_eq!(d, m);
        }
    }

    #[test]
    fn raw_bytes_match_the_sequence_encoding() {
        #[derive(Serialize)]
        enum Plain {
            Data(Vec<u8>),
        }
        let data = vec![1u8, 2, 200, 0, 255];
        let fast = postcard::to_stdvec(&ShuffleReply::Data(data.clone())).unwrap();
        let plain = postcard::to_stdvec(&Plain::Data(data)).unwrap();
        assert_eq!(fast, plain);
    }
}
