//! The conformance suites: what every [`BlobStore`] and every [`Registry`] must do.
//!
//! Each test is a generic function over a harness that opens the implementation on
//! some backing (a temp dir, a scratch database or bucket) and can open it again on
//! the same backing (to check what survives). An implementation's tests module defines
//! its harness and expands [`blob_store_conformance!`](crate::blob_store_conformance)
//! or [`registry_conformance!`](crate::registry_conformance), which makes one `#[test]`
//! per function here, so a new implementation runs the same suite by adding one line.

use super::blob::{BlobKey, BlobKind, BlobStore};
use super::registry::{
    ChunkMove, ChunkRecord, CommitOutcome, PackLoc, PackRecord, Registry, Unreferenced,
    MAX_NAME_LEN,
};
use super::{Capabilities, ChunkId, PackId, RepoError, SnapshotHeader};

/// Opens a blob store on the harness's backing.
pub(crate) trait BlobHarness {
    type Store: BlobStore;
    /// Whether the backing can be had here (an object store to reach); when not, the
    /// suite's tests return at once. The local harness always is.
    fn available() -> bool {
        true
    }
    /// A fresh, empty backing.
    fn new() -> Self;
    /// A store on the backing; every store opened before is dropped first.
    fn open(&mut self) -> Self::Store;
}

/// Opens a registry on the harness's backing.
pub(crate) trait RegistryHarness {
    type Registry: Registry;
    /// Whether the backing can be had here (a database server to reach); when not,
    /// the suite's tests return at once. Every local harness always is.
    fn available() -> bool {
        true
    }
    fn new() -> Self;
    fn open(&mut self) -> Self::Registry;
}

/// One `#[test]` per blob store conformance test, for harness `$h`.
#[macro_export]
macro_rules! blob_store_conformance {
    ($h:ty) => {
        $crate::blob_store_conformance!(@tests $h;
            blob_round_trip, blob_put_replaces_and_is_idempotent, blob_namespaces_are_apart,
            blob_list_and_delete, blob_group_batch, blob_large_batch, blob_survives_reopen,
            blob_batch_delete_and_account_removal, blob_ready, blob_packs_are_a_kind_apart);
    };
    (@tests $h:ty; $($t:ident),*) => {
        mod blob_conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $t() {
                    use $crate::repo::conformance::BlobHarness as _;
                    if !<$h>::available() {
                        return;
                    }
                    $crate::repo::conformance::$t(<$h>::new());
                }
            )*
        }
    };
}

/// One `#[test]` per registry conformance test, for harness `$h`.
#[macro_export]
macro_rules! registry_conformance {
    ($h:ty) => {
        $crate::registry_conformance!(@tests $h;
            reg_accounts_and_devices, reg_wrapped_key_quota_and_usage,
            reg_chunks_held_is_per_account_and_touches, reg_chunks_sound_reads_only,
            reg_insert_chunks_is_all_or_nothing,
            reg_commit_requires_every_chunk, reg_commit_is_idempotent_and_never_replaces,
            reg_snapshots_are_per_account, reg_unreferenced_chunks_and_their_deletion,
            reg_a_batch_spares_what_snapshots_committed_since_name,
            reg_damaged_chunk_is_not_held_until_put_again, reg_chunk_records_page,
            reg_survives_reopen, reg_packs_place_move_and_go);
    };
    (@tests $h:ty; $($t:ident),*) => {
        mod registry_conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $t() {
                    use $crate::repo::conformance::RegistryHarness as _;
                    if !<$h>::available() {
                        return;
                    }
                    $crate::repo::conformance::$t(<$h>::new());
                }
            )*
        }
    };
}

// ---- blob stores ----

pub(crate) fn blob_batch_delete_and_account_removal<H: BlobHarness>(mut h: H) {
    let s = h.open();
    let keys: Vec<BlobKey> = (0..20u8)
        .flat_map(|i| [BlobKey::Chunk(1, [i; 32]), BlobKey::Chunk(2, [i; 32])])
        .chain([
            BlobKey::SnapshotBody(1, [1; 16]),
            BlobKey::SnapshotBody(2, [1; 16]),
        ])
        .collect();
    let items: Vec<(BlobKey, &[u8])> = keys.iter().map(|k| (*k, &b"blob"[..])).collect();
    s.put_batch(&items).unwrap();
    // A batch delete takes present and absent keys alike.
    let gone = [BlobKey::Chunk(1, [0; 32]), BlobKey::Chunk(1, [99; 32])];
    s.delete_batch(&gone).unwrap();
    assert_eq!(s.get(&gone[0]).unwrap(), None);
    assert_eq!(s.list(1, BlobKind::Chunk).unwrap().len(), 19);
    s.delete_account(1).unwrap();
    assert!(s.list(1, BlobKind::Chunk).unwrap().is_empty());
    assert!(s.list(1, BlobKind::SnapshotBody).unwrap().is_empty());
    assert_eq!(s.get(&BlobKey::SnapshotBody(1, [1; 16])).unwrap(), None);
    assert_eq!(
        s.list(2, BlobKind::Chunk).unwrap().len(),
        20,
        "another account's stay"
    );
    assert_eq!(s.list(2, BlobKind::SnapshotBody).unwrap().len(), 1);
    s.delete_account(1).unwrap();
    s.delete_account(3).unwrap();
    // An account's blobs may be put again after its removal.
    s.put_batch(&[(BlobKey::Chunk(1, [5; 32]), b"again")])
        .unwrap();
    assert_eq!(
        s.get(&BlobKey::Chunk(1, [5; 32])).unwrap().as_deref(),
        Some(&b"again"[..])
    );
}

