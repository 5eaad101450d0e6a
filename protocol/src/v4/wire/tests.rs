//! Byte-for-byte vectors of the v4 frames (`docs/PROTOCOL-V4.md` §5), round trips of
//! every kind, and bounds. The vectors also seed the fuzz corpus (`fuzz/corpus/v4_*`).

use super::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn frame_req(id: u32, r: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(id, r, &mut out);
    out
}

fn frame_ans(id: u32, a: &Answer) -> Vec<u8> {
    let mut out = Vec::new();
    encode_answer(id, a, &mut out);
    out
}

#[test]
fn preamble_and_detection() {
    let p = preamble();
    assert_eq!(
        hex(&p),
        "4379626572426163 6b75702d76340d0a 04".replace(' ', "")
    );
    assert_eq!(detect(&p), Detected::V4);
    assert_eq!(detect(&p[..16]), Detected::NeedMore);
    // A v3 header: client id, then version 3 at offset 16.
    let mut v3 = [0u8; 23];
    v3[16] = 3;
    assert_eq!(detect(&v3), Detected::V3);
    // Version 4 without the magic is a v3 client with a wrong version: v3 answers it.
    let mut bad = [0u8; 23];
    bad[16] = 4;
    assert_eq!(detect(&bad), Detected::V3);
}

#[test]
fn vectors() {
    // HAS_CHUNKS, request 1, one id of 0x11 bytes.
    let f = frame_req(1, &Request::HasChunks(vec![[0x11; 32]]));
    assert_eq!(
        hex(&f[..20]),
        "0100 0000 01000000 2400000000000000 01000000".replace(' ', "")
    );
    assert_eq!(f.len(), 16 + 4 + 32);
    // GET_SNAPSHOT, request 7.
    let f = frame_req(7, &Request::GetSnapshot([0xab; 16]));
    assert_eq!(
        hex(&f),
        format!("0500000007000000 1000000000000000{}", "ab".repeat(16)).replace(' ', "")
    );
    // CHUNKS_HELD for 10 ids, held: 0, 3, 9.
    let mut held = vec![false; 10];
    held[0] = true;
    held[3] = true;
    held[9] = true;
    let f = frame_ans(2, &Answer::ChunksHeld(held));
    assert_eq!(
        hex(&f),
        "0180000002000000 0600000000000000 0a000000 0902".replace(' ', "")
    );
    // ERROR 401 with one missing id.
    let f = frame_ans(
        5,
        &Answer::Error(ErrorAnswer::missing_chunks(&[[0x22; 32]])),
    );
    assert_eq!(hex(&f[..18]), "008000000500000051000000000000009101");
    // USAGE_INFO.
    let f = frame_ans(
        3,
        &Answer::UsageInfo(Usage {
            chunks: 1,
            stored_bytes: 2,
            snapshots: 3,
            quota: 0,
        }),
    );
    assert_eq!(
        hex(&f[16..]),
        "0100000000000000020000000000000003000000000000000000000000000000"
    );
}

fn header() -> SnapshotHeader {
    SnapshotHeader {
        id: [3; 16],
        time_ms: 1_764_806_400_000,
        files: 2,
        dirs: 1,
        size: 10,
        stored: 5,
        host: "laptop".into(),
        tags: vec!["daily".into(), "é".into()],
    }
}

#[test]
fn every_request_round_trips() {
    let reqs = vec![
        Request::HasChunks(vec![[1; 32], [2; 32]]),
        Request::HasChunks(vec![]),
        Request::PutChunk {
            id: [3; 32],
            blob: vec![1, 2, 3],
        },
        Request::CommitSnapshot {
            header: header(),
            refs: vec![[4; 32]],
            root: vec![9; 40],
        },
        Request::ListSnapshots,
        Request::GetSnapshot([5; 16]),
        Request::GetChunk([6; 32]),
        Request::ForgetSnapshot([7; 16]),
        Request::Usage,
        Request::PutKey(vec![1; 89]),
        Request::GetKey,
        Request::DeviceAdd {
            capabilities: 3,
            name: "phone".into(),
            ttl_s: 3600,
        },
        Request::ListDevices,
        Request::RevokeDevice(7),
        Request::LegacyLogin {
            client_id: [3; 16],
            signature: vec![9; 128],
        },
        Request::LegacyList { after: "".into() },
        Request::LegacyList {
            after: "report.pdf".into(),
        },
        Request::LegacyRead {
            name: "report.pdf".into(),
            offset: 1 << 33,
            max: 4 << 20,
        },
        Request::Prune,
    ];
    for r in reqs {
        let f = frame_req(42, &r);
        let h = FrameHeader::parse(f[..16].try_into().unwrap());
        assert_eq!(h.kind, r.kind());
        assert_eq!(h.request_id, 42);
        assert_eq!(h.len as usize, f.len() - 16);
        assert_eq!(h.len, r.body_len(), "{r:?}");
        assert!(h.len <= max_request_len(h.kind, 4 << 20).unwrap());
        assert_eq!(Request::decode(h.kind, &f[16..]).unwrap(), r);
        // Every truncation is an error, never a panic.
        for cut in 0..f.len() - 16 {
            let _ = Request::decode(h.kind, &f[16..16 + cut]);
        }
    }
}

