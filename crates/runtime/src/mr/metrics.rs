//! A worker's Prometheus metrics (`shoal mr worker --metrics ADDR`): the attempts it finished,
//! by task kind and outcome, and the bytes its winning-or-not attempts read and wrote per
//! phase. The coordinator's metrics are made from its published status, in the binary.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use shoal_wire::mr::{AttemptRef, TaskKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

struct WorkerMetrics {
    attempts: Family<AttemptLabels, Counter>,
    bytes: Family<PhaseLabel, Counter>,
}

static METRICS: LazyLock<WorkerMetrics> = LazyLock::new(|| WorkerMetrics {
    attempts: Family::default(),
    bytes: Family::default(),
});

/// Registers the worker's metrics in `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(
        "shoal_mr_worker_attempts",
        "Task attempts this worker finished, by kind (map, reduce) and outcome (done, failed, fetch_failed)",
        METRICS.attempts.clone(),
    );
    registry.register(
        "shoal_mr_worker_phase_bytes",
        "Bytes this worker's finished attempts read or wrote, by phase (map.input, map.output, …)",
        METRICS.bytes.clone(),
    );
}

fn kind(attempt: &AttemptRef) -> &'static str {
    match attempt.kind {
        TaskKind::Map => "map",
        TaskKind::Reduce => "reduce",
    }
}

/// An attempt ended (`outcome`: done, failed, fetch_failed); `counters` are a done attempt's.
pub(crate) fn attempt_ended(
    attempt: &AttemptRef,
    outcome: &'static str,
    counters: Option<&std::collections::BTreeMap<String, u64>>,
) {
    METRICS
        .attempts
        .get_or_create(&AttemptLabels {
            kind: kind(attempt),
            outcome,
        })
        .inc();
    for (name, v) in counters.into_iter().flatten() {
        if let Some(phase) = name.strip_suffix(".bytes") {
            METRICS
                .bytes
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .inc_by(*v);
        }
    }
}
