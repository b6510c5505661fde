//! Linearizability checker: Wing-Gong search with memoization and per-key partitioning, pluggable models, explanations and an HTML timeline (work in progress).