#[test]
fn every_answer_round_trips() {
    let info = SnapshotInfo {
        header: header(),
        device: 9,
        committed_ms: 77,
    };
    let answers = vec![
        Answer::Error(ErrorAnswer::new(ErrorCode::FORBIDDEN, "no")),
        Answer::ChunksHeld(vec![true, false, true]),
        Answer::ChunkStored { already: true },
        Answer::SnapshotCommitted { already: false },
        Answer::SnapshotList(vec![info.clone(), info.clone()]),
        Answer::Snapshot {
            info,
            root: vec![1, 2],
        },
        Answer::Chunk(vec![5; 100]),
        Answer::Forgotten,
        Answer::UsageInfo(Usage::default()),
        Answer::KeyStored,
        Answer::Key(vec![1; 89]),
        Answer::Welcome(Welcome {
            account_id: 1,
            device_id: 2,
            capabilities: 15,
            account: "alice".into(),
        }),
        Answer::Enrolment {
            code: "ABCDE-FGHIJ".into(),
            expires_ms: 99,
        },
        Answer::DeviceList(vec![DeviceInfo {
            id: 1,
            capabilities: 15,
            created_ms: 5,
            revoked_ms: 0,
            this: true,
            name: "laptop".into(),
        }]),
        Answer::DeviceRevoked,
        Answer::LegacyAccount {
            name: "bob".into(),
            files: 3,
            bytes: 1 << 40,
        },
        Answer::LegacyFiles {
            files: vec![LegacyFile {
                name: "a.txt".into(),
                size: 5,
                cksum: 0xdead_beef,
                stored_ms: 1_700_000_000_000,
            }],
            more: true,
        },
        Answer::LegacyFiles {
            files: vec![],
            more: false,
        },
        Answer::LegacyData(vec![7; 1000]),
        Answer::Pruned {
            chunks: 4,
            bytes: 4096,
            grace_s: 86_400,
        },
    ];
    for a in answers {
        let f = frame_ans(1, &a);
        let h = FrameHeader::parse(f[..16].try_into().unwrap());
        assert!(h.len <= max_answer_len(h.kind, 4 << 20).unwrap(), "{a:?}");
        assert_eq!(Answer::decode(h.kind, &f[16..]).unwrap(), a);
        for cut in 0..f.len() - 16 {
            let _ = Answer::decode(h.kind, &f[16..16 + cut]);
        }
    }
}

#[test]
fn legacy_requests_are_bounded() {
    // A signature must be 1 to 512 bytes; a read 1 byte to 4 MiB; a name 255 bytes.
    assert!(Request::decode(kind::LEGACY_LOGIN, &[0; 16]).is_err());
    assert!(Request::decode(kind::LEGACY_LOGIN, &[0; 16 + 512]).is_ok());
    assert_eq!(max_request_len(kind::LEGACY_LOGIN, 0), Some(16 + 512));
    let read = |max: u32, name_len: usize| {
        let mut b = Vec::new();
        b.extend_from_slice(&(name_len as u16).to_le_bytes());
        b.extend(std::iter::repeat_n(b'a', name_len));
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&max.to_le_bytes());
        Request::decode(kind::LEGACY_READ, &b)
    };
    assert!(read(1, 1).is_ok());
    assert!(read(4 << 20, 255).is_ok());
    assert!(read(0, 1).is_err());
    assert!(read((4 << 20) + 1, 1).is_err());
    assert!(read(1, 256).is_err());
    // An answer claiming more than a page of files is refused before it is read.
    let mut b = (MAX_LEGACY_PAGE + 1).to_le_bytes().to_vec();
    b.push(0);
    assert!(Answer::decode(kind::LEGACY_FILES, &b).is_err());
}

