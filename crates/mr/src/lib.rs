//! MapReduce: coordinator (sans-IO core), workers, apps, sort/spill/merge, shuffle (work in progress).
