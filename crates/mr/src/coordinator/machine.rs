//! The coordinator as one event machine: [`JobMachine::handle`] takes an [`Event`] (a worker's
//! connection opened, sent a message or closed; time passed; a winning reduce output was
//! fetched or placed) and returns the [`Action`]s the driver carries out, in order (send a
//! message on a connection, close one, fetch a reduce output, rename it into place, end the
//! job).
//!
//! It owns the [`Coordinator`] state machine, the job's wire description and the mapping from
//! connections to workers, and speaks the wire messages ([`ToCoordinator`], [`ToWorker`]), so
//! a driver is a thin loop: the tokio driver (`shoal_runtime::mr::run_job`) over TCP and real
//! files, and the simulator's (`shoal sim --workload mr`, in `shoal-lab`) over simulated links
//! and disks run the same code. No I/O, no clock (`now` is passed in), no threads; everything is kept in
//! `BTreeMap`s, so the same events give the same actions.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_wire::mr::{AttemptRef, JobSpec, SplitSpec, ToCoordinator, ToWorker};

use super::core::{attempt_name, CommitError, Coordinator, CoordinatorConfig, Output, WorkerId};

/// A connection from a worker, numbered by the driver (never reused within a job).
pub type ConnId = u64;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A worker's connection completed its handshake.
    Connected {
        /// The connection.
        conn: ConnId,
    },
    /// A message arrived on a connection.
    Message {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ToCoordinator,
    },
    /// A connection closed (either side, or it broke).
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// Time passed (every 100 ms in the tokio driver, `shoal_runtime::mr::TICK_INTERVAL`):
    /// timeouts, duplicates.
    Tick,
    /// The output of a winning reduce attempt, asked for by [`Action::Fetch`], is in the output
    /// directory under its temporary name and durable (`Ok`), or could not be fetched.
    Fetched {
        /// The reduce attempt.
        attempt: AttemptRef,
        /// Whether the temporary file is in place.
        result: Result<(), CommitError>,
    },
    /// The rename asked for by [`Action::Place`] was done (and the directory synced), or
    /// failed (the driver removed the temporary file).
    Placed {
        /// The reduce attempt.
        attempt: AttemptRef,
        /// Whether `mr-out-<r>` is in place.
        result: Result<(), CommitError>,
    },
}

/// How the job ended, for [`Action::Finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// Every `mr-out-<r>` is in place.
    Done,
    /// A task failed `max_attempts` times.
    TaskFailed {
        /// Its last attempt.
        attempt: AttemptRef,
        /// The last error.
        error: String,
    },
    /// A commit failed in a way no retry can fix.
    Aborted {
        /// The reduce attempt whose output could not be committed.
        attempt: AttemptRef,
        /// The error (names the output directory and what to do).
        error: String,
    },
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `msg` on `conn` (if the connection is gone or its queue is full, close it: its
    /// [`Event::Closed`] makes the worker lost).
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ToWorker,
    },
    /// Close `conn` (its worker was declared lost, or it misbehaved). No [`Event::Closed`] is
    /// needed for it, and one is ignored.
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Fetch the output of the winning reduce `attempt` from the shuffle server at
    /// `shuffle_addr` into the output directory under a temporary name, make it durable, and
    /// report [`Event::Fetched`].
    Fetch {
        /// The reduce attempt.
        attempt: AttemptRef,
        /// The worker's shuffle server.
        shuffle_addr: String,
    },
    /// Rename the fetched temporary file of `attempt` to `mr-out-<attempt.task>`, sync the
    /// directory, and report [`Event::Placed`] (on failure, remove the temporary file first).
    Place {
        /// The reduce attempt.
        attempt: AttemptRef,
    },
    /// Remove the fetched temporary file of `attempt`: another attempt won meanwhile, or the
    /// output is already committed.
    RemoveFetched {
        /// The reduce attempt.
        attempt: AttemptRef,
    },
    /// The job ended: tell every open connection ([`ToWorker::JobDone`] or
    /// [`ToWorker::JobFailed`]; they close after it), stop the fetches still running, remove
    /// temporary files (and, if the job failed, the outputs it committed) and end with `end`.
    Finish {
        /// How the job ended.
        end: JobEnd,
    },
}

