//! Data path: see the crate docs (being built).
