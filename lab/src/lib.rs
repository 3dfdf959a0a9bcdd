//! kwire-lab: a local kwire cluster on one Linux machine (network namespaces as nodes and
//! pods), and the Kubernetes API stand-in it runs against.

pub mod apiserver;
pub mod cluster;
pub mod commands;
pub mod container;
pub mod manifests;
pub mod pods;
pub mod supervisor;
