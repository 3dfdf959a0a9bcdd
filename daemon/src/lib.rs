//! kwire: the node daemon's library. `main.rs` only parses flags and calls in here.
//!
//! `unsafe` is denied in the whole crate except [`io`], the module that talks to the kernel.
#![deny(unsafe_code)]

pub mod agent;
pub mod cni;
pub mod datapath;
pub mod dataplane;
pub mod io;
pub mod kubeapi;
pub mod metrics;
pub mod node_state;
pub mod offload;
pub mod peer_config;
pub mod policy;
pub mod services;
pub mod status;
#[cfg(test)]
pub(crate) mod testing;
pub mod tunnel;
pub mod wg;
