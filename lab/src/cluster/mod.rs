//! What a lab is made of, shared by its commands ([`crate::commands`]), its supervisor
//! ([`crate::supervisor`]) and its pods ([`crate::pods`]): names, the description and runtime
//! files, the network namespaces, the client for the lab's own API calls.
//!
//! A lab named `L` is: namespace `L-ul` with bridge `kw<tag>br` (192.0.2.254/24 and
//! 2001:db8:<tag>::fe/64, where the API stand-in listens (HTTPS) on port 6443 for the agents); one
//! namespace `L-n<i>` per node (also the Node's name) with veth `kw<tag>u<i>` on the bridge
//! (192.0.2.<i>, 2001:db8:<tag>::<i>) and the agent's tun `kwire0`; its host paths under its root directory; its state in
//! /run/kwire-lab/L/. `<tag>` is 16 bits hashed from the name (see [`naming`]).

pub mod client;
pub mod naming;
pub mod state;
pub mod topology;

/// What a lab command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Name(#[from] naming::NameError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(transparent)]
    ApiServer(#[from] crate::apiserver::ApiServerError),
    #[error("lab {0} is not up: run `kwire-lab up --name {0}`")]
    NotUp(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot register Node {node} in the API stand-in: {detail}")]
    Register { node: String, detail: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    pub fn io(what: String, source: std::io::Error) -> LabError {
        LabError::Io { what, source }
    }
}
