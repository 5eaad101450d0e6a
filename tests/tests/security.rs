//! Security properties against the real server, CLI and bridge binaries on 127.0.0.1:
//! hostile file and user names are refused and nothing is written outside a client's
//! directory; clients cannot touch each other's files or keys, and a reconnect under
//! someone else's name yields only a key encrypted to the real owner; no key material
//! or file content reaches any log, at the most verbose levels.

use std::process::Command;
use std::time::Duration;

use cyberbackup_e2e::*;
use cyberbackup_protocol::common::{client_id_hex, ClientId};
use cyberbackup_protocol::v3::cksum;
use cyberbackup_protocol::v3::crypto::{self, ClientKeypair};
use cyberbackup_protocol::v3::header::RequestCode;
use cyberbackup_protocol::v3::message::{
    encode_name_request, encode_send_file, encode_send_public_key, Response,
};

fn header(id: ClientId, code: u16, size: u32) -> Vec<u8> {
    request_header(id, 3, code, size)
}

/// A request whose 255-byte name field holds exactly `field` (then zeros).
fn raw_name_request(id: ClientId, code: RequestCode, field: &[u8]) -> Vec<u8> {
    let mut req = header(id, u16::from(code), 255);
    let mut f = [0u8; 255];
    f[..field.len()].copy_from_slice(field);
    req.extend_from_slice(&f);
    req
}

/// Packet 1 of 1 of `plain` under the connection's key, with a raw name field.
fn raw_send_file(c: &Conn, field: &[u8], plain: &[u8]) -> Vec<u8> {
    let ct = crypto::encrypt(&c.key.unwrap(), plain);
    let mut req = header(c.id, 1028, 267 + ct.len() as u32);
    req.extend_from_slice(&(ct.len() as u32).to_le_bytes());
    req.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    req.extend_from_slice(&1u16.to_le_bytes());
    req.extend_from_slice(&1u16.to_le_bytes());
    let mut f = [0u8; 255];
    f[..field.len()].copy_from_slice(field);
    req.extend_from_slice(&f);
    req.extend_from_slice(&ct);
    req
}

/// Asserts the server's directory holds only its log, its registry, the temp fan-out
/// (empty) and, per client, the directory of that client's files, each a bare name from
/// `allowed`.
fn assert_only_expected_files(srv: &Server, allowed: &[(ClientId, Vec<String>)]) {
    for rel in walk(&srv.dir) {
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_str().expect("UTF-8 path").to_owned())
            .collect();
        let ok = match parts.as_slice() {
            [f] => {
                f == "server.log"
                    || f.starts_with("defensive.db")
                    || f == "received_files"
                    || f == "repository"
            }
            // The v4 repository is made at start (key, registry, empty blob store);
            // v3 traffic must put nothing in its blob store.
            [r, ..] if r == "repository" => {
                !(parts.len() >= 3
                    && parts[1] == "blobs"
                    && parts[2] != "tmp"
                    && parts[2] != "LOCK")
            }
            [r, inc] if r == "received_files" && inc == ".incoming" => true,
            // The lock a running server holds on its data directory (its pid).
            [r, l] if r == "received_files" && l == ".lock" => srv.dir.join(&rel).is_file(),
            [r, inc, run] if r == "received_files" && inc == ".incoming" && run == "RUNNING" => {
                srv.dir.join(&rel).is_file()
            }
            [r, inc, nn] if r == "received_files" && inc == ".incoming" => {
                nn.len() == 2 && srv.dir.join(&rel).is_dir()
            }
            [r, hex] if r == "received_files" => {
                allowed.iter().any(|(id, _)| client_id_hex(id) == *hex)
            }
            [r, hex, name] if r == "received_files" => allowed
                .iter()
                .any(|(id, names)| client_id_hex(id) == *hex && names.contains(name)),
            _ => false,
        };
        assert!(
            ok,
            "unexpected path in the server's directory: {}",
            rel.display()
        );
    }
}

