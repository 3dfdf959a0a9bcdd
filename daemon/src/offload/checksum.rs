//! The Internet checksum (RFC 1071) and the TCP/UDP pseudo-header sums.

/// One's-complement addition in 64 bits: the carry out wraps around (cannot overflow again).
#[inline]
fn add(acc: u64, v: u64) -> u64 {
    let (s, carry) = acc.overflowing_add(v);
    s + carry as u64
}

/// Bytes summed between two folds in [`sum`]: 16 Ki 32-bit words add up to less than 2^48, so
/// the 64-bit accumulator cannot overflow within a block.
const SUM_BLOCK: usize = 64 * 1024;

/// Inputs up to this long (IP headers, addresses) are summed word by word.
const SHORT: usize = 64;

/// Adds `data` to a running one's-complement sum (not yet folded) of big-endian 16-bit words.
///
/// The one's-complement sum does not depend on byte order (RFC 1071 section 2.B): the data is
/// added as native 32-bit words into a 64-bit accumulator (no carries to track, so the
/// compiler vectorises the loop: about twice as fast as 64-bit words with end-around carries
/// and a byte swap each), and only the folded 16-bit result is turned to network order.
pub fn sum(mut acc: u64, data: &[u8]) -> u64 {
    if data.len() <= SHORT {
        // Headers and addresses: a few words, summed as they stand (the vector loop's set-up
        // and the fold would cost more than they save).
        let mut words = data.chunks_exact(2);
        for w in &mut words {
            acc = add(acc, u16::from_be_bytes([w[0], w[1]]) as u64);
        }
        if let [b] = words.remainder() {
            acc = add(acc, (*b as u64) << 8);
        }
        return acc;
    }
    for block in data.chunks(SUM_BLOCK) {
        let mut words = block.chunks_exact(4);
        let mut native: u64 = (&mut words)
            .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) as u64)
            .sum();
        // An odd tail byte is the high byte of a zero-padded word, as in network order.
        let rest = words.remainder();
        let mut tail = [0u8; 4];
        tail[..rest.len()].copy_from_slice(rest);
        native += u32::from_ne_bytes(tail) as u64;
        acc = add(acc, u16::from_be(fold(native)) as u64);
    }
    acc
}

/// Folds a running sum to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// The checksum of `data`: complement of the folded sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

/// Sum of the pseudo-header for an L4 segment of `l4_len` bytes and protocol `proto`.
/// `src` and `dst` are the 4 or 16 address bytes.
#[inline]
pub fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, l4_len: u32) -> u64 {
    let mut acc = sum(0, src);
    acc = sum(acc, dst);
    add(acc, proto as u64 + l4_len as u64)
}

/// Whether the IPv4 header checksum is right.
pub fn ipv4_header_valid(hdr: &[u8]) -> bool {
    fold(sum(0, hdr)) == 0xffff
}

/// Recomputes the IPv4 header checksum in place.
#[inline]
pub fn set_ipv4_header(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = checksum(hdr);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2 (folded).
        assert_eq!(
            fold(sum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
            0xddf2
        );
    }

    #[test]
    fn odd_lengths_and_long_inputs_agree_with_a_naive_sum() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in [0, 1, 2, 7, 8, 9, 63, 1000, 1001] {
            let d = &data[..n];
            let mut naive: u32 = 0;
            for c in d.chunks(2) {
                naive += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
            }
            while naive > 0xffff {
                naive = (naive & 0xffff) + (naive >> 16);
            }
            assert_eq!(fold(sum(0, d)), naive as u16, "len {n}");
        }
    }

    /// Found by `fuzz/` (tso_split): IPv6 addresses can bring the 64-bit sum near its top; the
    /// pseudo-header's and odd tails' additions overflowed (a panic in debug builds, a lost
    /// carry and a wrong checksum in release).
    #[test]
    fn sums_near_the_top_carry_around() {
        let all_ones = [0xffu8; 16];
        // 16 words of 0xffff fold to 0xffff; + 6 + 100 wraps around to 106.
        assert_eq!(fold(pseudo_header(&all_ones, &all_ones, 6, 100)), 106);
        // All ones is zero in one's complement: 0x1234 + 0x5600 either way.
        assert_eq!(fold(sum(u64::MAX, &[0x12, 0x34, 0x56])), 0x6834);
    }

    /// The word-at-a-time sum in native order agrees with RFC 1071's big-endian 16-bit sum at
    /// every length, alignment and starting sum, also past one block and for all-ones data
    /// (one's-complement "negative zero").
    #[test]
    fn native_order_sum_agrees_with_big_endian_words() {
        fn reference(mut acc: u64, d: &[u8]) -> u64 {
            for c in d.chunks(2) {
                acc = add(
                    acc,
                    u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64,
                );
            }
            acc
        }
        let data: Vec<u8> = (0..(SUM_BLOCK as u32 * 2 + 64))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let ones = vec![0xffu8; SUM_BLOCK + 9];
        for start in [0u64, 1, 0xffff, 0x1_0000_0000, u64::MAX - 7, u64::MAX] {
            for off in 0..4 {
                for n in (0..80).chain([1399, 1400, 9000, SUM_BLOCK - 1, SUM_BLOCK + 3]) {
                    let d = &data[off..off + n];
                    assert_eq!(
                        fold(sum(start, d)),
                        fold(reference(start, d)),
                        "{start} {off} {n}"
                    );
                    let o = &ones[off..off + n];
                    assert_eq!(
                        fold(sum(start, o)),
                        fold(reference(start, o)),
                        "ones {off} {n}"
                    );
                }
            }
        }
        let all = &data[..];
        assert_eq!(fold(sum(3, all)), fold(reference(3, all)));
    }

    #[test]
    fn ipv4_header_checksum() {
        // A real header (from a capture) with checksum b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(ipv4_header_valid(&h));
        h[10] = 0;
        h[11] = 0;
        set_ipv4_header(&mut h);
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
    }
}