pub(crate) fn blob_packs_are_a_kind_apart<H: BlobHarness>(mut h: H) {
    let s = h.open();
    // A pack id that is a snapshot id's bytes too: kinds never share a key.
    let (pack, body) = (BlobKey::Pack(5, [3; 16]), BlobKey::SnapshotBody(5, [3; 16]));
    let bytes: Vec<u8> = (0..200u8).collect();
    s.put_batch(&[
        (pack, &bytes),
        (body, b"body"),
        (BlobKey::Chunk(5, [3; 32]), b"c"),
    ])
    .unwrap();
    assert_eq!(s.get(&pack).unwrap().as_deref(), Some(&bytes[..]));
    assert_eq!(s.get(&body).unwrap().as_deref(), Some(&b"body"[..]));
    assert_eq!(
        s.get_range(&pack, 100, 10).unwrap().as_deref(),
        Some(&bytes[100..110])
    );
    assert_eq!(s.len(&pack).unwrap(), Some(200));
    assert_eq!(s.list(5, BlobKind::Pack).unwrap(), vec![vec![3u8; 16]]);
    assert_eq!(
        s.list(5, BlobKind::SnapshotBody).unwrap(),
        vec![vec![3u8; 16]]
    );
    assert_eq!(s.list(5, BlobKind::Chunk).unwrap(), vec![vec![3u8; 32]]);
    assert!(s.list(6, BlobKind::Pack).unwrap().is_empty());
    s.delete_account(5).unwrap();
    for kind in BlobKind::ALL {
        assert!(s.list(5, kind).unwrap().is_empty(), "{kind:?}");
    }
    assert_eq!(s.get(&pack).unwrap(), None);
}

pub(crate) fn blob_ready<H: BlobHarness>(mut h: H) {
    h.open().ready().unwrap();
}

pub(crate) fn blob_round_trip<H: BlobHarness>(mut h: H) {
    let s = h.open();
    let k = BlobKey::Chunk(1, [7; 32]);
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    assert_eq!(s.get(&k).unwrap(), None);
    assert_eq!(s.len(&k).unwrap(), None);
    assert_eq!(s.get_range(&k, 0, 10).unwrap(), None);
    s.put_batch(&[(k, &data)]).unwrap();
    assert_eq!(s.get(&k).unwrap().as_ref(), Some(&data));
    assert_eq!(s.len(&k).unwrap(), Some(10_000));
    assert_eq!(
        s.get_range(&k, 100, 50).unwrap().as_deref(),
        Some(&data[100..150])
    );
    assert_eq!(
        s.get_range(&k, 9_990, 50).unwrap().as_deref(),
        Some(&data[9_990..]),
        "a range past the end is cut at the end"
    );
    assert_eq!(s.get_range(&k, 10_000, 5).unwrap(), Some(vec![]));
    assert_eq!(s.get_range(&k, u64::MAX, u64::MAX).unwrap(), Some(vec![]));
    let empty = BlobKey::SnapshotBody(1, [0; 16]);
    s.put_batch(&[(empty, &[])]).unwrap();
    assert_eq!(s.get(&empty).unwrap(), Some(vec![]));
    assert_eq!(s.len(&empty).unwrap(), Some(0));
}

pub(crate) fn blob_put_replaces_and_is_idempotent<H: BlobHarness>(mut h: H) {
    let s = h.open();
    let k = BlobKey::Chunk(1, [1; 32]);
    s.put_batch(&[(k, b"same")]).unwrap();
    s.put_batch(&[(k, b"same")]).unwrap();
    assert_eq!(s.get(&k).unwrap().as_deref(), Some(&b"same"[..]));
    s.put_batch(&[(k, b"repaired bytes")]).unwrap();
    assert_eq!(s.get(&k).unwrap().as_deref(), Some(&b"repaired bytes"[..]));
    // The same key twice in one batch: the store ends with one of them, whole.
    s.put_batch(&[(k, b"first"), (k, b"first")]).unwrap();
    assert_eq!(s.get(&k).unwrap().as_deref(), Some(&b"first"[..]));
}

pub(crate) fn blob_namespaces_are_apart<H: BlobHarness>(mut h: H) {
    let s = h.open();
    let id = [9u8; 32];
    let mut short = [0u8; 16];
    short.copy_from_slice(&id[..16]);
    let keys = [
        BlobKey::Chunk(1, id),
        BlobKey::Chunk(2, id),
        BlobKey::SnapshotBody(1, short),
        BlobKey::SnapshotBody(2, short),
    ];
    let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 10]).collect();
    let items: Vec<(BlobKey, &[u8])> = keys
        .iter()
        .copied()
        .zip(data.iter().map(|d| &d[..]))
        .collect();
    s.put_batch(&items).unwrap();
    for (k, d) in keys.iter().zip(&data) {
        assert_eq!(s.get(k).unwrap().as_ref(), Some(d), "{k:?}");
    }
    assert!(s.delete(&keys[0]).unwrap());
    assert_eq!(s.get(&keys[0]).unwrap(), None);
    assert_eq!(
        s.get(&keys[1]).unwrap().as_ref(),
        Some(&data[1]),
        "another account's"
    );
    assert_eq!(
        s.get(&keys[2]).unwrap().as_ref(),
        Some(&data[2]),
        "another kind's"
    );
    assert!(s.list(3, BlobKind::Chunk).unwrap().is_empty());
}