// ---------------------------------------------------------------------------------
// hostile names

fn hostile_file_names_are_refused_and_nothing_leaves_the_client_dir(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let outside = srv.dir.parent().unwrap().to_owned();
    let canaries = ["escape", "abs-escape", "win-escape"];
    let before: Vec<bool> = canaries.iter().map(|n| outside.join(n).exists()).collect();
    let mut c = Conn::login(srv.addr, &unique_name("names"));
    let long = "a".repeat(251);
    let long_utf8 = format!("{}a", "é".repeat(125));
    let unterminated = [b'u'; 255];
    let refused: Vec<&[u8]> = vec![
        b"",
        b"../escape",
        b"../../escape",
        b"../../../escape",
        b"..",
        b".",
        b"/etc/passwd",
        b"/tmp/abs-escape",
        b"dir/file",
        b"a/../../escape",
        b"./escape",
        b"back\\slash",
        b"..\\..\\win-escape",
        b"C:\\win-escape",
        b"bell\x07",
        b"new\nline",
        b"car\rriage",
        b"tab\tname",
        b"esc\x1b[31mred",
        b"del\x7f",
        "nel\u{85}next".as_bytes(),
        "csi\u{9b}2J".as_bytes(),
        b"\xff\xfe",
        // an overlong '/' and an overlong "../"
        b"\xc0\xaf",
        b"\xc0\xae\xc0\xae\xc0\xafescape",
        // a UTF-16 surrogate
        b"\xed\xa0\x80",
        long.as_bytes(),
        long_utf8.as_bytes(),
        &unterminated,
    ];
    for name in &refused {
        let req = if name.len() == 255 {
            // no NUL anywhere in the field
            let ct = crypto::encrypt(&c.key.unwrap(), b"evil");
            let mut r = header(c.id, 1028, 267 + ct.len() as u32);
            r.extend_from_slice(&(ct.len() as u32).to_le_bytes());
            r.extend_from_slice(&4u32.to_le_bytes());
            r.extend_from_slice(&1u16.to_le_bytes());
            r.extend_from_slice(&1u16.to_le_bytes());
            r.extend_from_slice(name);
            r.extend_from_slice(&ct);
            r
        } else {
            raw_send_file(&c, name, b"evil")
        };
        c.send(&req).unwrap();
        assert_eq!(
            c.recv().unwrap(),
            Response::Error,
            "file name {:?}",
            String::from_utf8_lossy(name)
        );
        // a CRC request for it is refused too (no such file), the connection stays
        if name.len() < 255 {
            c.send(&raw_name_request(c.id, RequestCode::CrcOk, name))
                .unwrap();
            assert_eq!(c.recv().unwrap(), Response::Error);
        }
    }
    // odd but bare names are accepted, and stay inside the client's directory
    let accepted = [
        "...".to_owned(),
        ".hidden".to_owned(),
        " leading space".to_owned(),
        "division\u{2215}slash".to_owned(),
        "fullwidth\u{ff0f}solidus".to_owned(),
        "%2e%2e%2fescape".to_owned(),
        "$(touch escape)".to_owned(),
        "-rf".to_owned(),
        "~".to_owned(),
        ".incoming".to_owned(),
        "é".repeat(125),
        "b".repeat(250),
    ];
    for name in &accepted {
        c.upload(name, name.as_bytes(), 64, Order::InOrder);
        assert_eq!(
            std::fs::read(srv.client_dir(&c.id).join(name)).unwrap(),
            name.as_bytes()
        );
    }
    // bytes after the NUL are ignored: "ok\0../../escape" is the file "ok"
    c.send(&raw_send_file(&c, b"ok\0../../escape", b"nul"))
        .unwrap();
    let Response::FileReceived(f) = c.recv().unwrap() else {
        panic!("ok\\0...: not accepted as \"ok\"")
    };
    assert_eq!(f.file_name, "ok");
    assert_eq!(
        c.request_name(RequestCode::CrcOk, "ok"),
        Response::Ack { client_id: c.id }
    );
    let mut names = accepted.to_vec();
    names.push("ok".into());
    assert_eq!(
        std::fs::read(srv.client_dir(&c.id).join("ok")).unwrap(),
        b"nul"
    );
    assert!(srv.wait_no_temp_files());
    assert_only_expected_files(&srv, &[(c.id, names)]);
    for (n, was) in canaries.iter().zip(before) {
        assert_eq!(outside.join(n).exists(), was, "{n} appeared outside");
    }
}

