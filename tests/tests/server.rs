//! End to end against the real server binary on 127.0.0.1: every flow of PROTOCOL.md,
//! every row of its Errors table, the storage guarantees, restart and shutdown.

use std::time::Duration;

use cyberbackup_e2e::*;
use cyberbackup_protocol::v3::header::RequestCode;
use cyberbackup_protocol::v3::message::{
    encode_send_file, encode_send_file_head, Response, SendFileHead,
};
use cyberbackup_protocol::v3::{cksum, crypto, MAX_PAYLOAD_SIZE};

fn header(id: [u8; 16], version: u8, code: u16, size: u32) -> Vec<u8> {
    request_header(id, version, code, size)
}

fn register_duplicate_key_and_reconnect(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let name = unique_name("alice");
    let mut c = Conn::connect(srv.addr);
    let Response::RegisterOk { client_id } = c.register(&name) else {
        panic!("register")
    };
    assert_eq!(client_id[6] >> 4, 4, "a UUIDv4");
    // duplicate name -> 1601
    let mut d = Conn::connect(srv.addr);
    assert_eq!(d.register(&name), Response::RegisterFailed);
    // public key -> a key that decrypts (send_key decrypts it)
    assert!(matches!(c.send_key(&name), Response::AesKey { client_id: id, .. } if id == client_id));
    let f = c.upload("first.txt", b"hello", 65536, Order::InOrder);
    assert_eq!(f.cksum, cksum(b"hello"));
    // reconnect -> 1605 with a fresh key that works
    let mut r = Conn::connect(srv.addr);
    r.id = client_id;
    assert!(
        matches!(r.reconnect(&name), Response::ReconnectOk { client_id: id, .. } if id == client_id)
    );
    assert_ne!(r.key, c.key, "a fresh session key per connection");
    r.upload("second.txt", b"world", 65536, Order::InOrder);
    assert_eq!(
        std::fs::read(srv.client_dir(&client_id).join("second.txt")).unwrap(),
        b"world"
    );
    // unknown name -> 1606, the connection stays usable for a registration
    let mut u = Conn::connect(srv.addr);
    assert_eq!(
        u.reconnect(&unique_name("nobody")),
        Response::ReconnectRejected { client_id: [0; 16] }
    );
    assert!(matches!(
        u.register(&unique_name("newbie")),
        Response::RegisterOk { .. }
    ));
}

fn files_of_edge_sizes_in_several_packet_sizes_and_orders(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("sizes"));
    let sizes = [0usize, 1, 15, 16, 17, 65_536, 67_584, 1 << 20];
    let mut i = 0u64;
    for packet in [4096usize, 65_536, 1 << 20] {
        for order in [Order::InOrder, Order::Reversed, Order::Shuffled(7)] {
            for &n in &sizes {
                i += 1;
                let d = data(n, i);
                let name = format!("f-{n}-{packet}-{i}.bin");
                let f = c.upload(&name, &d, packet, order);
                assert_eq!(f.cksum, cksum(&d));
                assert_eq!(f.content_size as u64, crypto::ciphertext_len(n as u64));
                let path = srv.client_dir(&c.id).join(&name);
                assert_eq!(std::fs::read(&path).unwrap(), d, "{name}");
                assert_eq!(system_cksum(&path), (f.cksum, n as u64), "{name}");
            }
        }
    }
    assert_eq!(srv.temp_files(), 0);
}

fn a_64_mib_file_in_two_packet_sizes(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("big"));
    let d = data(64 << 20, 99);
    for (packet, order) in [(1 << 20, Order::InOrder), (16 << 20, Order::Shuffled(3))] {
        let name = format!("big-{packet}.bin");
        let f = c.upload(&name, &d, packet, order);
        let path = srv.client_dir(&c.id).join(&name);
        assert_eq!(system_cksum(&path), (f.cksum, d.len() as u64));
        assert_eq!(std::fs::read(&path).unwrap(), d);
    }
}

