//! Deterministic simulator: virtual clock, event queue, seeded RNG, simulated network and disks, crashes, nemesis (work in progress).