fn hostile_user_names_are_refused(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let long = "u".repeat(101);
    let unterminated = [b'u'; 255];
    let refused: Vec<&[u8]> = vec![
        b"",
        long.as_bytes(),
        b"new\nline",
        b"esc\x1b[2J",
        b"tab\tuser",
        b"del\x7f",
        b"\xff\xfe",
        b"\xc0\xaf",
        &unterminated,
    ];
    let mut c = Conn::connect(srv.addr);
    for name in &refused {
        // REGISTER: 1607, the connection stays open
        c.send(&raw_name_request([0; 16], RequestCode::Register, name))
            .unwrap();
        assert_eq!(
            c.recv().unwrap(),
            Response::Error,
            "REGISTER {:?}",
            String::from_utf8_lossy(name)
        );
        // RECONNECT: 1606, the connection stays open
        c.send(&raw_name_request([0; 16], RequestCode::Reconnect, name))
            .unwrap();
        assert_eq!(
            c.recv().unwrap(),
            Response::ReconnectRejected { client_id: [0; 16] },
            "RECONNECT {:?}",
            String::from_utf8_lossy(name)
        );
    }
    // SEND_PUBLIC_KEY with a bad name: 1607 and close
    let mut k = Conn::connect(srv.addr);
    let Response::RegisterOk { client_id } = k.register(&unique_name("keyname")) else {
        panic!("register")
    };
    let mut req = raw_name_request(client_id, RequestCode::SendPublicKey, b"bad\nname");
    req[19..23].copy_from_slice(&415u32.to_le_bytes());
    let mut key = [0u8; 160];
    key[..keypair().public_der().len()].copy_from_slice(keypair().public_der());
    req.extend_from_slice(&key);
    k.send(&req).unwrap();
    assert_eq!(k.recv().unwrap(), Response::Error);
    assert!(k.is_closed_by_server());
    // a user name that looks like a path is only a name: the files go to the id's dir
    let mut p = Conn::login(srv.addr, "../../escape-user");
    p.upload("f.txt", b"inside", 64, Order::InOrder);
    assert_eq!(
        std::fs::read(srv.client_dir(&p.id).join("f.txt")).unwrap(),
        b"inside"
    );
    // nothing was registered under a refused name
    let db = rusqlite::Connection::open(srv.dir.join("defensive.db")).unwrap();
    let names: Vec<String> = db
        .prepare("SELECT name FROM clients")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(names
        .iter()
        .all(|n| n.len() <= 100 && !n.chars().any(char::is_control)));
    assert!(names.contains(&"../../escape-user".to_owned()));
    assert_only_expected_files(&srv, &[(p.id, vec!["f.txt".into()])]);
    // the first connection is still usable after all those refusals
    assert!(matches!(
        c.register(&unique_name("after")),
        Response::RegisterOk { .. }
    ));
}

// ---------------------------------------------------------------------------------
// isolation between clients

fn stored_key(srv: &Server, id: &ClientId) -> Vec<u8> {
    let db = rusqlite::Connection::open(srv.dir.join("defensive.db")).unwrap();
    db.query_row(
        "SELECT public_key FROM clients WHERE id = ?1",
        [&id[..]],
        |r| r.get(0),
    )
    .unwrap()
}