/// The coordinator of one job with its connections: see the module docs.
#[derive(Debug)]
pub struct JobMachine {
    core: Coordinator,
    spec: JobSpec,
    splits: Vec<SplitSpec>,
    /// Open connections and the worker each registered, if any.
    conns: BTreeMap<ConnId, Option<WorkerId>>,
    by_worker: BTreeMap<WorkerId, ConnId>,
    ended: Option<JobEnd>,
}

impl JobMachine {
    /// A job of one map task per split and `config.reduces` reduce tasks; `spec` is what every
    /// worker receives on registration.
    pub fn new(config: CoordinatorConfig, spec: JobSpec, splits: Vec<SplitSpec>) -> Self {
        assert_eq!(config.maps as usize, splits.len(), "one map task per split");
        JobMachine {
            core: Coordinator::new(config),
            spec,
            splits,
            conns: BTreeMap::new(),
            by_worker: BTreeMap::new(),
            ended: None,
        }
    }

    /// The state machine (status snapshots, counters, progress).
    pub fn core(&self) -> &Coordinator {
        &self.core
    }

    /// How the job ended, once it has.
    pub fn ended(&self) -> Option<&JobEnd> {
        self.ended.as_ref()
    }

    /// The open connections, in order.
    pub fn connections(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns.keys().copied()
    }

    /// Handles one event at time `now` (monotonic, from the driver's start) and returns what
    /// the driver must do, in order. After [`Action::Finish`], every event is ignored.
    pub fn handle(&mut self, now: Duration, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.ended.is_some() {
            return actions;
        }
        match event {
            Event::Connected { conn } => {
                self.conns.insert(conn, None);
            }
            Event::Closed { conn } => {
                if let Some(Some(w)) = self.conns.remove(&conn) {
                    self.by_worker.remove(&w);
                    self.core.worker_lost(now, w);
                }
            }
            Event::Message { conn, msg } => self.message(now, conn, msg, &mut actions),
            Event::Tick => self.core.tick(now),
            Event::Fetched {
                attempt,
                result: Ok(()),
            } => {
                // The rename happens only if this attempt is still the winner: a superseded
                // attempt's output never reaches `mr-out-<r>`.
                actions.push(if self.core.awaiting_commit(attempt) {
                    Action::Place { attempt }
                } else {
                    Action::RemoveFetched { attempt }
                });
            }
            Event::Fetched {
                attempt,
                result: Err(e),
            }
            | Event::Placed {
                attempt,
                result: Err(e),
            } => {
                // (The state machine logs it, once.)
                self.core.commit_done(now, attempt, Err(e));
            }
            Event::Placed {
                attempt,
                result: Ok(()),
            } => {
                self.core.commit_done(now, attempt, Ok(()));
            }
        }
        self.drain(&mut actions);
        actions
    }

    fn message(
        &mut self,
        now: Duration,
        conn: ConnId,
        msg: ToCoordinator,
        actions: &mut Vec<Action>,
    ) {
        let Some(worker) = self.conns.get(&conn).copied() else {
            return;
        };
        match (worker, msg) {
            (None, ToCoordinator::Register { name, shuffle_addr }) => {
                let w = self.core.register_worker(now, &name, &shuffle_addr);
                self.conns.insert(conn, Some(w));
                self.by_worker.insert(w, conn);
                actions.push(Action::Send {
                    conn,
                    msg: ToWorker::Welcome {
                        worker_id: w.0,
                        job: self.spec.clone(),
                    },
                });
            }
            (None, other) => {
                tracing::warn!(conn, ?other, "message before registration: closing");
                self.close(conn, actions);
            }
            (Some(_), ToCoordinator::Register { .. }) => {
                tracing::warn!(conn, "second registration: closing");
                self.close(conn, actions);
            }
            (Some(w), ToCoordinator::Heartbeat) => {
                if !self.core.heard_from(now, w) {
                    self.close(conn, actions);
                }
            }
            (Some(w), ToCoordinator::RequestTask) => self.core.request_task(now, w),
            (Some(w), ToCoordinator::TaskDone { attempt, counters }) => {
                let d = self.core.task_done(now, w, attempt, counters);
                tracing::debug!(%w, attempt = %attempt_name(attempt), ?d, "done");
            }
            (Some(w), ToCoordinator::TaskFailed { attempt, error }) => {
                self.core.task_failed(now, w, attempt, &error);
            }
            (
                Some(w),
                ToCoordinator::FetchFailed {
                    attempt,
                    map_task,
                    map_attempt,
                    error,
                },
            ) => {
                tracing::warn!(%w, attempt = %attempt_name(attempt), map_task, map_attempt, %error, "fetch failed");
                self.core
                    .fetch_failed(now, w, attempt, map_task, map_attempt);
            }
        }
    }

