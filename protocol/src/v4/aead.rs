//! AES-256-GCM for v4, from `ring` (the transport's records and the repository's
//! chunk blobs, snapshot roots and wrapped key all use it). ring's implementation runs
//! on VAES and VPCLMULQDQ where the CPU has them (4.7 GB/s per core here, against 0.9
//! for the RustCrypto `aes-gcm` crate, whose GHASH multiplies one block at a time):
//! the transport and the chunk encryption were a third of the client's and the
//! server's CPU with the other crate.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

/// Bytes of a tag.
pub const TAG_LEN: usize = 16;

/// Authentication failed: wrong key, wrong associated data, or altered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

/// An AES-256-GCM key, expanded once.
pub struct Gcm(LessSafeKey);

impl std::fmt::Debug for Gcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gcm(..)")
    }
}

impl Gcm {
    pub fn new(key: &[u8; 32]) -> Gcm {
        // A 32-byte key is always a valid AES-256 key.
        match UnboundKey::new(&AES_256_GCM, key) {
            Ok(k) => Gcm(LessSafeKey::new(k)),
            Err(_) => unreachable!("AES-256-GCM takes any 32-byte key"),
        }
    }

    /// Encrypts `buf` in place; returns the tag. The caller guarantees that `nonce`
    /// is never used twice under this key.
    pub fn seal(&self, nonce: [u8; 12], ad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        match self.0.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(ad),
            buf,
        ) {
            Ok(tag) => {
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(tag.as_ref());
                t
            }
            // ring refuses only inputs over GCM's 64 GiB limit, which no caller makes.
            Err(_) => unreachable!("AES-GCM input over 64 GiB"),
        }
    }

    /// Decrypts `buf` in place if `tag` authenticates it.
    pub fn open(
        &self,
        nonce: [u8; 12],
        ad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), AuthError> {
        self.open_shifted(nonce, ad, buf, 0, tag)
    }

    /// Decrypts `buf[from..]` if `tag` authenticates it, leaving the plaintext at the
    /// front of `buf` (`buf[..buf.len() - from]`): a header before the ciphertext is
    /// dropped in the same pass, without a copy of its own.
    pub fn open_shifted(
        &self,
        nonce: [u8; 12],
        ad: &[u8],
        buf: &mut [u8],
        from: usize,
        tag: &[u8],
    ) -> Result<(), AuthError> {
        let tag = Tag::try_from(tag).map_err(|_| AuthError)?;
        if from > buf.len() {
            return Err(AuthError);
        }
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ad),
                tag,
                buf,
                from..,
            )
            .map(|_| ())
            .map_err(|_| AuthError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let k = Gcm::new(&[3; 32]);
        let mut b = b"attack at dawn".to_vec();
        let tag = k.seal([1; 12], b"ad", &mut b);
        assert_ne!(&b[..], b"attack at dawn");
        let mut c = b.clone();
        k.open([1; 12], b"ad", &mut c, &tag).unwrap();
        assert_eq!(&c[..], b"attack at dawn");
        let mut c = b.clone();
        assert_eq!(k.open([1; 12], b"other", &mut c, &tag), Err(AuthError));
        let mut c = b.clone();
        assert_eq!(k.open([2; 12], b"ad", &mut c, &tag), Err(AuthError));
        let mut c = b.clone();
        c[0] ^= 1;
        assert_eq!(k.open([1; 12], b"ad", &mut c, &tag), Err(AuthError));
        // NIST SP 800-38D test case 13 (AES-256, zero key and nonce, empty input).
        let z = Gcm::new(&[0; 32]);
        let tag = z.seal([0; 12], b"", &mut []);
        assert_eq!(
            tag,
            [
                0x53, 0x0f, 0x8a, 0xfb, 0xc7, 0x45, 0x36, 0xb9, 0xa9, 0x63, 0xb4, 0xf1, 0xc4, 0xcb,
                0x73, 0x8b
            ]
        );
    }
}
