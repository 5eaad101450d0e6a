//! The server under systemd's `Type=notify`: it sends `READY=1` to `NOTIFY_SOCKET` once
//! every shard listens, and `STOPPING=1` when a signal starts the drain. The test plays
//! systemd's part with a Unix datagram socket of its own.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use cyberbackup_e2e::*;

/// The next notification, or a panic after `limit`.
fn next_message(sock: &UnixDatagram, limit: Duration, waiting_for: &str) -> String {
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification ({waiting_for}) within {limit:?}: {e}"),
    }
}

fn ready_when_listening_and_stopping_on_sigterm(rt: Runtime) {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut cmd = Command::new(server_binary());
    cmd.args(["--runtime", rt.flag()])
        .env("NOTIFY_SOCKET", &sock_path);
    // returns once the server printed its "listening" line
    let mut srv = Server::spawn(cmd, &data, &[]);
    let msg = next_message(&sock, Duration::from_secs(20), "READY=1");
    assert_eq!(msg.trim_end(), "READY=1", "{}", srv.log());
    // ready means served
    std::net::TcpStream::connect(srv.addr).expect("the server answers once READY=1");

    srv.signal("TERM");
    let msg = next_message(&sock, Duration::from_secs(20), "STOPPING=1");
    assert_eq!(msg.trim_end(), "STOPPING=1", "{}", srv.log());
    let st = srv
        .wait(Duration::from_secs(60))
        .expect("the server exits after SIGTERM");
    assert!(st.success(), "{st:?}\n{}", srv.log());
    // and said nothing else
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let extra = sock.recv(&mut buf);
    assert!(
        extra.is_err(),
        "unexpected notification {:?}",
        extra.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
}

both_runtimes!(ready_when_listening_and_stopping_on_sigterm);
