//! The sans-IO core of the CyberBackup protocol (version 3).
//!
//! Nothing in this crate touches a socket, a file or a clock: every input (bytes, the
//! time, randomness, the results of storage and registry operations) is passed in, and
//! every output (response bytes, operations to run) is handed back. The server's
//! runtimes, the client, the load generator and the bridge all build on it.
//!
//! # Layout
//! - [`header`]: the 23-byte request header and the 7-byte response header.
//! - [`name`]: the `name[255]` field and the rules for user and file names.
//! - [`message`]: every v3 request and response payload, encoded and decoded.
//! - [`cksum`]: the POSIX `cksum` checksum (CRC-32/CKSUM plus the length), SIMD-fast.
//! - [`crypto`]: AES-256-CBC (zero IV, PKCS#7) streaming in constant memory, RSA-1024
//!   key generation with a 160-byte public key, RSA-OAEP(SHA-256) for the session key.
//! - [`session`]: the per-connection server state machine.
//! - `fuzzing` (feature `fuzzing`, and in unit tests): the harnesses of the cargo-fuzz
//!   targets in `fuzz/`, and a key exchange with a known session key for them.
//!
//! The wire contract is `PROTOCOL.md` (shared with the CyberBackup 3.0 deployments);
//! `docs/PROTOCOL-NOTES.md` in this repository records how this implementation reads it
//! where the contract leaves room.
// Unsafe code is denied everywhere but in `crypto::vaes`, the one module that needs
// CPU intrinsics (each use has its `// SAFETY:` note).
#![deny(unsafe_code)]

pub mod cksum;
pub mod crypto;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod header;
pub mod message;
pub mod name;
pub mod session;

pub use cksum::{cksum, Cksum};
pub use header::{RequestCode, RequestHeader, ResponseCode, ResponseHeader};

/// The protocol version this crate speaks.
pub const VERSION: u8 = 3;

/// A client identifier: 16 opaque bytes (a UUIDv4 when this server makes one).
pub type ClientId = [u8; 16];

/// Size of a public key field: DER SubjectPublicKeyInfo of an RSA-1024 key.
pub const PUBLIC_KEY_LEN: usize = 160;

/// Largest packet content (ciphertext) a v3 packet may carry.
pub const MAX_CONTENT_SIZE: u32 = 16 * 1024 * 1024;

/// Largest request payload a v3 server accepts: a maximal SEND_FILE packet.
pub const MAX_PAYLOAD_SIZE: u32 = MAX_CONTENT_SIZE + message::SEND_FILE_FIXED_LEN as u32;

/// Lowercase hex of a client id, as used for directory names and me.info.
pub fn client_id_hex(id: &ClientId) -> String {
    use std::fmt::Write;
    id.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses 32 hex characters (either case) into a client id.
pub fn parse_client_id_hex(s: &str) -> Option<ClientId> {
    let s = s.as_bytes();
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        id[i] = (hi * 16 + lo) as u8;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_hex_round_trip() {
        let id: ClientId = core::array::from_fn(|i| (i * 17) as u8);
        let hex = client_id_hex(&id);
        assert_eq!(hex, "00112233445566778899aabbccddeeff");
        assert_eq!(parse_client_id_hex(&hex), Some(id));
        assert_eq!(parse_client_id_hex(&hex.to_uppercase()), Some(id));
        assert_eq!(parse_client_id_hex("00"), None);
        assert_eq!(parse_client_id_hex(&"g".repeat(32)), None);
    }
}
