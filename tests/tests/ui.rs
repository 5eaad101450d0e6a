//! The browser UI in headless Chromium (Debian's package, driven by playwright-core
//! from tests/ui; `bash .ci/run` installs both): open the UI, choose two files, start
//! the backup, wait for success, and check the stored files equal them. The test keeps
//! a screenshot in target/ui-artifacts/.

use std::path::{Path, PathBuf};
use std::process::Command;

use cyberbackup_e2e::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn backing_up_two_files_from_the_browser() {
    let root = repo_root();
    let script = root.join("tests/ui/backup.mjs");
    assert!(
        root.join("tests/ui/node_modules/playwright-core").exists(),
        "playwright-core is missing: run `npm ci --prefix tests/ui` (bash .ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: `apt-get install chromium` (bash .ci/run does)"
    );
    let srv = Server::start(Runtime::Glommio, &[]);
    let data = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(data.path(), &srv.addr.to_string());
    let files = tempfile::tempdir().unwrap();
    let a = files.path().join("holiday-photos.tar");
    let b = files.path().join("notes.txt");
    let a_bytes = cyberbackup_e2e::data(5 << 20, 11);
    std::fs::write(&a, &a_bytes).unwrap();
    std::fs::write(&b, b"CyberBackup keeps my notes safe.\n").unwrap();
    let artifacts = root.join("target/ui-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("backup.png");
    let _ = std::fs::remove_file(&shot);
    let user = unique_name("browser");
    let out = Command::new("node")
        .arg(&script)
        .args([
            "--url",
            &bridge.url,
            "--token",
            BRIDGE_TOKEN,
            "--server",
            &srv.addr.to_string(),
            "--user",
            &user,
        ])
        .arg("--files")
        .arg(format!("{},{}", a.display(), b.display()))
        .arg("--screenshot")
        .arg(&shot)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("running node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(shot.exists(), "the screenshot was kept");
    // the stored files are the chosen ones
    let dirs: Vec<PathBuf> = std::fs::read_dir(srv.storage())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != ".incoming"))
        .collect();
    assert_eq!(dirs.len(), 1);
    assert_eq!(
        std::fs::read(dirs[0].join("holiday-photos.tar")).unwrap(),
        a_bytes
    );
    assert_eq!(
        std::fs::read(dirs[0].join("notes.txt")).unwrap(),
        b"CyberBackup keeps my notes safe.\n"
    );
    // the checksums the browser showed are the real ones
    assert!(
        stdout.contains(&cyberbackup_protocol::v3::cksum(&a_bytes).to_string()),
        "{stdout}"
    );
}
