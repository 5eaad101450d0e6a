//! An in-memory registry and store that run a session's ops at once: the backend of
//! unit tests, benches and fuzz targets, so the protocol can be exercised without
//! sockets, files or threads.

use std::collections::HashMap;
use std::time::Instant;

use super::{Completion, KeyStored, Op, OpError, ReconnectLookup, ServerSession};
use crate::common::ClientId;
use crate::v3::crypto::{CryptoRngCore, KeyExchange};
use crate::v3::PUBLIC_KEY_LEN;

/// A stored client.
#[derive(Debug, Clone)]
pub struct MemClient {
    pub name: String,
    pub public_key: Option<[u8; PUBLIC_KEY_LEN]>,
}

/// Registry and storage in memory.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    pub clients: HashMap<ClientId, MemClient>,
    /// Committed files by (client, name): bytes and checksum.
    pub files: HashMap<(ClientId, String), (Vec<u8>, u32)>,
    /// Sinks handed out and not yet committed or discarded.
    pub open_sinks: usize,
    /// Sinks discarded so far.
    pub discarded: usize,
    /// When set, OpenFile fails with this message (disk full, say).
    pub fail_open: Option<String>,
    /// Reuse one buffer for every sink instead of allocating (benches).
    pub recycle: Option<Vec<u8>>,
}

impl MemoryBackend {
    /// Runs every pending op of `s`, completing those that need it.
    pub fn run<R: CryptoRngCore, K: KeyExchange>(
        &mut self,
        s: &mut ServerSession<Vec<u8>, R, K>,
        now: Instant,
    ) {
        while let Some(op) = s.poll_op() {
            if let Some(c) = self.execute(op) {
                s.complete(now, c);
            }
        }
    }

    /// Feeds all of `input`, running ops as they come; returns the bytes consumed
    /// (less than `input.len()` only when the session closed).
    pub fn feed<R: CryptoRngCore, K: KeyExchange>(
        &mut self,
        s: &mut ServerSession<Vec<u8>, R, K>,
        now: Instant,
        mut input: &[u8],
    ) -> usize {
        let total = input.len();
        loop {
            let n = s.handle_input(now, input);
            input = &input[n..];
            self.run(s, now);
            if input.is_empty() || s.is_closing() {
                break;
            }
            if n == 0 && !s.is_waiting() {
                break;
            }
        }
        total - input.len()
    }

    /// Runs one op; returns its completion if it has one.
    pub fn execute(&mut self, op: Op<Vec<u8>>) -> Option<Completion<Vec<u8>>> {
        Some(match op {
            Op::Register { client_id, name } => {
                let taken = self.clients.values().any(|c| c.name == name);
                if !taken {
                    self.clients.insert(
                        client_id,
                        MemClient {
                            name,
                            public_key: None,
                        },
                    );
                }
                Completion::Registered(!taken)
            }
            Op::StorePublicKey {
                client_id,
                name,
                public_key,
                registered_here,
            } => Completion::PublicKeyStored(match self.clients.get_mut(&client_id) {
                None => KeyStored::UnknownClient,
                Some(c) if c.name == name && (registered_here || c.public_key.is_none()) => {
                    c.public_key = Some(*public_key);
                    KeyStored::Stored
                }
                Some(_) => KeyStored::Refused,
            }),
            Op::Reconnect { client_id, name } => Completion::Reconnect(ReconnectLookup {
                by_name: self
                    .clients
                    .iter()
                    .find(|(_, c)| c.name == name)
                    .map(|(id, c)| (*id, c.public_key.map(|k| k.to_vec()))),
                id_known: self.clients.contains_key(&client_id),
            }),
            Op::OpenFile { len, .. } => {
                if let Some(e) = &self.fail_open {
                    Completion::FileOpened(Err(OpError::storage(e)))
                } else {
                    self.open_sinks += 1;
                    let mut v = self.recycle.take().unwrap_or_default();
                    v.resize(len as usize, 0);
                    Completion::FileOpened(Ok(v))
                }
            }
            Op::Commit {
                client_id,
                file_name,
                mut sink,
                size,
                cksum,
            } => {
                self.open_sinks -= 1;
                sink.truncate(size as usize);
                self.files.insert((client_id, file_name), (sink, cksum));
                Completion::Committed(Ok(()))
            }
            Op::Discard { sink } => {
                self.open_sinks = self.open_sinks.saturating_sub(1);
                self.discarded += 1;
                if self.recycle.is_none() {
                    self.recycle = Some(sink);
                }
                return None;
            }
        })
    }
}