fn stored_files_are_recorded_in_sqlite_and_survive_a_restart(rt: Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("restart");
    let id;
    {
        let mut srv = Server::start_in(rt, dir.path(), &[]);
        let mut c = Conn::login(srv.addr, &name);
        id = c.id;
        c.upload("keep.me", b"durable bytes", 64, Order::InOrder);
        drop(c);
        assert!(srv.stop().success());
    }
    let db = rusqlite::Connection::open(dir.path().join("defensive.db")).unwrap();
    let (size, ck, verified): (i64, i64, i64) = db
        .query_row(
            "SELECT size, cksum, verified FROM files WHERE client_id = ?1 AND name = 'keep.me'",
            [&id[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (size, ck as u32, verified),
        (13, cksum(b"durable bytes"), 1)
    );
    let key_len: i64 = db
        .query_row(
            "SELECT length(public_key) FROM clients WHERE name = ?1",
            [&name],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(key_len, 160);
    drop(db);

    let srv = Server::start_in(rt, dir.path(), &[]);
    let mut c = Conn::connect(srv.addr);
    c.id = id;
    assert!(matches!(c.reconnect(&name), Response::ReconnectOk { .. }));
    let mut d = Conn::connect(srv.addr);
    assert_eq!(d.register(&name), Response::RegisterFailed);
    assert_eq!(
        std::fs::read(srv.client_dir(&id).join("keep.me")).unwrap(),
        b"durable bytes"
    );
}

fn crc_retry_then_ok_and_abort_leaves_nothing(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("retry"));
    let d = data(200_000, 5);
    // The client pretends its checksum differed three times, then accepts.
    for _ in 0..3 {
        assert!(matches!(
            c.send_file("r.bin", &d, 65536, Order::InOrder),
            Response::FileReceived(_)
        ));
        assert_eq!(
            c.request_name(RequestCode::CrcRetry, "r.bin"),
            Response::Ack { client_id: c.id }
        );
        assert!(
            !srv.client_dir(&c.id).join("r.bin").exists(),
            "nothing visible before CRC_OK"
        );
    }
    c.upload("r.bin", &d, 65536, Order::InOrder);
    assert_eq!(
        std::fs::read(srv.client_dir(&c.id).join("r.bin")).unwrap(),
        d
    );
    // abort after the fourth mismatch
    assert!(matches!(
        c.send_file("a.bin", &d, 65536, Order::InOrder),
        Response::FileReceived(_)
    ));
    assert_eq!(
        c.request_name(RequestCode::CrcAbort, "a.bin"),
        Response::Ack { client_id: c.id }
    );
    assert!(!srv.client_dir(&c.id).join("a.bin").exists());
    assert!(srv.wait_no_temp_files());
}

fn a_connection_dropped_mid_file_leaves_no_file_and_no_temp(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("drop"));
    let d = data(3 << 20, 8);
    let ps = c.packets("partial.bin", &d, 1 << 20);
    c.send(&ps[0]).unwrap();
    c.send(&ps[1][..1000]).unwrap();
    // wait until the server holds a temp file, then drop the connection
    let t0 = std::time::Instant::now();
    while srv.temp_files() == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.temp_files(), 1, "a temp file while the upload runs");
    let id = c.id;
    drop(c);
    assert!(srv.wait_no_temp_files(), "temp file removed");
    assert!(!srv.client_dir(&id).join("partial.bin").exists());
    // also a complete file that never got CRC_OK
    let mut c = Conn::login(srv.addr, &unique_name("drop2"));
    assert!(matches!(
        c.send_file("unconfirmed", b"abc", 64, Order::InOrder),
        Response::FileReceived(_)
    ));
    let id = c.id;
    drop(c);
    assert!(srv.wait_no_temp_files());
    assert!(!srv.client_dir(&id).join("unconfirmed").exists());
}

fn errors_unsupported_version_answers_1607_and_closes(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::connect(srv.addr);
    let mut req = header([0; 16], 4, 1025, 255);
    req.resize(23 + 255, 0);
    c.send(&req).unwrap();
    assert_eq!(c.recv().unwrap(), Response::Error);
    assert!(c.is_closed_by_server());
}

fn errors_oversized_payload_answers_1607_and_closes_without_reading_it(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("big"));
    let req = header(c.id, 3, 1028, MAX_PAYLOAD_SIZE + 1);
    c.send(&req).unwrap();
    // no payload follows: the answer comes anyway, so the server did not wait for it
    assert_eq!(c.recv().unwrap(), Response::Error);
    assert!(c.is_closed_by_server());
}

fn errors_wrong_payload_size_answers_1607_and_closes(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    for (code, size) in [
        (1025u16, 100u32),
        (1026, 255),
        (1027, 256),
        (1028, 200),
        (1029, 0),
    ] {
        let mut c = Conn::login(srv.addr, &unique_name("size"));
        let mut req = header(c.id, 3, code, size);
        req.resize(23 + size as usize, 0);
        c.send(&req).unwrap();
        assert_eq!(c.recv().unwrap(), Response::Error, "code {code}");
        assert!(c.is_closed_by_server(), "code {code}");
    }
}