pub(crate) fn blob_list_and_delete<H: BlobHarness>(mut h: H) {
    let s = h.open();
    assert!(s.list(1, BlobKind::Chunk).unwrap().is_empty());
    let ids: Vec<ChunkId> = (0..20u8)
        .map(|i| {
            let mut id = [i; 32];
            id[0] = i.wrapping_mul(37); // spread over prefix directories
            id
        })
        .collect();
    for id in &ids {
        s.put_batch(&[(BlobKey::Chunk(1, *id), &id[..])]).unwrap();
    }
    s.put_batch(&[(BlobKey::SnapshotBody(1, [5; 16]), b"body")])
        .unwrap();
    let mut listed = s.list(1, BlobKind::Chunk).unwrap();
    listed.sort();
    let mut want: Vec<Vec<u8>> = ids.iter().map(|i| i.to_vec()).collect();
    want.sort();
    assert_eq!(listed, want);
    assert_eq!(
        s.list(1, BlobKind::SnapshotBody).unwrap(),
        vec![vec![5u8; 16]]
    );
    assert!(s.list(2, BlobKind::Chunk).unwrap().is_empty());
    assert!(s.delete(&BlobKey::Chunk(1, ids[3])).unwrap());
    assert!(
        !s.delete(&BlobKey::Chunk(1, ids[3])).unwrap(),
        "deleted already"
    );
    assert_eq!(s.list(1, BlobKind::Chunk).unwrap().len(), 19);
}

pub(crate) fn blob_group_batch<H: BlobHarness>(mut h: H) {
    let s = h.open();
    let blobs: Vec<(BlobKey, Vec<u8>)> = (0..64u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            (
                BlobKey::Chunk(1 + (i % 3) as i64, id),
                vec![i as u8; i as usize * 100],
            )
        })
        .collect();
    let items: Vec<(BlobKey, &[u8])> = blobs.iter().map(|(k, d)| (*k, &d[..])).collect();
    s.put_batch(&items).unwrap();
    for (k, d) in &blobs {
        assert_eq!(s.get(k).unwrap().as_ref(), Some(d));
    }
}

/// A batch of large blobs (of odd sizes, one key twice with the same bytes), as a
/// backup of large files sends: each reads back whole.
pub(crate) fn blob_large_batch<H: BlobHarness>(mut h: H) {
    let s = h.open();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut blobs: Vec<(BlobKey, Vec<u8>)> = (0..12u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let len = (64 << 10) - 1 + i as usize * 111_111;
            let data = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (BlobKey::Chunk(1, id), data)
        })
        .collect();
    blobs.push(blobs[5].clone());
    let items: Vec<(BlobKey, &[u8])> = blobs.iter().map(|(k, d)| (*k, &d[..])).collect();
    s.put_batch(&items).unwrap();
    for (k, d) in &blobs {
        assert_eq!(s.get(k).unwrap().as_ref(), Some(d));
    }
    assert_eq!(s.list(1, BlobKind::Chunk).unwrap().len(), 12);
}

pub(crate) fn blob_survives_reopen<H: BlobHarness>(mut h: H) {
    let k = BlobKey::Chunk(4, [4; 32]);
    let b = BlobKey::SnapshotBody(4, [4; 16]);
    {
        let s = h.open();
        s.put_batch(&[(k, b"chunk bytes"), (b, b"body bytes")])
            .unwrap();
    }
    let s = h.open();
    assert_eq!(s.get(&k).unwrap().as_deref(), Some(&b"chunk bytes"[..]));
    assert_eq!(s.get(&b).unwrap().as_deref(), Some(&b"body bytes"[..]));
    assert_eq!(s.list(4, BlobKind::Chunk).unwrap(), vec![vec![4u8; 32]]);
}

// ---- registries ----

pub(crate) fn chunk(id: ChunkId, len: u64, now: i64) -> ChunkRecord {
    ChunkRecord {
        id,
        stored_len: len,
        hash: *blake3::hash(&id).as_bytes(),
        stored_ms: now,
        touched_ms: now,
        damaged_ms: None,
        pack: None,
    }
}

/// `chunk`, placed in a pack.
fn packed(id: ChunkId, len: u64, now: i64, pack: PackId, offset: u64) -> ChunkRecord {
    ChunkRecord {
        pack: Some(PackLoc { pack, offset }),
        ..chunk(id, len, now)
    }
}

fn pack_rec(id: PackId, len: u64) -> PackRecord {
    PackRecord {
        id,
        stored_len: len,
        created_ms: 1,
    }
}

pub(crate) fn header(id: u8, body_len: u64) -> SnapshotHeader {
    SnapshotHeader {
        id: [id; 16],
        time_unix_ms: 1_700_000_000_000 + id as i64,
        host: "host".into(),
        tags: vec!["daily".into(), "with\nnewline".into()],
        paths: vec!["/home/a".into(), "/etc".into()],
        files: 10,
        dirs: 2,
        size: 12345,
        device: 1,
        body_len,
        stored: 99,
        committed_ms: 0,
    }
}

/// A new account with one device, key derived from `n`.
fn account<R: Registry>(r: &mut R, n: u8) -> i64 {
    r.create_account(&format!("user{n}"), &[n; 32], "laptop", 1000)
        .unwrap()
        .0
}

