//! Distribution: see the crate docs (being built).