fn errors_unknown_client_id_answers_1607_or_1606_and_closes(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    for code in [1026u16, 1028, 1029, 1030, 1031] {
        let mut c = Conn::connect(srv.addr);
        let size = match code {
            1026 => 415,
            1028 => 267 + 16,
            _ => 255,
        };
        let mut req = header([0x5A; 16], 3, code, size);
        req.resize(23 + size as usize, 0);
        if code == 1026 {
            req[23] = b'x';
            req[23 + 255..].copy_from_slice(keypair().public_der());
        }
        c.send(&req).unwrap();
        assert_eq!(c.recv().unwrap(), Response::Error, "code {code}");
        assert!(c.is_closed_by_server(), "code {code}");
    }
    // 1027 with an unknown id: 1606 and close
    let mut c = Conn::connect(srv.addr);
    c.id = [0x5A; 16];
    assert_eq!(
        c.reconnect(&unique_name("ghost")),
        Response::ReconnectRejected {
            client_id: [0x5A; 16]
        }
    );
    assert!(c.is_closed_by_server());
}

fn errors_unknown_code_answers_1607_and_keeps_the_connection(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("code"));
    let mut req = header(c.id, 3, 1100, 5);
    req.extend_from_slice(b"12345");
    c.send(&req).unwrap();
    assert_eq!(c.recv().unwrap(), Response::Error);
    c.upload("still-works", b"yes", 64, Order::InOrder);
}

fn errors_bad_file_packets_answer_1607_and_drop_the_transfer(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("bad"));
    let d = data(100_000, 1);
    let ps = c.packets("x.bin", &d, 16384);
    // packet 2 without packet 1
    c.send(&ps[1]).unwrap();
    assert_eq!(c.recv().unwrap(), Response::Error);
    // a duplicate packet drops the transfer
    c.send(&ps[0]).unwrap();
    c.send(&ps[1]).unwrap();
    c.send(&ps[1]).unwrap();
    assert_eq!(c.recv().unwrap(), Response::Error);
    assert!(srv.wait_no_temp_files());
    // content size not a multiple of 16
    let mut req = Vec::new();
    encode_send_file(&mut req, &c.id, "odd", 10, 1, 1, &[0u8; 15]).unwrap();
    c.send(&req).unwrap();
    assert_eq!(c.recv().unwrap(), Response::Error);
    // padding that does not decrypt
    let mut req = Vec::new();
    encode_send_file(&mut req, &c.id, "garbage", 10, 1, 1, &[0x42u8; 16]).unwrap();
    c.send(&req).unwrap();
    assert_eq!(c.recv().unwrap(), Response::Error);
    // the connection is still good
    c.upload("x.bin", &d, 16384, Order::InOrder);
    assert!(srv.wait_no_temp_files());
}

