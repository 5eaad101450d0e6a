//! What can go wrong, said so that a person (or a caller) knows what to do about it.

use std::path::PathBuf;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {server}")]
    Unreachable {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{server} is not a valid host:port")]
    BadAddress { server: String },
    #[error("the connection to the server was lost")]
    ConnectionLost(#[source] std::io::Error),
    #[error("the server did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error(
        "the user name {0:?} is already registered on this server (and this identity is not it)"
    )]
    NameTaken(String),
    #[error("the server rejected the identity of {0:?} (unknown to this server)")]
    Rejected(String),
    #[error("the server answered with an error (1607) while {0}")]
    ServerError(&'static str),
    #[error("the server does not speak CyberBackup v3: {0}")]
    Protocol(String),
    #[error("checksum mismatch for {file}: the file was sent {attempts} times and aborted")]
    ChecksumFailed { file: String, attempts: u32 },
    #[error("identity file {path}: {reason}")]
    BadIdentity { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },
    #[error("{path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cryptography failed: {0}")]
    Crypto(#[from] cyberbackup_protocol::v3::crypto::CryptoError),
    #[error("cancelled")]
    Cancelled,
    #[error("TCP congestion control {name:?} cannot be used here")]
    Congestion {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The message with its causes, e.g. "cannot reach the server at h:1: Connection
    /// refused (os error 111)".
    pub fn report(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            s.push_str(": ");
            s.push_str(&e.to_string());
            src = e.source();
        }
        s
    }

    /// Whether trying again on a new connection may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::ConnectionLost(_)
                | ClientError::Timeout(_)
                | ClientError::Unreachable { .. }
        )
    }
}
