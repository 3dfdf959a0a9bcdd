//! Types shared by the kwire daemon, `kwire-cni` and the lab: WireGuard keys as text, the
//! Node annotation schema, the EndpointSlice controller's pure part. Pure data: no I/O, no
//! tokio.
#![forbid(unsafe_code)]

pub mod annotations;
pub mod cni;
pub mod endpoints;
pub mod key;
