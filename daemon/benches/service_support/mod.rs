//! What the Service benches (`services.rs`, `service_path.rs`) build alike: a node's local
//! table serving a Service table, and the context of one batch on an in-memory node. Only
//! APIs that predate node ports, so that `service_path.rs` still measures an older tree
//! (copy this folder along).

use std::sync::Arc;
use std::time::Instant;

use kwire::datapath::local::LocalTable;
use kwire::datapath::nat::NatTable;
use kwire::datapath::service::ServiceNat;
use kwire::datapath::stats::Counters;
use kwire::datapath::Ctx;
use kwire::services::ServiceTable;
use kwire::wg::device::Snapshot;
use kwire::wg::ratelimit::SourceLimiter;

/// `local` translates to `table`'s Services, from an empty connection table.
pub fn serve(local: &mut LocalTable<()>, table: &Arc<ServiceTable>) {
    local.services = Some(ServiceNat {
        table: table.clone(),
        nat: Arc::new(NatTable::default()),
    });
}

/// The context of a batch read now on an in-memory node (tun frames without a virtio
/// header, the in-memory devices' shared pacer).
pub fn ctx<'a>(
    snap: &'a Snapshot,
    local: &'a LocalTable<()>,
    counters: &'a Counters,
    limiter: &'a SourceLimiter,
) -> Ctx<'a> {
    Ctx {
        snap,
        local,
        counters,
        limiter,
        pacer: &kwire::datapath::HOST_ONLY_PACER,
        now: Instant::now(),
        vnet: false,
    }
}
