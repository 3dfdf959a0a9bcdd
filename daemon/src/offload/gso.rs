//! UDP segmentation offload on the way out: encrypted datagrams gathered into one buffer,
//! grouped so that runs of equal-sized datagrams to one address leave in a single UDP GSO
//! send (one `sendmmsg` for the whole batch). The data path writes into it; `io::udp` sends it.

use std::net::SocketAddr;

/// Largest UDP payload one GSO send may carry.
pub const MAX_GROUP_BYTES: usize = 65000;
/// Most segments in one group (the kernel's UDP_MAX_SEGMENTS).
pub const MAX_GROUP_SEGMENTS: u32 = 64;

#[derive(Debug, Clone, Copy)]
pub struct TxGroup {
    pub dst: SocketAddr,
    pub start: usize,
    pub len: usize,
    /// Size of each segment; the last may be shorter.
    pub segment: u32,
    pub count: u32,
    /// A shorter segment ended the group.
    closed: bool,
}

/// A buffer of encrypted datagrams waiting for one send call.
pub struct TxBatch {
    buf: Vec<u8>,
    used: usize,
    groups: Vec<TxGroup>,
    max_groups: usize,
}

impl TxBatch {
    /// `bytes` of buffer and room for `max_groups` groups.
    pub fn new(bytes: usize, max_groups: usize) -> TxBatch {
        TxBatch {
            buf: vec![0; bytes],
            used: 0,
            groups: Vec::with_capacity(max_groups),
            max_groups,
        }
    }

    /// Whether `n` more bytes (in at most `datagrams` new groups) fit.
    #[inline]
    pub fn has_room(&self, n: usize, datagrams: usize) -> bool {
        self.used + n <= self.buf.len() && self.groups.len() + datagrams <= self.max_groups
    }

    /// Free space for the next datagram; pass what was written to [`TxBatch::commit`].
    #[inline]
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// Appends the `len` bytes just written at the start of [`TxBatch::slot`].
    #[inline]
    pub fn commit(&mut self, len: usize, dst: SocketAddr) {
        debug_assert!(self.used + len <= self.buf.len());
        let start = self.used;
        self.used += len;
        if let Some(g) = self.groups.last_mut() {
            if !g.closed
                && g.dst == dst
                && g.count < MAX_GROUP_SEGMENTS
                && len as u32 <= g.segment
                && g.len + len <= MAX_GROUP_BYTES
            {
                g.len += len;
                g.count += 1;
                g.closed = (len as u32) < g.segment;
                return;
            }
        }
        self.groups.push(TxGroup {
            dst,
            start,
            len,
            segment: len as u32,
            count: 1,
            closed: false,
        });
    }

    /// Copies `data` in as one datagram (handshake replies and the like).
    pub fn push(&mut self, data: &[u8], dst: SocketAddr) -> bool {
        if !self.has_room(data.len(), 1) {
            return false;
        }
        self.slot()[..data.len()].copy_from_slice(data);
        self.commit(data.len(), dst);
        true
    }

    pub fn groups(&self) -> &[TxGroup] {
        &self.groups
    }

    pub fn group_bytes(&self, g: &TxGroup) -> &[u8] {
        &self.buf[g.start..g.start + g.len]
    }

    /// Every datagram with its destination.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.groups.iter().flat_map(move |g| {
            self.group_bytes(g)
                .chunks(g.segment as usize)
                .map(move |d| (g.dst, d))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.groups.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_equal_sizes_to_one_address() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1".parse().unwrap();
        let mut t = TxBatch::new(1 << 16, 16);
        for (len, dst) in [(100, a), (100, a), (60, a), (100, a), (100, b), (120, b)] {
            assert!(t.push(&vec![len as u8; len], dst));
        }
        let g: Vec<(SocketAddr, u32, usize)> =
            t.groups().iter().map(|g| (g.dst, g.count, g.len)).collect();
        assert_eq!(g, vec![(a, 3, 260), (a, 1, 100), (b, 1, 100), (b, 1, 120)]);
        let lens: Vec<usize> = t.datagrams().map(|(_, d)| d.len()).collect();
        assert_eq!(lens, vec![100, 100, 60, 100, 100, 120]);
        t.clear();
        assert!(t.is_empty());
        assert!(!t.push(&vec![0; 1 << 17], a));
    }
}
