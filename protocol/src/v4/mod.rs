//! Protocol version 4: an end-to-end encrypted, deduplicating snapshot repository
//! (`docs/PROTOCOL-V4.md` is the contract; `docs/V4-DESIGN.md` the brief).
//!
//! # Layout
//! - [`aead`]: AES-256-GCM (ring), for the transport and the repository format.
//! - [`wire`]: the preamble, frame headers, every request and answer body, reason codes.
//! - [`noise`]: the `Noise_XX_25519_AESGCM_SHA256` handshake (snow) and the record layer.
//! - [`legacy`]: the proof that a connection holds a v3 client's RSA key (LEGACY_LOGIN).
//! - [`server`]: the server's per-connection state machine: handshake, login, window,
//!   capability checks; the repository work is handed out as ops.
//! - [`client`]: the client's state machine, used by the client library, the load
//!   generator and the tests, so the wire is implemented once on each side.
//! - [`format`](mod@format): the repository format the server never reads: key derivation, the
//!   wrapped key, chunk blobs, the manifest and the snapshot root.

pub mod aead;
pub mod client;
pub mod format;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod legacy;
pub mod noise;
pub mod server;
pub mod wire;

/// Largest chunk plaintext (the FastCDC maximum).
pub const MAX_CHUNK: u32 = 4 << 20;
/// Largest chunk blob: a chunk, its 14-byte header and its 16-byte tag, with room.
pub const MAX_CHUNK_BLOB: u32 = MAX_CHUNK + 64;

/// A device's capabilities (`docs/PROTOCOL-V4.md` §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// Nothing.
    pub const NONE: Self = Self(0);
    /// Ask which chunks are held, put chunks, commit snapshots, fetch the key.
    pub const BACKUP: Self = Self(1);
    /// List and get snapshots and chunks.
    pub const READ: Self = Self(2);
    /// Forget snapshots, start collection.
    pub const FORGET: Self = Self(4);
    /// Devices, quota, storing the key.
    pub const ADMIN: Self = Self(8);
    /// All four.
    pub const ALL: Self = Self(15);

    /// The known bits of a stored or received value (unknown ones are dropped).
    pub fn from_bits_truncate(bits: u32) -> Capabilities {
        Capabilities(bits & Self::ALL.0)
    }

    /// Whether every capability of `other` is in `self`.
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// The capabilities' names, joined by `+` ("backup+read").
    pub fn names(self) -> String {
        let names: Vec<&str> = [
            (Self::BACKUP, "backup"),
            (Self::READ, "read"),
            (Self::FORGET, "forget"),
            (Self::ADMIN, "admin"),
        ]
        .iter()
        .filter(|(c, _)| self.0 & c.0 != 0)
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join("+")
        }
    }

    /// Parses names joined by `+` or `,` ("backup,read", "all").
    pub fn parse(s: &str) -> Option<Capabilities> {
        let mut c = 0;
        for part in s.split(['+', ',']) {
            c |= match part.trim() {
                "backup" => 1,
                "read" => 2,
                "forget" => 4,
                "admin" => 8,
                "all" => 15,
                _ => return None,
            };
        }
        Some(Capabilities(c))
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Capabilities;
    fn bitor(self, rhs: Capabilities) -> Capabilities {
        Capabilities(self.0 | rhs.0)
    }
}

#[cfg(test)]
mod tests;
