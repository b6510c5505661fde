//! Shoal's linearizability checker.
//!
//! This crate owns: the [`Model`] trait (a sequential specification that other crates implement),
//! the built-in models ([`models::Register`], [`models::VersionedKv`], [`models::AppendKv`]),
//! recording histories ([`HistoryBuilder`], and [`SharedHistoryBuilder`] for many threads), the search itself ([`check`], [`check_with_options`]:
//! Wing & Gong's algorithm with Lowe's just-in-time linearization, a cache of
//! (linearized set, state) pairs, and partitioning of a history by key), the explanation of a
//! violation ([`Explanation`]), an HTML timeline of a failing partition ([`html`]), and the parsers
//! of the history formats the `shoal check` command reads ([`formats`]).
//!
//! It must never: do I/O of its own (callers hand it text and write its HTML), depend on another
//! Shoal crate, iterate over a randomly seeded hash map (its verdicts and explanations are
//! deterministic, so a simulator seed replays them), or answer "linearizable" for a search it did
//! not finish — a search that runs out of budget says [`Verdict::Unknown`].
//!
//! ```
//! use shoal_check::{check, Budget, HistoryBuilder, Verdict};
//! use shoal_check::models::{Register, RegisterInput, RegisterOutput};
//!
//! let mut history = HistoryBuilder::new();
//! let write = history.invoke(1, RegisterInput::Write("1".into()), 0);
//! let read = history.invoke(2, RegisterInput::Read, 1);
//! history.complete(write, RegisterOutput::Ok, 2).unwrap();
//! history.complete(read, RegisterOutput::Value(Some("1".into())), 3).unwrap();
//! let verdict = check(&Register, &history.build(), Budget::unlimited());
//! assert!(matches!(verdict, Verdict::Linearizable));
//! ```

#![warn(missing_docs)]

mod check;
pub mod formats;
mod history;
pub mod html;
mod model;
pub mod models;

pub use check::{
    check, check_with_options, Budget, CheckOptions, Exhausted, Explanation, OpSummary,
    UnknownReason, Verdict,
};
pub use history::{
    ClientId, History, HistoryBuilder, HistoryError, OpId, Operation, Outcome,
    SharedHistoryBuilder, Time,
};
pub use model::Model;
