//! The sans-IO core of the CyberBackup protocol.
//!
//! Nothing in this crate touches a socket, a file or a clock: every input (bytes, the
//! time, randomness, the results of storage and registry operations) is passed in, and
//! every output (response bytes, operations to run) is handed back. The server's
//! runtimes, the client, the load generator and the bridge all build on it.
//!
//! # Layout
//! - [`civil`]: UTC calendar dates from epoch times, and byte sizes, as people read them.
//! - [`common`]: what every protocol version shares: the [`ClientId`](common::ClientId)
//!   and its hex form ([`common::hex`]).
//! - [`v3`]: version 3, the wire format of the CyberBackup 3.0 deployments:
//!   - [`v3::header`]: the 23-byte request header and the 7-byte response header.
//!   - [`v3::name`]: the `name[255]` field and the rules for user and file names.
//!   - [`v3::message`]: every v3 request and response payload, encoded and decoded.
//!   - [`v3::cksum`](mod@v3::cksum): the POSIX `cksum` checksum (CRC-32/CKSUM plus the
//!     length), SIMD-fast.
//!   - [`v3::crypto`]: AES-256-CBC (zero IV, PKCS#7) streaming in constant memory,
//!     RSA-1024 key generation with a 160-byte public key, RSA-OAEP(SHA-256) for the
//!     session key.
//!   - [`v3::session`]: the per-connection server state machine.
//!   - `v3::fuzzing` (feature `fuzzing`, and in unit tests; hidden from the docs): the
//!     harnesses of the cargo-fuzz targets in `fuzz/`, and a key exchange with a known
//!     session key for them.
//! - [`v4`]: version 4, the end-to-end encrypted, deduplicating snapshot repository
//!   (`docs/PROTOCOL-V4.md`): wire codecs, the Noise transport, the server and client
//!   sessions, and the repository format.
//!
//! The v3 wire contract is `PROTOCOL.md` (shared with the CyberBackup 3.0 deployments);
//! `docs/PROTOCOL-NOTES.md` in this repository records how this implementation reads it
//! where the contract leaves room.
// Unsafe code is denied everywhere but in `v3::crypto::vaes`, the one module that needs
// CPU intrinsics (each use has its `// SAFETY:` note).
#![deny(unsafe_code)]

pub mod civil;
pub mod common;
pub mod v3;
pub mod v4;
