//! Progress events and cancellation.
//!
//! An upload calls its progress callback at each phase change and after every packet;
//! building a [`Progress`] costs a few integer stores, so the callback is cheap enough
//! to run per packet. [`Cancel`] is checked before every packet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Sending packets.
    Sending,
    /// All packets sent; waiting for the server's checksum.
    Verifying,
    /// The checksum differed; the file is being sent again.
    Retrying,
    /// The connection dropped; reconnecting to start the file again.
    Reconnecting,
    /// Stored and acknowledged.
    Done,
}

/// One progress event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Progress<'a> {
    pub file: &'a str,
    pub phase: Phase,
    /// Plaintext bytes sent so far in this attempt.
    pub bytes: u64,
    /// File size.
    pub total: u64,
    /// Packets sent so far in this attempt, and in all.
    pub packet: u32,
    pub total_packets: u32,
    /// Attempt number, from 1 (checksum retries and reconnects count).
    pub attempt: u32,
    /// Average rate of this attempt so far, bytes per second.
    pub bytes_per_sec: f64,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// A cancellation flag shared with whoever may cancel (a signal handler, a UI).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// The shared flag, e.g. for `signal_hook::flag::register`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}