fn a_client_cannot_read_overwrite_or_delete_another_clients_files(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let alice_name = unique_name("alice");
    let mut alice = Conn::login(srv.addr, &alice_name);
    let a = data(100_000, 1);
    alice.upload("shared.txt", &a, 65536, Order::InOrder);
    let mut bob = Conn::login(srv.addr, &unique_name("bob"));
    let b = data(50_000, 2);
    // the same name lands in bob's own directory
    bob.upload("shared.txt", &b, 65536, Order::InOrder);
    let alice_file = srv.client_dir(&alice.id).join("shared.txt");
    assert_eq!(std::fs::read(&alice_file).unwrap(), a);
    assert_eq!(
        std::fs::read(srv.client_dir(&bob.id).join("shared.txt")).unwrap(),
        b
    );
    let alice_key = stored_key(&srv, &alice.id);

    // v3 has no read, list or delete: any other code is 1607, the connection stays
    for code in [0u16, 1024, 1032, 1033, 1034, 1035, 1040, 1100, 2000, 65535] {
        let mut req = header(alice.id, code, 255);
        let mut f = [0u8; 255];
        f[..10].copy_from_slice(b"shared.txt");
        req.extend_from_slice(&f);
        bob.send(&req).unwrap();
        assert_eq!(bob.recv().unwrap(), Response::Error, "code {code}");
    }
    bob.upload("still-bob.txt", b"yes", 64, Order::InOrder);

    // bob's session, alice's id in the header: SEND_FILE, CRC_OK, CRC_ABORT are refused
    // and the connection closed
    for code in [
        RequestCode::SendFile,
        RequestCode::CrcOk,
        RequestCode::CrcAbort,
    ] {
        let mut m = Conn::login(srv.addr, &unique_name("mallory"));
        let req = if code == RequestCode::SendFile {
            let ct = crypto::encrypt(&m.key.unwrap(), b"overwritten");
            let mut r = Vec::new();
            encode_send_file(&mut r, &alice.id, "shared.txt", 11, 1, 1, &ct).unwrap();
            r
        } else {
            let mut r = Vec::new();
            encode_name_request(&mut r, &alice.id, code, "shared.txt").unwrap();
            r
        };
        m.send(&req).unwrap();
        assert_eq!(m.recv().unwrap(), Response::Error, "{code:?}");
        assert!(m.is_closed_by_server(), "{code:?}");
    }
    // replacing alice's public key from another connection is refused
    let other = ClientKeypair::generate(&mut rand::thread_rng()).unwrap();
    let mut m = Conn::connect(srv.addr);
    let mut req = Vec::new();
    encode_send_public_key(&mut req, &alice.id, &alice_name, other.public_der()).unwrap();
    m.send(&req).unwrap();
    assert_eq!(m.recv().unwrap(), Response::Error);
    assert!(m.is_closed_by_server());
    // nor can anyone take alice's name
    let mut m = Conn::connect(srv.addr);
    assert_eq!(m.register(&alice_name), Response::RegisterFailed);

    assert_eq!(
        stored_key(&srv, &alice.id),
        alice_key,
        "alice's key unchanged"
    );
    assert_eq!(
        std::fs::read(&alice_file).unwrap(),
        a,
        "alice's file unchanged"
    );
    assert!(srv.wait_no_temp_files());
    assert_only_expected_files(
        &srv,
        &[
            (alice.id, vec!["shared.txt".into()]),
            (bob.id, vec!["shared.txt".into(), "still-bob.txt".into()]),
        ],
    );
    // alice is unaffected
    alice.upload("more.txt", b"alice again", 64, Order::InOrder);
}