pub(crate) fn reg_accounts_and_devices<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let (a, d) = r.create_account("alice", &[1; 32], "laptop", 1000).unwrap();
    assert!(matches!(
        r.create_account("alice", &[2; 32], "other", 1000),
        Err(RepoError::NameTaken)
    ));
    assert!(matches!(
        r.create_account("bob", &[1; 32], "same key", 1000),
        Err(RepoError::KeyTaken)
    ));
    assert!(matches!(
        r.create_account(&"x".repeat(MAX_NAME_LEN + 1), &[3; 32], "d", 1000),
        Err(RepoError::InvalidArgument(_))
    ));
    assert!(matches!(
        r.create_account("", &[3; 32], "d", 1000),
        Err(RepoError::InvalidArgument(_))
    ));
    r.create_account(&"x".repeat(MAX_NAME_LEN), &[3; 32], "d", 1000)
        .unwrap();
    assert_eq!(r.account_by_name("alice").unwrap(), Some(a));
    assert_eq!(r.account_by_name("nobody").unwrap(), None);
    let dev = r.device_by_key(&[1; 32]).unwrap().unwrap();
    assert_eq!((dev.id, dev.account, dev.caps), (d, a, Capabilities::ALL));
    assert_eq!(dev.name, "laptop");
    assert!(!dev.revoked());
    assert_eq!(r.device_by_key(&[9; 32]).unwrap(), None);

    let (b, _) = r.create_account("bob", &[4; 32], "pc", 1000).unwrap();
    assert_eq!(r.accounts().unwrap().len(), 3);
    let phone = r
        .add_device(a, &[5; 32], "phone", Capabilities::BACKUP, 2000)
        .unwrap();
    assert!(matches!(
        r.add_device(b, &[5; 32], "again", Capabilities::READ, 2000),
        Err(RepoError::KeyTaken)
    ));
    assert!(matches!(
        r.add_device(999, &[6; 32], "x", Capabilities::READ, 2000),
        Err(RepoError::NoSuchAccount(999))
    ));
    let dev = r.device_by_key(&[5; 32]).unwrap().unwrap();
    assert_eq!(
        (dev.id, dev.account, dev.caps),
        (phone, a, Capabilities::BACKUP)
    );
    let list = r.list_devices(a).unwrap();
    assert_eq!(
        list.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![d, phone]
    );
    assert_eq!(r.list_devices(b).unwrap().len(), 1);
    // Bob cannot revoke Alice's device.
    assert!(!r.revoke_device(b, phone, 3000).unwrap());
    assert!(!r.device_by_key(&[5; 32]).unwrap().unwrap().revoked());
    assert!(r.revoke_device(a, phone, 3000).unwrap());
    assert!(r.revoke_device(a, phone, 4000).unwrap());
    assert_eq!(
        r.device_by_key(&[5; 32]).unwrap().unwrap().revoked_ms,
        Some(3000),
        "the first revocation counts"
    );
}

pub(crate) fn reg_wrapped_key_quota_and_usage<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    assert_eq!(r.wrapped_key(a).unwrap(), None);
    r.set_wrapped_key(a, b"wrapped").unwrap();
    assert_eq!(r.wrapped_key(a).unwrap().as_deref(), Some(&b"wrapped"[..]));
    assert_eq!(r.wrapped_key(b).unwrap(), None);
    assert!(matches!(
        r.set_wrapped_key(77, b"k"),
        Err(RepoError::NoSuchAccount(77))
    ));
    assert_eq!(r.usage(a).unwrap(), Default::default());
    r.set_quota(a, Some(1 << 40)).unwrap();
    r.insert_chunks(
        &[],
        &[
            (a, chunk([1; 32], 100, 0)),
            (a, chunk([2; 32], 50, 0)),
            (b, chunk([1; 32], 7, 0)),
        ],
    )
    .unwrap();
    r.commit_snapshot(a, &header(1, 30), &[[1; 32]], &[0; 32], 0)
        .unwrap();
    let u = r.usage(a).unwrap();
    assert_eq!(
        (u.chunks, u.stored_bytes, u.snapshots, u.quota),
        (2, 180, 1, Some(1 << 40))
    );
    // A chunk put again with another length, and a forgotten snapshot.
    r.insert_chunks(&[], &[(a, chunk([2; 32], 60, 0))]).unwrap();
    assert!(r.forget_snapshot(a, &[1; 16]).unwrap());
    let u = r.usage(a).unwrap();
    assert_eq!((u.chunks, u.stored_bytes, u.snapshots), (2, 160, 0));
    assert_eq!(r.usage(b).unwrap().stored_bytes, 7);
    r.set_quota(a, None).unwrap();
    assert_eq!(r.usage(a).unwrap().quota, None);
    assert!(matches!(r.usage(77), Err(RepoError::NoSuchAccount(77))));
}