    /// Forgets `conn` (its worker, if any, is not declared lost by this: it will be when it
    /// stays silent for the task timeout, as a worker whose connection broke is).
    fn close(&mut self, conn: ConnId, actions: &mut Vec<Action>) {
        if self.conns.remove(&conn).is_some() {
            actions.push(Action::Close { conn });
        }
    }

    /// Turns the state machine's outputs into actions, in order.
    fn drain(&mut self, actions: &mut Vec<Action>) {
        while let Some(output) = self.core.poll_output() {
            let end = match output {
                Output::AssignMap { worker, attempt } => {
                    let split = self.splits[attempt.task as usize].clone();
                    self.send(worker, ToWorker::Map { attempt, split }, actions);
                    continue;
                }
                Output::AssignReduce {
                    worker,
                    attempt,
                    inputs,
                } => {
                    self.send(worker, ToWorker::Reduce { attempt, inputs }, actions);
                    continue;
                }
                Output::Commit {
                    attempt,
                    worker,
                    shuffle_addr,
                } => {
                    tracing::debug!(attempt = %attempt_name(attempt), %worker, "committing");
                    actions.push(Action::Fetch {
                        attempt,
                        shuffle_addr,
                    });
                    continue;
                }
                Output::Discard { worker, attempt } => {
                    self.send(worker, ToWorker::Discard { attempt }, actions);
                    continue;
                }
                Output::Disconnect { worker } => {
                    if let Some(conn) = self.by_worker.remove(&worker) {
                        self.close(conn, actions);
                    }
                    continue;
                }
                Output::JobDone => JobEnd::Done,
                Output::JobFailed { attempt, error } => JobEnd::TaskFailed { attempt, error },
                Output::JobAborted { attempt, error } => {
                    tracing::debug!(attempt = %attempt_name(attempt), "job aborted");
                    JobEnd::Aborted { attempt, error }
                }
            };
            if self.ended.is_none() {
                self.ended = Some(end.clone());
                actions.push(Action::Finish { end });
            }
        }
    }