fn a_reconnect_under_someone_elses_name_yields_a_key_only_the_owner_can_read(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let alice_name = unique_name("alice");
    // alice's key pair is the harness's
    let mut alice = Conn::login(srv.addr, &alice_name);
    let secret = data(10_000, 7);
    alice.upload("secret.bin", &secret, 4096, Order::InOrder);
    let alice_key = stored_key(&srv, &alice.id);

    // mallory saw alice's name and id on the wire, and has a key pair of her own
    let mallory = ClientKeypair::generate(&mut rand::thread_rng()).unwrap();
    let mut m = Conn::connect(srv.addr);
    m.id = alice.id;
    let Response::ReconnectOk {
        client_id,
        encrypted_key,
    } = m.request_name(RequestCode::Reconnect, &alice_name)
    else {
        panic!("v3 answers a reconnect with the right name and id")
    };
    assert_eq!(client_id, alice.id);
    assert!(
        mallory.decrypt_session_key(&encrypted_key).is_err(),
        "mallory cannot decrypt the session key with her own key"
    );
    let real = keypair()
        .decrypt_session_key(&encrypted_key)
        .expect("it is encrypted to alice's stored key");
    assert_ne!(
        Some(real),
        alice.key,
        "a fresh key, not alice's session key"
    );

    // without the key, mallory cannot make a file the server agrees with: her upload
    // does not decrypt (1607), or decrypts to garbage whose checksum is not hers
    let guess = crypto::random_aes_key(&mut rand::thread_rng());
    let plain = b"mallory was here".repeat(100);
    let ct = crypto::encrypt(&guess, &plain);
    let mut req = Vec::new();
    encode_send_file(
        &mut req,
        &alice.id,
        "secret.bin",
        plain.len() as u32,
        1,
        1,
        &ct,
    )
    .unwrap();
    m.send(&req).unwrap();
    match m.recv().unwrap() {
        Response::Error => {}
        Response::FileReceived(f) => {
            assert_ne!(f.cksum, cksum(&plain));
            assert_eq!(
                m.request_name(RequestCode::CrcAbort, "secret.bin"),
                Response::Ack {
                    client_id: alice.id
                }
            );
        }
        r => panic!("{r:?}"),
    }
    // she cannot replace alice's key on this connection either (it did not register)
    let mut req = Vec::new();
    encode_send_public_key(&mut req, &alice.id, &alice_name, mallory.public_der()).unwrap();
    m.send(&req).unwrap();
    assert_eq!(m.recv().unwrap(), Response::Error);
    assert!(m.is_closed_by_server());
    // the right name with another id, or the right id with another name: 1606
    let mut m = Conn::connect(srv.addr);
    let Response::RegisterOk { client_id } = m.register(&unique_name("mallory")) else {
        panic!("register")
    };
    m.id = client_id;
    assert_eq!(
        m.request_name(RequestCode::Reconnect, &alice_name),
        Response::ReconnectRejected { client_id }
    );
    m.id = alice.id;
    assert_eq!(
        m.request_name(RequestCode::Reconnect, "someone-else"),
        Response::ReconnectRejected {
            client_id: alice.id
        }
    );

    assert_eq!(stored_key(&srv, &alice.id), alice_key);
    assert!(srv.wait_no_temp_files());
    assert_eq!(
        std::fs::read(srv.client_dir(&alice.id).join("secret.bin")).unwrap(),
        secret
    );
    // alice reconnects and her key still works
    let mut again = Conn::connect(srv.addr);
    again.id = alice.id;
    assert!(matches!(
        again.reconnect(&alice_name),
        Response::ReconnectOk { .. }
    ));
    again.upload("later.bin", b"alice", 64, Order::InOrder);
}

// ---------------------------------------------------------------------------------
// nothing secret in any log