pub(crate) fn reg_chunks_held_is_per_account_and_touches<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    let ids = [[1u8; 32], [2; 32], [3; 32]];
    assert_eq!(r.chunks_held(a, &ids, 10).unwrap(), vec![false; 3]);
    r.insert_chunks(&[], &[(a, chunk(ids[0], 1, 10)), (a, chunk(ids[2], 1, 10))])
        .unwrap();
    assert_eq!(
        r.chunks_held(a, &ids, 500).unwrap(),
        vec![true, false, true]
    );
    assert_eq!(
        r.chunks_held(b, &ids, 500).unwrap(),
        vec![false; 3],
        "per account"
    );
    let recs = r.chunk_records(a, None, 10).unwrap();
    assert_eq!(recs.len(), 2);
    assert!(recs
        .iter()
        .all(|c| c.touched_ms == 500 && c.stored_ms == 10));
    // A touch never moves back in time.
    r.chunks_held(a, &ids, 100).unwrap();
    assert!(r
        .chunk_records(a, None, 10)
        .unwrap()
        .iter()
        .all(|c| c.touched_ms == 500));
}

pub(crate) fn reg_chunks_sound_reads_only<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    let d = chunk([2; 32], 10, 10);
    r.insert_chunks(&[], &[(a, chunk([1; 32], 10, 10)), (a, d.clone())])
        .unwrap();
    assert!(r.mark_damaged(a, &d.id, &d.hash, 20).unwrap());
    assert_eq!(
        r.chunks_sound(a, &[[1; 32], [2; 32], [3; 32]]).unwrap(),
        vec![true, false, false],
        "held, damaged, absent"
    );
    assert_eq!(
        r.chunks_sound(b, &[[1; 32]]).unwrap(),
        vec![false],
        "per account"
    );
    // Neither the check nor a commit naming the chunk touches it.
    r.commit_snapshot(a, &header(1, 0), &[[1; 32]], &[0; 32], 500)
        .unwrap();
    let recs = r.chunk_records(a, None, 10).unwrap();
    assert!(recs.iter().all(|c| c.touched_ms == 10), "{recs:?}");
}

pub(crate) fn reg_insert_chunks_is_all_or_nothing<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    r.insert_chunks(&[], &[(a, chunk([1; 32], 1, 0)), (b, chunk([2; 32], 1, 0))])
        .unwrap();
    assert_eq!(r.chunks_held(a, &[[1; 32]], 0).unwrap(), vec![true]);
    assert_eq!(r.chunks_held(b, &[[2; 32]], 0).unwrap(), vec![true]);
    // One record of an unknown account fails the whole batch.
    assert!(r
        .insert_chunks(
            &[],
            &[(a, chunk([3; 32], 1, 0)), (999, chunk([4; 32], 1, 0))]
        )
        .is_err());
    assert_eq!(r.chunks_held(a, &[[3; 32]], 0).unwrap(), vec![false]);
    assert_eq!(r.usage(a).unwrap().chunks, 1);
}

pub(crate) fn reg_commit_requires_every_chunk<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    r.insert_chunks(&[], &[(a, chunk([1; 32], 1, 0)), (b, chunk([2; 32], 1, 0))])
        .unwrap();
    let named = [[1u8; 32], [2; 32], [3; 32], [2; 32]];
    match r.commit_snapshot(a, &header(1, 0), &named, &[0; 32], 5) {
        // [2; 32] is Bob's: it does not count for Alice. Each missing id once.
        Err(RepoError::MissingChunks(m)) => assert_eq!(m, vec![[2; 32], [3; 32]]),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.get_snapshot(a, &[1; 16]).unwrap(), None);
    assert_eq!(r.usage(a).unwrap().snapshots, 0);
    r.insert_chunks(&[], &[(a, chunk([2; 32], 1, 0)), (a, chunk([3; 32], 1, 0))])
        .unwrap();
    assert_eq!(
        r.commit_snapshot(a, &header(1, 0), &named, &[0; 32], 5)
            .unwrap(),
        CommitOutcome::Committed
    );
    let s = r.get_snapshot(a, &[1; 16]).unwrap().unwrap();
    let mut want = header(1, 0);
    want.committed_ms = 5;
    assert_eq!(s.header, want);
    assert_eq!(s.chunks, named.to_vec(), "the list as given");
    assert_eq!(s.created_ms, 5);
    // An empty snapshot needs no chunk.
    r.commit_snapshot(a, &header(2, 0), &[], &[0; 32], 5)
        .unwrap();
    assert!(matches!(
        r.commit_snapshot(77, &header(3, 0), &[], &[0; 32], 5),
        Err(RepoError::NoSuchAccount(77))
    ));
}

pub(crate) fn reg_commit_is_idempotent_and_never_replaces<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    r.insert_chunks(&[], &[(a, chunk([1; 32], 1, 0)), (a, chunk([2; 32], 1, 0))])
        .unwrap();
    let hdr = header(1, 10);
    assert_eq!(
        r.commit_snapshot(a, &hdr, &[[1; 32]], &[7; 32], 1).unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        r.commit_snapshot(a, &hdr, &[[1; 32]], &[7; 32], 2).unwrap(),
        CommitOutcome::AlreadyCommitted
    );
    assert!(matches!(
        r.commit_snapshot(a, &hdr, &[[1; 32]], &[8; 32], 3),
        Err(RepoError::SnapshotExists)
    ));
    assert!(matches!(
        r.commit_snapshot(a, &hdr, &[[2; 32]], &[7; 32], 3),
        Err(RepoError::SnapshotExists)
    ));
    let s = r.get_snapshot(a, &[1; 16]).unwrap().unwrap();
    assert_eq!(
        (s.body_hash, s.chunks, s.created_ms),
        ([7; 32], vec![[1; 32]], 1)
    );
    assert_eq!(r.list_snapshots(a).unwrap().len(), 1);
}

