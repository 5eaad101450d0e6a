//! Version 3 of the protocol: the wire format shared with the CyberBackup 3.0
//! deployments, and the server session that speaks it.
//!
//! - [`header`]: the 23-byte request header and the 7-byte response header.
//! - [`name`]: the `name[255]` field and the rules for user and file names.
//! - [`message`]: every v3 request and response payload, encoded and decoded.
//! - [`cksum`](mod@cksum): the POSIX `cksum` checksum (CRC-32/CKSUM plus the length),
//!   SIMD-fast.
//! - [`crypto`]: AES-256-CBC (zero IV, PKCS#7) streaming in constant memory, RSA-1024
//!   key generation with a 160-byte public key, RSA-OAEP(SHA-256) for the session key.
//! - [`session`]: the per-connection server state machine.
//! - `fuzzing` (feature `fuzzing`, and in unit tests): the harnesses of the cargo-fuzz
//!   targets in `fuzz/`, and a key exchange with a known session key for them.

pub mod cksum;
pub mod crypto;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
pub mod message;
pub mod name;
pub mod session;

pub use cksum::{cksum, Cksum};
pub use header::{RequestCode, RequestHeader, ResponseCode, ResponseHeader};

/// The protocol version this module speaks.
pub const VERSION: u8 = 3;

/// Size of a public key field: DER SubjectPublicKeyInfo of an RSA-1024 key.
pub const PUBLIC_KEY_LEN: usize = 160;

/// Largest packet content (ciphertext) a v3 packet may carry.
pub const MAX_CONTENT_SIZE: u32 = 16 * 1024 * 1024;

/// Largest request payload a v3 server accepts: a maximal SEND_FILE packet.
pub const MAX_PAYLOAD_SIZE: u32 = MAX_CONTENT_SIZE + message::SEND_FILE_FIXED_LEN as u32;