fn base64(bytes: &[u8], url: bool) -> String {
    let alphabet: &[u8] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for ch in bytes.chunks(3) {
        let n = ch
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..=ch.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The ways a byte string could show up in a log: hex (both cases), base64 (standard
/// and URL-safe, at each of the three alignments it could have inside a longer
/// encoding), Rust's `{:?}` of a byte slice in decimal and `{:x?}` in hex.
fn renderings(bytes: &[u8]) -> Vec<String> {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut v = vec![hex.clone(), hex.to_uppercase()];
    for skip in 0..3 {
        let whole = (bytes.len() - skip) / 3 * 3;
        for url in [false, true] {
            v.push(base64(&bytes[skip..skip + whole], url));
        }
    }
    let dec: Vec<String> = bytes.iter().map(|b| b.to_string()).collect();
    v.push(dec.join(", "));
    for f in [
        |b: &u8| format!("{b:x}"),
        |b: &u8| format!("{b:X}"),
        |b: &u8| format!("{b:02x}"),
        |b: &u8| format!("{b:02X}"),
    ] {
        let hx: Vec<String> = bytes.iter().map(f).collect();
        v.push(hx.join(", "));
        v.push(hx.join(" "));
        v.push(hx.join(":"));
    }
    v
}

#[test]
fn the_log_search_finds_every_rendering_it_claims_to() {
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(5))
        .collect();
    let n = needles(&[("key", key.clone())]);
    let found = |log: &str| n.iter().any(|(_, x)| log.contains(x.as_str()));
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    assert!(found(&format!("key={key:?}")));
    assert!(found(&format!("key={key:x?}")));
    assert!(found(&format!("key={key:02X?}")));
    assert!(found(&format!("key={hex}")));
    assert!(found(&format!("key={}", hex.to_uppercase())));
    // base64 of a longer buffer, the key at every alignment
    for pad in 0..3 {
        let mut buf = vec![0xAAu8; pad];
        buf.extend_from_slice(&key);
        buf.extend_from_slice(b"tail");
        assert!(found(&base64(&buf, false)), "alignment {pad}");
        assert!(found(&base64(&buf, true)), "alignment {pad}");
    }
    // half a key is enough to be caught
    assert!(found(&format!("{:?}", &key[16..])));
    assert!(!found("nothing secret here"));
}

/// Each secret, whole and in halves, in every rendering.
fn needles(secrets: &[(&str, Vec<u8>)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (what, bytes) in secrets {
        let h = bytes.len() / 2;
        for part in [&bytes[..], &bytes[..h], &bytes[h..]] {
            for r in renderings(part) {
                out.push((what.to_string(), r));
            }
        }
    }
    out
}

fn no_key_material_or_file_content_in_any_log(rt: Runtime) {
    let srv = Server::start(rt, &["--log", "trace"]);
    let server = srv.addr.to_string();
    let tag: String = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let canary = |n: u8| format!("CANARY{n}-{tag}-").repeat(200).into_bytes();
    let mut secrets: Vec<(&str, Vec<u8>)> = Vec::new();

    // the raw client: two sessions, two keys captured, two files
    let name = unique_name("logs");
    let mut c = Conn::login(srv.addr, &name);
    c.upload("one.bin", &canary(1), 4096, Order::InOrder);
    secrets.push(("AES session key 1", c.key.unwrap().to_vec()));
    let mut r = Conn::connect(srv.addr);
    r.id = c.id;
    assert!(matches!(r.reconnect(&name), Response::ReconnectOk { .. }));
    r.upload("two.bin", &canary(2), 65536, Order::Reversed);
    secrets.push(("AES session key 2", r.key.unwrap().to_vec()));
    let private = keypair().private_der();
    // the DER's first bytes are the same for every key: take the key's own bytes
    secrets.push(("RSA private key", private[40..200].to_vec()));

    // the CLI, with progress lines and with JSON
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("three.txt"), canary(3)).unwrap();
    let mut cli_out = Vec::new();
    let cli_user = unique_name("cli");
    for extra in [&[][..], &["--json"][..]] {
        let out = Command::new(client_binary())
            .current_dir(work.path())
            .env("RUST_LOG", "trace")
            .env("CYBERBACKUP_PROTOCOL", "3")
            .args(["backup", "--server", &server, "--user", &cli_user])
            .args(extra)
            .arg("three.txt")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cli_out.extend(out.stdout);
        cli_out.extend(out.stderr);
    }
    let cli_private = std::fs::read_to_string(work.path().join("me.info"))
        .unwrap()
        .lines()
        .nth(2)
        .unwrap()
        .to_owned();

    // the bridge, at trace level: a device set up through it, a file backed up
    let bdata = tempfile::tempdir().unwrap();
    let mut b = Bridge::start_with(bdata.path(), &server, &["--log", "trace"]);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let auth = format!("Bearer {BRIDGE_TOKEN}");
    let passphrase = format!("bridge passphrase {tag}");
    agent
        .post(&format!("{}/api/setup", b.url))
        .set("Authorization", &auth)
        .send_json(serde_json::json!({"server": server, "account": unique_name("logbridge"), "passphrase": passphrase}))
        .unwrap();
    let four = canary(4);
    let v: serde_json::Value = agent
        .post(&format!("{}/api/backups", b.url))
        .set("Authorization", &auth)
        .send_json(serde_json::json!({"files": [{"path": "four.txt", "size": four.len()}]}))
        .unwrap()
        .into_json()
        .unwrap();
    let id = v["backup"]["id"].as_str().unwrap();
    agent
        .put(&format!("{}/api/backups/{id}/files/0", b.url))
        .set("Authorization", &auth)
        .send_bytes(&four)
        .unwrap();
    let v: serde_json::Value = agent
        .post(&format!("{}/api/backups/{id}/commit", b.url))
        .set("Authorization", &auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["backup"]["state"], "done", "{v}");
    b.stop();
    let device_key = std::fs::read_to_string(bdata.path().join("config/device.key"))
        .unwrap()
        .trim()
        .to_owned();
    secrets.push(("the bridge's passphrase", passphrase.into_bytes()));
    secrets.push(("the bridge's token", BRIDGE_TOKEN.as_bytes().to_vec()));
    let device_key: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&device_key[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    secrets.push(("the bridge's device key", device_key));

    for n in 1..=4u8 {
        secrets.push(("file content", format!("CANARY{n}-{tag}").into_bytes()));
    }
    let mut needles = needles(&secrets);
    // a stretch from the middle of the CLI's private key's base64 (the start is the
    // common DER prefix)
    needles.push((
        "the CLI's private key".into(),
        cli_private[60..140].to_owned(),
    ));
    needles.push(("file content".into(), tag.clone()));

    let server_log = srv.log();
    let bridge_log = std::fs::read_to_string(bdata.path().join("bridge.log")).unwrap();
    let cli_log = String::from_utf8_lossy(&cli_out).into_owned();
    // the logs are really at their most verbose, and cover the uploads
    assert!(
        server_log.contains("TRACE"),
        "the server logs at trace level"
    );
    assert!(
        bridge_log.contains("TRACE"),
        "the bridge logs at trace level"
    );
    assert_eq!(server_log.matches("file stored").count(), 4, "{server_log}");
    assert!(
        server_log.contains("snapshot committed"),
        "the bridge's v4 backup"
    );
    assert!(cli_log.contains("stored three.txt"), "{cli_log}");
    for (log_name, log) in [
        ("server", &server_log),
        ("bridge", &bridge_log),
        ("client CLI", &cli_log),
    ] {
        for (what, n) in &needles {
            assert!(
                !log.contains(n.as_str()),
                "{what} appears in the {log_name} log as {n:?}"
            );
        }
        eprintln!(
            "{rt:?}: {log_name} log: {} lines, {} bytes, none of {} renderings of secrets",
            log.lines().count(),
            log.len(),
            needles.len()
        );
    }
}

both_runtimes!(
    hostile_file_names_are_refused_and_nothing_leaves_the_client_dir,
    hostile_user_names_are_refused,
    a_client_cannot_read_overwrite_or_delete_another_clients_files,
    a_reconnect_under_someone_elses_name_yields_a_key_only_the_owner_can_read,
    no_key_material_or_file_content_in_any_log,
);