pub(crate) fn reg_snapshots_are_per_account<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    r.insert_chunks(&[], &[(a, chunk([1; 32], 1, 0))]).unwrap();
    for id in [3u8, 1, 2] {
        r.commit_snapshot(a, &header(id, 0), &[[1; 32]], &[0; 32], 0)
            .unwrap();
    }
    let ids: Vec<_> = r
        .list_snapshots(a)
        .unwrap()
        .iter()
        .map(|h| h.id[0])
        .collect();
    assert_eq!(ids, vec![1, 2, 3], "oldest first");
    assert!(r.list_snapshots(b).unwrap().is_empty());
    assert_eq!(r.get_snapshot(b, &[1; 16]).unwrap(), None);
    assert!(!r.forget_snapshot(b, &[1; 16]).unwrap());
    assert!(r.get_snapshot(a, &[1; 16]).unwrap().is_some());
    // Bob may use the same snapshot id: his own.
    r.commit_snapshot(b, &header(1, 0), &[], &[1; 32], 0)
        .unwrap();
    assert_eq!(
        r.get_snapshot(a, &[1; 16]).unwrap().unwrap().body_hash,
        [0; 32]
    );
    assert!(r.forget_snapshot(a, &[1; 16]).unwrap());
    assert!(!r.forget_snapshot(a, &[1; 16]).unwrap());
    assert_eq!(r.get_snapshot(a, &[1; 16]).unwrap(), None);
    assert!(r.get_snapshot(b, &[1; 16]).unwrap().is_some());
}

pub(crate) fn reg_unreferenced_chunks_and_their_deletion<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    // 1: referenced, old; 2: unreferenced, old; 3: unreferenced, recent; 4: old, referenced
    // by a snapshot that gets forgotten.
    r.insert_chunks(
        &[],
        &[
            (a, chunk([1; 32], 1, 100)),
            (a, chunk([2; 32], 1, 100)),
            (a, chunk([3; 32], 1, 900)),
            (a, chunk([4; 32], 1, 100)),
            (b, chunk([2; 32], 1, 100)),
        ],
    )
    .unwrap();
    r.commit_snapshot(a, &header(1, 0), &[[1; 32]], &[0; 32], 100)
        .unwrap();
    r.commit_snapshot(a, &header(2, 0), &[[4; 32]], &[0; 32], 100)
        .unwrap();
    let ids = |v: Vec<ChunkRecord>| v.into_iter().map(|c| c.id[0]).collect::<Vec<_>>();
    let first = r.unreferenced_chunks(a, 500).unwrap();
    assert_eq!(ids(first.chunks.clone()), vec![2]);
    let mut snaps: Vec<u8> = first.snapshots.iter().map(|s| s.id[0]).collect();
    snaps.sort();
    assert_eq!(snaps, vec![1, 2], "the reading names the snapshots it read");
    assert!(r.forget_snapshot(a, &[2; 16]).unwrap());
    let found = r.unreferenced_chunks(a, 500).unwrap();
    assert_eq!(ids(found.chunks.clone()), vec![2, 4], "in id order");
    // Chunk 4 is asked for (touched) before the delete: it stays.
    assert_eq!(r.chunks_held(a, &[[4; 32]], 600).unwrap(), vec![true]);
    let all = |f: &Unreferenced| f.chunks.iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(r
            .delete_unreferenced_chunks(a, &all(&found), 500, &found.snapshots)
            .unwrap()),
        vec![2]
    );
    assert_eq!(
        r.chunks_held(a, &[[1; 32], [2; 32], [3; 32], [4; 32]], 600)
            .unwrap(),
        vec![true, false, true, true]
    );
    assert_eq!(
        r.chunks_held(b, &[[2; 32]], 600).unwrap(),
        vec![true],
        "Bob's own"
    );
    assert_eq!(r.usage(a).unwrap().chunks, 3);
    // Later, everything unreferenced and old goes; the referenced chunk never.
    let later = r.unreferenced_chunks(a, 10_000).unwrap();
    assert_eq!(ids(later.chunks.clone()), vec![3, 4]);
    let gone = r
        .delete_unreferenced_chunks(a, &all(&later), 10_000, &later.snapshots)
        .unwrap();
    assert_eq!(ids(gone), vec![3, 4]);
    assert_eq!(r.chunks_held(a, &[[1; 32]], 600).unwrap(), vec![true]);
    assert_eq!(r.usage(a).unwrap().chunks, 1);
}

/// Collection reads once, then deletes in batches while commits go on: a snapshot
/// committed after the reading (or an id forgotten and committed again with other
/// chunks) keeps what it names, though the reading found it unreferenced.
pub(crate) fn reg_a_batch_spares_what_snapshots_committed_since_name<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    r.insert_chunks(
        &[],
        &[
            (a, chunk([1; 32], 1, 100)),
            (a, chunk([2; 32], 1, 100)),
            (a, chunk([3; 32], 1, 100)),
            (a, chunk([4; 32], 1, 100)),
        ],
    )
    .unwrap();
    r.commit_snapshot(a, &header(1, 0), &[[4; 32]], &[1; 32], 100)
        .unwrap();
    let found = r.unreferenced_chunks(a, 500).unwrap();
    let ids: Vec<ChunkId> = found.chunks.iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![[1; 32], [2; 32], [3; 32]]);
    // After the reading: a new snapshot names 1; snapshot 1 is forgotten and its id
    // committed again, with the same body hash, naming 2.
    r.commit_snapshot(a, &header(2, 0), &[[1; 32]], &[2; 32], 200)
        .unwrap();
    assert!(r.forget_snapshot(a, &[1; 16]).unwrap());
    r.commit_snapshot(a, &header(1, 0), &[[2; 32]], &[1; 32], 200)
        .unwrap();
    let gone = r
        .delete_unreferenced_chunks(a, &ids, 500, &found.snapshots)
        .unwrap();
    assert_eq!(
        gone.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![[3; 32]],
        "only the chunk no snapshot names now"
    );
    assert_eq!(
        r.chunks_sound(a, &[[1; 32], [2; 32], [3; 32], [4; 32]])
            .unwrap(),
        vec![true, true, false, true]
    );
}

