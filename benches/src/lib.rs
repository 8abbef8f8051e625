//! Fixtures shared by warren's benchmarks.
