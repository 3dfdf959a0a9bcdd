//! kwire: the node daemon's library. `main.rs` only parses flags and calls in here.

pub mod policy;