pub(crate) fn reg_damaged_chunk_is_not_held_until_put_again<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let c = chunk([1; 32], 10, 0);
    r.insert_chunks(&[], &[(a, c.clone())]).unwrap();
    assert!(
        !r.mark_damaged(a, &c.id, &[0xee; 32], 5).unwrap(),
        "another hash"
    );
    assert!(r.mark_damaged(a, &c.id, &c.hash, 5).unwrap());
    assert!(
        !r.mark_damaged(a, &c.id, &c.hash, 6).unwrap(),
        "marked already"
    );
    assert_eq!(r.chunks_held(a, &[c.id], 7).unwrap(), vec![false]);
    assert_eq!(
        r.chunks_recorded(a, &[c.id, [2; 32]]).unwrap(),
        vec![true, false],
        "a damaged chunk still has its record"
    );
    assert!(matches!(
        r.commit_snapshot(a, &header(1, 0), &[c.id], &[0; 32], 7),
        Err(RepoError::MissingChunks(m)) if m == vec![c.id]
    ));
    assert_eq!(r.chunk_records(a, None, 5).unwrap()[0].damaged_ms, Some(5));
    r.insert_chunks(&[], &[(a, chunk([1; 32], 10, 8))]).unwrap();
    assert_eq!(r.chunks_held(a, &[c.id], 9).unwrap(), vec![true]);
    assert_eq!(r.chunk_records(a, None, 5).unwrap()[0].damaged_ms, None);
    assert_eq!(r.usage(a).unwrap().stored_bytes, 10);
}

pub(crate) fn reg_chunk_records_page<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    let recs: Vec<_> = (0..25u8)
        .rev()
        .map(|i| (a, chunk([i; 32], i as u64, 0)))
        .collect();
    r.insert_chunks(&[], &recs).unwrap();
    r.insert_chunks(&[], &[(b, chunk([100; 32], 1, 0))])
        .unwrap();
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = r.chunk_records(a, after.as_ref(), 10).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        after = Some(page.last().unwrap().id);
        all.extend(page);
    }
    assert_eq!(all.len(), 25);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "in id order");
    assert_eq!(all[7], chunk([7; 32], 7, 0));
}

pub(crate) fn reg_survives_reopen<H: RegistryHarness>(mut h: H) {
    let (a, d) = {
        let mut r = h.open();
        let (a, d) = r.create_account("alice", &[1; 32], "laptop", 1).unwrap();
        r.set_wrapped_key(a, b"key").unwrap();
        r.set_quota(a, Some(1000)).unwrap();
        r.insert_chunks(&[], &[(a, chunk([1; 32], 5, 1))]).unwrap();
        r.commit_snapshot(a, &header(1, 3), &[[1; 32]], &[2; 32], 1)
            .unwrap();
        (a, d)
    };
    let mut r = h.open();
    assert_eq!(r.device_by_key(&[1; 32]).unwrap().unwrap().id, d);
    assert_eq!(r.wrapped_key(a).unwrap().as_deref(), Some(&b"key"[..]));
    assert_eq!(r.chunks_held(a, &[[1; 32]], 2).unwrap(), vec![true]);
    let s = r.get_snapshot(a, &[1; 16]).unwrap().unwrap();
    let mut want = header(1, 3);
    want.committed_ms = s.created_ms;
    assert_eq!((s.header, s.body_hash), (want, [2; 32]));
    let u = r.usage(a).unwrap();
    assert_eq!(
        (u.chunks, u.stored_bytes, u.snapshots, u.quota),
        (1, 8, 1, Some(1000))
    );
}