    fn send(&mut self, worker: WorkerId, msg: ToWorker, actions: &mut Vec<Action>) {
        if let Some(&conn) = self.by_worker.get(&worker) {
            actions.push(Action::Send { conn, msg });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_wire::mr::{AppSpec, TaskKind};
    use std::path::PathBuf;

    fn machine(maps: u32) -> JobMachine {
        let config = CoordinatorConfig {
            maps,
            reduces: 1,
            task_timeout: Duration::from_secs(2),
            max_attempts: 2,
            backup_tasks: false,
        };
        let spec = JobSpec {
            job_id: 1,
            app: AppSpec {
                name: "wordcount".into(),
                pattern: None,
                mapper: None,
                reducer: None,
                shipped: Vec::new(),
                sort: None,
            },
            reduces: 1,
            memory_bytes: 1 << 20,
            heartbeat_interval_ms: 500,
        };
        let splits = (0..maps)
            .map(|i| SplitSpec {
                path: PathBuf::from(format!("in-{i}")),
                offset: 0,
                len: 10,
            })
            .collect();
        JobMachine::new(config, spec, splits)
    }

    fn msg(conn: ConnId, msg: ToCoordinator) -> Event {
        Event::Message { conn, msg }
    }

    const T: Duration = Duration::from_millis(1);

    #[test]
    fn a_job_from_registration_to_the_commit() {
        let mut m = machine(1);
        assert!(m.handle(T, Event::Connected { conn: 7 }).is_empty());
        let register = ToCoordinator::Register {
            name: "w".into(),
            shuffle_addr: "h:1".into(),
        };
        let a = m.handle(T, msg(7, register));
        assert!(matches!(
            &a[..],
            [Action::Send {
                conn: 7,
                msg: ToWorker::Welcome { .. }
            }]
        ));
        let a = m.handle(T, msg(7, ToCoordinator::RequestTask));
        let map = AttemptRef {
            kind: TaskKind::Map,
            task: 0,
            attempt: 0,
        };
        assert!(
            matches!(&a[..], [Action::Send { conn: 7, msg: ToWorker::Map { attempt, split } }]
            if *attempt == map && split.path == std::path::Path::new("in-0"))
        );
        let done = |attempt| ToCoordinator::TaskDone {
            attempt,
            counters: BTreeMap::new(),
        };
        assert!(m.handle(T, msg(7, done(map))).is_empty());
        let a = m.handle(T, msg(7, ToCoordinator::RequestTask));
        let reduce = AttemptRef {
            kind: TaskKind::Reduce,
            task: 0,
            attempt: 0,
        };
        assert!(
            matches!(&a[..], [Action::Send { msg: ToWorker::Reduce { attempt, inputs }, .. }]
            if *attempt == reduce && inputs.len() == 1)
        );
        let a = m.handle(T, msg(7, done(reduce)));
        assert_eq!(
            a,
            vec![Action::Fetch {
                attempt: reduce,
                shuffle_addr: "h:1".into()
            }]
        );
        let fetched = Event::Fetched {
            attempt: reduce,
            result: Ok(()),
        };
        assert_eq!(
            m.handle(T, fetched),
            vec![Action::Place { attempt: reduce }]
        );
        let placed = Event::Placed {
            attempt: reduce,
            result: Ok(()),
        };
        assert_eq!(
            m.handle(T, placed.clone()),
            vec![Action::Finish { end: JobEnd::Done }]
        );
        assert_eq!(m.ended(), Some(&JobEnd::Done));
        assert!(m.handle(T, placed).is_empty(), "nothing after the end");
    }

    #[test]
    fn misbehaving_and_lost_connections() {
        let mut m = machine(2);
        m.handle(T, Event::Connected { conn: 1 });
        // A message before registration closes the connection.
        let a = m.handle(T, msg(1, ToCoordinator::RequestTask));
        assert_eq!(a, vec![Action::Close { conn: 1 }]);
        assert_eq!(m.connections().count(), 0);
        // A registered worker whose connection closes is lost: its map is handed to the next.
        for conn in [2, 3] {
            m.handle(T, Event::Connected { conn });
            let register = ToCoordinator::Register {
                name: format!("w{conn}"),
                shuffle_addr: format!("h:{conn}"),
            };
            m.handle(T, msg(conn, register));
        }
        let a = m.handle(T, msg(2, ToCoordinator::RequestTask));
        assert!(
            matches!(&a[..], [Action::Send { conn: 2, msg: ToWorker::Map { attempt, .. } }] if attempt.task == 0)
        );
        let a = m.handle(T, msg(3, ToCoordinator::RequestTask));
        assert!(
            matches!(&a[..], [Action::Send { conn: 3, msg: ToWorker::Map { attempt, .. } }] if attempt.task == 1)
        );
        // Worker 3 finishes and asks again; worker 2's connection closes: its map goes to 3.
        let done = ToCoordinator::TaskDone {
            attempt: AttemptRef {
                kind: TaskKind::Map,
                task: 1,
                attempt: 0,
            },
            counters: BTreeMap::new(),
        };
        m.handle(T, msg(3, done));
        assert!(m.handle(T, msg(3, ToCoordinator::RequestTask)).is_empty());
        let a = m.handle(T, Event::Closed { conn: 2 });
        assert!(
            matches!(&a[..], [Action::Send { conn: 3, msg: ToWorker::Map { attempt, .. } }]
            if attempt.task == 0 && attempt.attempt == 1)
        );
        // A second registration on a connection closes it.
        let again = ToCoordinator::Register {
            name: "w3".into(),
            shuffle_addr: "h:3".into(),
        };
        assert_eq!(m.handle(T, msg(3, again)), vec![Action::Close { conn: 3 }]);
    }
}
