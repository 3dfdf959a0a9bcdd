//! Types shared by the kwire daemon and `kwire-cni`: WireGuard keys as text, the Node
//! annotation schema. Pure data: no I/O, no tokio.
#![forbid(unsafe_code)]

pub mod annotations;
pub mod cni;
pub mod key;