pub(crate) fn reg_packs_place_move_and_go<H: RegistryHarness>(mut h: H) {
    let mut r = h.open();
    let a = account(&mut r, 1);
    let b = account(&mut r, 2);
    let (p1, p2, p3) = ([1u8; 16], [2u8; 16], [3u8; 16]);
    // Chunks 1-3 in pack 1, chunk 4 a blob of its own; Bob has a pack of the same id.
    r.insert_chunks(
        &[(a, pack_rec(p1, 1000)), (b, pack_rec(p1, 50))],
        &[
            (a, packed([3; 32], 100, 0, p1, 300)),
            (a, packed([1; 32], 100, 0, p1, 0)),
            (a, packed([2; 32], 200, 0, p1, 100)),
            (a, chunk([4; 32], 10, 0)),
            (b, packed([9; 32], 5, 0, p1, 0)),
        ],
    )
    .unwrap();
    let loc = |pack, offset| Some(PackLoc { pack, offset });
    assert_eq!(
        r.chunk_record(a, &[2; 32]).unwrap().unwrap().pack,
        loc(p1, 100)
    );
    assert_eq!(r.chunk_record(a, &[4; 32]).unwrap().unwrap().pack, None);
    assert_eq!(r.chunk_record(a, &[9; 32]).unwrap(), None, "Bob's");
    assert_eq!(r.chunk_records(a, None, 1).unwrap()[0].pack, loc(p1, 0));
    let in_p1: Vec<ChunkId> = r
        .chunks_in_pack(a, &p1)
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(in_p1, vec![[1; 32], [2; 32], [3; 32]], "in offset order");
    let packs = r.packs(a).unwrap();
    assert_eq!(packs.len(), 1);
    assert_eq!(packs[0].pack, pack_rec(p1, 1000));
    assert_eq!((packs[0].live_chunks, packs[0].live_bytes), (3, 400));
    assert_eq!(
        r.usage(a).unwrap().stored_bytes,
        410,
        "live chunks count, not packs"
    );
    assert_eq!(r.packs_recorded(a, &[p1, p2]).unwrap(), vec![true, false]);
    assert_eq!(r.packs_recorded(3, &[p1]).unwrap(), vec![false]);
    // A named pack is not deleted.
    assert!(r.delete_unnamed_packs(a, &[p1]).unwrap().is_empty());

    // Chunk 3 is put again as a blob of its own: it leaves the pack.
    r.insert_chunks(&[], &[(a, chunk([3; 32], 100, 5))])
        .unwrap();
    assert_eq!(r.chunk_record(a, &[3; 32]).unwrap().unwrap().pack, None);
    // Chunk 2 is damaged: a move leaves it, and it keeps pack 1 named.
    let c2 = r.chunk_record(a, &[2; 32]).unwrap().unwrap();
    assert!(r.mark_damaged(a, &c2.id, &c2.hash, 6).unwrap());
    let moves = [
        ChunkMove {
            id: [1; 32],
            from: PackLoc {
                pack: p1,
                offset: 0,
            },
            to_offset: 0,
        },
        ChunkMove {
            id: [2; 32],
            from: PackLoc {
                pack: p1,
                offset: 100,
            },
            to_offset: 100,
        },
        // No longer where the move read it.
        ChunkMove {
            id: [3; 32],
            from: PackLoc {
                pack: p1,
                offset: 300,
            },
            to_offset: 300,
        },
        // Another account's chunk of the same id is not moved.
        ChunkMove {
            id: [9; 32],
            from: PackLoc {
                pack: p1,
                offset: 0,
            },
            to_offset: 400,
        },
    ];
    assert_eq!(r.move_chunks(a, &pack_rec(p2, 500), &moves).unwrap(), 1);
    assert_eq!(
        r.chunk_record(a, &[1; 32]).unwrap().unwrap().pack,
        loc(p2, 0)
    );
    assert_eq!(
        r.chunk_record(a, &[2; 32]).unwrap().unwrap().pack,
        loc(p1, 100)
    );
    assert_eq!(
        r.chunk_record(b, &[9; 32]).unwrap().unwrap().pack,
        loc(p1, 0)
    );
    assert!(r.delete_unnamed_packs(a, &[p1, p2]).unwrap().is_empty());
    // Chunk 2 made sound again, in pack 3: pack 1 is unnamed and goes.
    r.insert_chunks(
        &[(a, pack_rec(p3, 300))],
        &[(a, packed([2; 32], 200, 9, p3, 0))],
    )
    .unwrap();
    assert_eq!(r.chunks_held(a, &[[2; 32]], 10).unwrap(), vec![true]);
    let live: Vec<_> = r
        .packs(a)
        .unwrap()
        .iter()
        .map(|p| (p.pack.id, p.live_chunks, p.live_bytes))
        .collect();
    assert_eq!(live, vec![(p1, 0, 0), (p2, 1, 100), (p3, 1, 200)]);
    assert_eq!(r.delete_unnamed_packs(a, &[p1, p2, p3]).unwrap(), vec![p1]);
    assert_eq!(r.packs_recorded(a, &[p1]).unwrap(), vec![false]);
    assert_eq!(
        r.packs_recorded(b, &[p1]).unwrap(),
        vec![true],
        "Bob's stays"
    );

    // A collected chunk's record says where its bytes were.
    let u = r.unreferenced_chunks(a, 100).unwrap();
    let gone = r
        .delete_unreferenced_chunks(a, &[[1; 32]], 100, &u.snapshots)
        .unwrap();
    assert_eq!(gone[0].pack, loc(p2, 0));
    assert_eq!(r.delete_unnamed_packs(a, &[p2]).unwrap(), vec![p2]);

    // Packs survive reopening; an account's removal takes its packs.
    drop(r);
    let mut r = h.open();
    assert_eq!(r.packs(a).unwrap().len(), 1);
    assert!(r.remove_account(a).unwrap());
    assert!(r.packs(a).unwrap().is_empty());
    assert_eq!(r.packs(b).unwrap().len(), 1);
    // A pack of an unknown account is refused, with its chunks.
    assert!(matches!(
        r.insert_chunks(
            &[(999, pack_rec(p2, 1))],
            &[(b, packed([8; 32], 1, 0, p2, 0))]
        ),
        Err(RepoError::NoSuchAccount(999))
    ));
    assert_eq!(r.chunk_record(b, &[8; 32]).unwrap(), None);
}
