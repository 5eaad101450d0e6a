//! Runtime selection: `auto` uses glommio where io_uring works and falls back to mio,
//! with one warning, where it does not — here made real with a seccomp filter that
//! blocks the io_uring system calls; forcing glommio there is a clear error.

use std::process::Command;
use std::time::Duration;

use cyberbackup_e2e::*;
use cyberbackup_protocol::v3::cksum;

fn behind_seccomp(runtime: &str) -> Command {
    let mut cmd = Command::new(no_io_uring_binary());
    cmd.arg(server_binary()).args(["--runtime", runtime]);
    cmd
}

#[test]
fn auto_falls_back_to_mio_when_io_uring_is_blocked_and_serves_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::spawn(behind_seccomp("auto"), dir.path(), &[]);
    let log = srv.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("falling back to the mio"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning line that says why:\n{log}");
    assert!(warnings[0].contains("WARN"), "{log}");
    assert!(warnings[0].contains("reason="), "{log}");
    assert!(log.contains("runtime=\"mio\""), "{log}");
    let mut c = Conn::login(srv.addr, &unique_name("fallback"));
    let d = data(3 << 20, 77);
    let f = c.upload("through-mio.bin", &d, 1 << 20, Order::Shuffled(1));
    assert_eq!(f.cksum, cksum(&d));
    assert_eq!(
        std::fs::read(srv.client_dir(&c.id).join("through-mio.bin")).unwrap(),
        d
    );
}

#[test]
fn forcing_glommio_where_io_uring_is_blocked_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = behind_seccomp("glommio")
        .args(["--bind", "127.0.0.1", "--port", "0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("io_uring (glommio) cannot run on this host"),
        "{err}"
    );
    assert!(err.contains("--runtime mio"), "{err}");
}

#[test]
fn auto_uses_glommio_where_io_uring_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(server_binary());
    cmd.args(["--runtime", "auto"]);
    let srv = Server::spawn(cmd, dir.path(), &[]);
    let log = srv.log();
    assert!(log.contains("runtime=\"glommio\""), "{log}");
    assert!(!log.contains("falling back"), "{log}");
    let mut c = Conn::login(srv.addr, &unique_name("auto"));
    c.upload("x", b"hello", 64, Order::InOrder);
}
