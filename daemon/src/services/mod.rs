//! Services without kube-proxy: stripped views of Services and EndpointSlices
//! ([`model`]), the immutable [`ServiceTable`] compiled from them, and the Maglev consistent
//! hashing ([`maglev`]) that picks a flow's backend the same way on every node. The loop's
//! translation stage is `datapath::service`; the watches are in `agent::services`.

pub mod maglev;
pub mod model;
pub mod table;

pub use model::{ServiceView, SliceView};
pub use table::{flow_hash, Frontend, ServiceTable};
