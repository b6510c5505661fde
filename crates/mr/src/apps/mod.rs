//! Built-in apps (being built).
