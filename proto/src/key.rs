//! WireGuard keys as text: base64 (as `wg` and the Node annotation spell them) and lowercase
//! hex (as the userspace API spells them). Public keys only; private keys never pass here.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::fmt;

/// Length of an x25519 key in bytes.
pub const KEY_LEN: usize = 32;

/// A Curve25519 public key. Comparing and printing a public key is harmless.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

/// Why a key's text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64 (expected 44 characters as `wg pubkey` prints)")]
    Base64,
    #[error("not valid hex (expected 64 lowercase hex digits)")]
    Hex,
    #[error("wrong length: a key is 32 bytes")]
    Length,
    #[error("all-zero key")]
    Zero,
}

impl PublicKey {
    /// Parses base64 as `wg` prints it. Refuses the all-zero key (no peer can own it).
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if s.len() != 44 {
            return Err(KeyError::Length);
        }
        let mut out = [0u8; KEY_LEN];
        let n = STANDARD
            .decode_slice(s, &mut out)
            .map_err(|_| KeyError::Base64)?;
        if n != KEY_LEN {
            return Err(KeyError::Length);
        }
        Self::nonzero(out)
    }

    /// Parses 64 hex digits, as the userspace API sends them.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        Ok(PublicKey(decode_hex32(s)?))
    }

    fn nonzero(b: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        if b == [0u8; KEY_LEN] {
            Err(KeyError::Zero)
        } else {
            Ok(PublicKey(b))
        }
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Decodes exactly 64 hex digits (either case) into 32 bytes.
pub fn decode_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let b = s.as_bytes();
    if b.len() != KEY_LEN * 2 {
        return Err(KeyError::Length);
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(out)
}

fn nibble(c: u8) -> Result<u8, KeyError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(KeyError::Hex),
    }
}

/// Lowercase hex.
pub fn encode_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let k = PublicKey([7u8; 32]);
        assert_eq!(PublicKey::from_base64(&k.to_base64()), Ok(k));
        assert_eq!(PublicKey::from_hex(&k.to_hex()), Ok(k));
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(PublicKey::from_base64(""), Err(KeyError::Length));
        assert_eq!(
            PublicKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(KeyError::Zero)
        );
        assert_eq!(
            PublicKey::from_base64("!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(KeyError::Base64)
        );
        assert_eq!(PublicKey::from_hex(&"zz".repeat(32)), Err(KeyError::Hex));
        assert_eq!(PublicKey::from_hex("00"), Err(KeyError::Length));
    }
}
