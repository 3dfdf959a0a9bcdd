//! kwire: the node daemon's library. `main.rs` only parses flags and calls in here.

pub mod agent;
pub mod datapath;
pub mod io;
pub mod metrics;
pub mod offload;
pub mod pods;
pub mod policy;
pub mod status;
pub mod tunnel;
pub mod wg;