fn names_that_are_not_bare_file_names_are_refused_and_nothing_is_written(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let mut c = Conn::login(srv.addr, &unique_name("names"));
    let key = c.key.unwrap();
    let long = "a".repeat(251);
    let bad: [&[u8]; 8] = [
        b"../escape",
        b"..",
        b".",
        b"/etc/passwd",
        b"dir/file",
        b"back\\slash",
        b"ctl\x07char",
        long.as_bytes(),
    ];
    for name in bad {
        let mut req = Vec::new();
        let ct = crypto::encrypt(&key, b"evil");
        let head = SendFileHead {
            content_size: ct.len() as u32,
            orig_file_size: 4,
            packet_number: 1,
            total_packets: 1,
            file_name: name,
        };
        encode_send_file_head(&mut req, &c.id, &head).unwrap();
        req.extend_from_slice(&ct);
        c.send(&req).unwrap();
        assert_eq!(
            c.recv().unwrap(),
            Response::Error,
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    // non-UTF-8
    let mut req = header(c.id, 3, 1028, 267 + 16);
    req.extend_from_slice(&16u32.to_le_bytes());
    req.extend_from_slice(&1u32.to_le_bytes());
    req.extend_from_slice(&1u16.to_le_bytes());
    req.extend_from_slice(&1u16.to_le_bytes());
    let mut field = [0u8; 255];
    field[..3].copy_from_slice(b"\xff\xfe\xfd");
    req.extend_from_slice(&field);
    req.extend_from_slice(&crypto::encrypt(&key, b"x"));
    c.send(&req).unwrap();
    assert_eq!(c.recv().unwrap(), Response::Error);
    // nothing outside the client's directory, nothing inside it either
    assert!(!srv.dir.join("escape").exists());
    assert!(!srv.storage().join("escape").exists());
    assert!(
        !srv.client_dir(&c.id).exists()
            || std::fs::read_dir(srv.client_dir(&c.id)).unwrap().count() == 0
    );
    // and the session still works
    c.upload("fine.txt", b"ok", 64, Order::InOrder);
}

fn sigterm_lets_an_inflight_file_finish_and_exits_zero(rt: Runtime) {
    let mut srv = Server::start(rt, &[]);
    let mut idle = Conn::login(srv.addr, &unique_name("idle"));
    let mut c = Conn::login(srv.addr, &unique_name("term"));
    let d = data(2 << 20, 4);
    let ps = c.packets("late.bin", &d, 1 << 20);
    c.send(&ps[0]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    srv.signal("TERM");
    // the idle connection is closed promptly
    assert!(idle.is_closed_by_server());
    // the in-flight one finishes its file
    c.send(&ps[1]).unwrap();
    c.send(&ps[2]).unwrap();
    let Response::FileReceived(f) = c.recv().unwrap() else {
        panic!("no 1603 during drain")
    };
    assert_eq!(f.cksum, cksum(&d));
    assert_eq!(
        c.request_name(RequestCode::CrcOk, "late.bin"),
        Response::Ack { client_id: c.id }
    );
    drop(c);
    let st = srv
        .wait(Duration::from_secs(30))
        .expect("exits after draining");
    assert!(st.success(), "{st:?}");
    // new connections are refused after shutdown
    assert!(std::net::TcpStream::connect(srv.addr).is_err());
}

fn idle_and_trickling_peers_are_timed_out(rt: Runtime) {
    let srv = Server::start(rt, &["--idle-timeout", "1", "--header-timeout", "1"]);
    let mut idle = Conn::connect(srv.addr);
    let t0 = std::time::Instant::now();
    assert!(idle.is_closed_by_server());
    assert!(t0.elapsed() < Duration::from_secs(10));
    // a peer that sends half a header and stops
    let mut half = Conn::connect(srv.addr);
    half.send(&header([0; 16], 3, 1025, 255)[..10]).unwrap();
    assert!(half.is_closed_by_server());
}

fn connections_over_the_limit_are_refused(rt: Runtime) {
    let srv = Server::start(rt, &["--max-connections", "2"]);
    let mut a = Conn::connect(srv.addr);
    let mut b = Conn::connect(srv.addr);
    assert!(matches!(
        a.register(&unique_name("a")),
        Response::RegisterOk { .. }
    ));
    assert!(matches!(
        b.register(&unique_name("b")),
        Response::RegisterOk { .. }
    ));
    let mut c = Conn::connect(srv.addr);
    assert!(c.is_closed_by_server(), "the third connection is closed");
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    let mut d = Conn::connect(srv.addr);
    assert!(matches!(
        d.register(&unique_name("d")),
        Response::RegisterOk { .. }
    ));
}

both_runtimes!(
    register_duplicate_key_and_reconnect,
    files_of_edge_sizes_in_several_packet_sizes_and_orders,
    a_64_mib_file_in_two_packet_sizes,
    stored_files_are_recorded_in_sqlite_and_survive_a_restart,
    crc_retry_then_ok_and_abort_leaves_nothing,
    a_connection_dropped_mid_file_leaves_no_file_and_no_temp,
    errors_unsupported_version_answers_1607_and_closes,
    errors_oversized_payload_answers_1607_and_closes_without_reading_it,
    errors_wrong_payload_size_answers_1607_and_closes,
    errors_unknown_client_id_answers_1607_or_1606_and_closes,
    errors_unknown_code_answers_1607_and_keeps_the_connection,
    errors_bad_file_packets_answer_1607_and_drop_the_transfer,
    names_that_are_not_bare_file_names_are_refused_and_nothing_is_written,
    sigterm_lets_an_inflight_file_finish_and_exits_zero,
    idle_and_trickling_peers_are_timed_out,
    connections_over_the_limit_are_refused,
);

/// One server per data directory and per port: a second one exits at once, naming the
/// first's pid (before it could touch the first one's files), and the first goes on.
#[test]
fn a_second_server_on_the_same_data_or_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start_in(Runtime::Mio, dir.path(), &[]);
    let pid = std::fs::read_to_string(first.storage().join(".lock")).unwrap();
    let out = std::process::Command::new(server_binary())
        .args(["--runtime", "mio", "--bind", "127.0.0.1", "--port", "0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {}", pid.trim())), "{err}");
    // Another directory, but the first one's port.
    let other = tempfile::tempdir().unwrap();
    let port = first.addr.port().to_string();
    let out = std::process::Command::new(server_binary())
        .args(["--runtime", "mio", "--bind", "127.0.0.1", "--port", &port])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already served by another process"), "{err}");
    // The first still serves.
    assert!(std::net::TcpStream::connect(first.addr).is_ok());
}
