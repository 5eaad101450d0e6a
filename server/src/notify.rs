//! Readiness and stopping notifications to systemd (`Type=notify`, see
//! `contrib/systemd/cyberbackup-server.service`). Without `NOTIFY_SOCKET` in the
//! environment (not started by systemd) both are no-ops.
//!
//! The `sd-notify` crate sends the datagram: a small crate with only `libc` under it.
//! The alternatives do much more than we need: `systemd` binds the C libsystemd (its
//! headers at build time, the library at run time), `libsystemd` (pure Rust) brings the
//! journal, unit and credential APIs with their dependencies.

/// Tells systemd the server is ready: every shard listens (`READY=1`).
pub fn ready() {
    send(sd_notify::NotifyState::Ready, "READY=1");
}

/// Tells systemd the server is draining after a signal (`STOPPING=1`).
pub fn stopping() {
    send(sd_notify::NotifyState::Stopping, "STOPPING=1");
}

fn send(state: sd_notify::NotifyState<'_>, what: &str) {
    if let Err(e) = sd_notify::notify(&[state]) {
        // Not fatal: systemd then times the start out, and says so in its own log.
        tracing::warn!(error = %e, "could not send {what} to systemd (NOTIFY_SOCKET)");
    }
}
