//! The device's private key: zeroized on drop, never printed, compared in constant time.

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// An x25519 private key. `Debug` is redacted; the bytes leave only through
/// [`PrivateKey::expose_hex`] for the root-only userspace API, where the protocol requires it.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.0[..].ct_eq(&other.0[..]).into()
    }
}

impl Eq for PrivateKey {}

impl PrivateKey {
    /// A key from its bytes, clamped as X25519 does. The all-zero key means "no key".
    pub fn from_bytes(b: [u8; 32]) -> Option<PrivateKey> {
        let z: bool = b.ct_eq(&[0u8; 32]).into();
        if z {
            None
        } else {
            Some(PrivateKey(Zeroizing::new(b)))
        }
    }

    /// A fresh random key.
    pub fn generate() -> PrivateKey {
        let s = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        PrivateKey(Zeroizing::new(s.to_bytes()))
    }

    pub fn secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(*self.0)
    }

    pub fn public_key(&self) -> kwire_proto::key::PublicKey {
        kwire_proto::key::PublicKey(x25519_dalek::PublicKey::from(&self.secret()).to_bytes())
    }

    /// Lowercase hex, for the userspace API's `get` only.
    pub fn expose_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(kwire_proto::key::encode_hex(&self.0[..]))
    }

    /// The raw bytes, for writing the key file.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A preshared key (zeroized on drop, redacted in `Debug`).
#[derive(Clone)]
pub struct PresharedKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        self.0[..].ct_eq(&other.0[..]).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let k = PrivateKey::from_bytes([0x41; 32]).unwrap();
        let s = format!("{k:?}");
        assert!(!s.contains("41") && !s.contains("AAAA"), "{s}");
        assert!(PrivateKey::from_bytes([0; 32]).is_none());
        assert_eq!(k, k.clone());
        assert_ne!(k, PrivateKey::generate());
    }
}