#[test]
fn bounds_are_checked_before_allocation() {
    // A HAS_CHUNKS that claims 4 billion ids in 4 bytes.
    let body = u32::MAX.to_le_bytes();
    assert!(matches!(
        Request::decode(kind::HAS_CHUNKS, &body),
        Err(WireError::Invalid { .. })
    ));
    // A COMMIT whose refs count runs past the body.
    let mut body = Vec::new();
    header().encode(&mut body);
    body.extend_from_slice(&1000u32.to_le_bytes());
    assert!(Request::decode(kind::COMMIT_SNAPSHOT, &body).is_err());
    // Too many tags.
    let mut h = header();
    h.tags = vec!["x".into(); 65];
    let mut body = Vec::new();
    h.encode(&mut body);
    body.extend_from_slice(&0u32.to_le_bytes());
    assert!(Request::decode(kind::COMMIT_SNAPSHOT, &body).is_err());
    // Trailing bytes.
    assert!(matches!(
        Request::decode(kind::USAGE, &[0]),
        Err(WireError::Trailing { .. })
    ));
    // An empty chunk blob.
    assert!(Request::decode(kind::PUT_CHUNK, &[0; 32]).is_err());
    // A SNAPSHOT_LIST claiming many entries in a short body.
    assert!(Answer::decode(kind::SNAPSHOT_LIST, &1_000_000u32.to_le_bytes()).is_err());
}

#[test]
fn frame_reader_enforces_limits_and_flags() {
    let mut r = FrameReader::new();
    let h = FrameHeader {
        kind: kind::GET_CHUNK,
        flags: 0,
        request_id: 1,
        len: 33,
    };
    r.push(&h.encode());
    assert_eq!(
        r.next_frame(|k| max_request_len(k, 1024), 0).unwrap_err(),
        WireError::TooLarge(kind::GET_CHUNK, 33)
    );
    let mut r = FrameReader::new();
    let h = FrameHeader {
        kind: kind::USAGE,
        flags: 1,
        request_id: 1,
        len: 0,
    };
    r.push(&h.encode());
    assert!(r.next_frame(|k| max_request_len(k, 1024), 0).is_err());
    // Split delivery: nothing until the last byte.
    let f = frame_req(9, &Request::GetChunk([1; 32]));
    let mut r = FrameReader::new();
    for b in &f[..f.len() - 1] {
        r.push(std::slice::from_ref(b));
        assert!(r
            .next_frame(|k| max_request_len(k, 1024), 0)
            .unwrap()
            .is_none());
    }
    r.push(&f[f.len() - 1..]);
    let (h, body) = r
        .next_frame(|k| max_request_len(k, 1024), 0)
        .unwrap()
        .unwrap();
    assert_eq!(h.request_id, 9);
    assert_eq!(body, &[1; 32]);
}

#[test]
fn login_carries_a_code_only_to_enrol() {
    let enrol = Login {
        mode: LoginMode::Enrol,
        account: String::new(),
        device: "new laptop".into(),
        code: "ABCDE-FGHIJ-KLMNO".into(),
    };
    assert_eq!(Login::decode(&enrol.encode()).unwrap(), enrol);
    let plain = Login {
        mode: LoginMode::Device,
        account: String::new(),
        device: String::new(),
        code: String::new(),
    };
    assert_eq!(plain.encode().len(), 5);
    assert_eq!(Login::decode(&plain.encode()).unwrap(), plain);
    // A code's lifetime is bounded.
    let mut body = Vec::new();
    Request::DeviceAdd {
        capabilities: 1,
        name: String::new(),
        ttl_s: 10,
    }
    .encode_body(&mut body);
    assert!(Request::decode(kind::DEVICE_ADD, &body).is_err());
}

#[test]
fn error_codes_name_and_close_as_the_spec_says() {
    assert_eq!(ErrorCode::MISSING_CHUNKS.name(), "MISSING_CHUNKS");
    assert!(ErrorCode::WINDOW_EXCEEDED.closes());
    assert!(!ErrorCode::FORBIDDEN.closes());
    assert!(!ErrorCode::UNKNOWN_KIND.closes());
    assert!(ErrorCode::SHUTTING_DOWN.closes());
    assert_eq!(ErrorCode(999).name(), "UNKNOWN");
}

#[test]
fn a_split_answer_is_the_whole_one() {
    let answers = [
        Answer::Chunk((0..70_000u32).map(|i| i as u8).collect()),
        Answer::Chunk(Vec::new()),
        Answer::Key(vec![7; 73]),
        Answer::LegacyData(vec![1, 2, 3]),
        Answer::ChunksHeld(vec![true, false]),
    ];
    for a in &answers {
        let mut whole = Vec::new();
        encode_answer(42, a, &mut whole);
        let mut head = Vec::new();
        let body = encode_answer_split(42, a, &mut head);
        let mut joined = head.clone();
        joined.extend_from_slice(body);
        assert_eq!(joined, whole, "{:?}", a.kind());
        if matches!(a, Answer::ChunksHeld(_)) {
            assert!(body.is_empty());
        } else {
            assert_eq!(head.len(), FRAME_HEADER_LEN);
        }
    }
}
