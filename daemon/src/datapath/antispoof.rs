//! Anti-spoofing: a frame from a pod's tun must carry one of that pod's own addresses as its
//! source, so that a pod can neither pose as another pod (and borrow its NetworkPolicy) nor
//! send from an address another node owns. Frames from the host tun are the node's own.

use super::local::{LocalTable, Port};
use super::stats::DropReason;
use std::net::IpAddr;

/// Whether a frame from `from` may carry source `src`.
#[inline]
pub fn check<T>(local: &LocalTable<T>, from: Port, src: IpAddr) -> Result<(), DropReason> {
    match from {
        Port::Pod(slot) if !local.owns(slot, src) => Err(DropReason::SpoofedSource),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::local::PodPort;

    #[test]
    fn pods_send_from_their_own_addresses_only() {
        let local = LocalTable::new(
            vec![
                PodPort {
                    id: 1,
                    ips: vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()],
                    io: (),
                },
                PodPort {
                    id: 2,
                    ips: vec!["10.244.1.6".parse().unwrap()],
                    io: (),
                },
            ],
            vec!["10.244.1.1".parse().unwrap()],
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(check(&local, Port::Pod(0), ip("10.244.1.5")), Ok(()));
        assert_eq!(check(&local, Port::Pod(0), ip("fd00::5")), Ok(()));
        for (from, src) in [
            (Port::Pod(0), "10.244.1.6"),
            (Port::Pod(1), "10.244.1.5"),
            (Port::Pod(0), "10.244.1.1"),
            (Port::Pod(7), "10.244.1.5"),
        ] {
            assert_eq!(
                check(&local, from, ip(src)),
                Err(DropReason::SpoofedSource),
                "{from:?} {src}"
            );
        }
        assert_eq!(check(&local, Port::Host, ip("198.51.100.7")), Ok(()));
    }
}
