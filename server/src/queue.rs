//! Draining a channel in batches: the registry and the committer both take everything
//! already queued, so that work arriving together is done together (group commit).

use std::sync::mpsc::Receiver;

/// Waits for one item, then takes whatever else is queued, up to `max` in all. `None`
/// once every sender is gone.
pub fn recv_batch<T>(rx: &Receiver<T>, max: usize) -> Option<Vec<T>> {
    let first = rx.recv().ok()?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(more) => batch.push(more),
            Err(_) => break,
        }
    }
    Some(batch)
}
