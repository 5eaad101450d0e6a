//! The browser UI in headless Chromium (Debian's package, driven by playwright-core
//! from tests/ui; `bash .ci/run` installs both), as a person who never opens a
//! terminal: sign in with the printed link, set up an account, back up a folder with
//! nested directories, reload mid-upload and resume, browse a snapshot and download a
//! file and a folder archive (compared here byte for byte), see an HTML-like file name
//! as text, compare two snapshots, and forget with the dry run first. The script
//! keeps screenshots of the main views in target/ui-artifacts/.

use std::io::Read;
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
fn a_folder_backed_up_resumed_browsed_downloaded_compared_and_forgotten_in_the_browser() {
    let root = repo_root();
    let script = root.join("tests/ui/v4.mjs");
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

    // The first folder: nested directories, an HTML-like name, an empty file. Both
    // folders are named Videos, so that the two snapshots form one group for forget.
    let work = tempfile::tempdir().unwrap();
    let folder = work.path().join("a/Videos");
    let deep = folder.join("nested/deeper");
    std::fs::create_dir_all(&deep).unwrap();
    let report = cyberbackup_e2e::data(2 << 20, 21);
    std::fs::write(deep.join("report.pdf"), &report).unwrap();
    std::fs::write(folder.join("nested/notes.txt"), "été\n").unwrap();
    std::fs::write(
        folder.join("<img src=x onerror=alert(1)>.txt"),
        b"just text",
    )
    .unwrap();
    std::fs::write(folder.join("empty"), b"").unwrap();
    // The second: big enough to be interrupted by a reload.
    let big = work.path().join("b/Videos");
    std::fs::create_dir_all(big.join("2026")).unwrap();
    let mut big_files = Vec::new();
    for i in 0..30 {
        let b = cyberbackup_e2e::data(4 << 20, 100 + i);
        let p = big.join("2026").join(format!("clip-{i:02}.bin"));
        std::fs::write(&p, &b).unwrap();
        big_files.push((format!("Videos/2026/clip-{i:02}.bin"), b));
    }

    let out = root.join("target/ui-artifacts");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let run = Command::new("node")
        .arg(&script)
        .args(["--url", &bridge.url, "--token", BRIDGE_TOKEN])
        .args(["--server", &srv.addr.to_string()])
        .args(["--account", &unique_name("browser")])
        .arg("--folder")
        .arg(&folder)
        .arg("--big-folder")
        .arg(&big)
        .arg("--out")
        .arg(&out)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("running node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    for view in [
        "overview",
        "backup-progress",
        "snapshot-browser",
        "forget-preview",
    ] {
        assert!(out.join(format!("{view}.png")).exists(), "{view}.png");
    }
    // The downloaded file and folder are the originals, byte for byte.
    assert_eq!(std::fs::read(out.join("file.bin")).unwrap(), report);
    let tar_bytes = std::fs::read(out.join("folder.tar")).unwrap();
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let mut members = std::collections::BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        members.insert(name.trim_end_matches('/').to_owned(), b);
    }
    assert_eq!(members["Videos/nested/deeper/report.pdf"], report);
    assert_eq!(members["Videos/nested/notes.txt"], "été\n".as_bytes());
    assert_eq!(
        members["Videos/<img src=x onerror=alert(1)>.txt"],
        b"just text"
    );
    assert_eq!(members["Videos/empty"], b"");
    // The resumed backup is whole: every file of the big folder, through the API.
    let agent = ureq::AgentBuilder::new().build();
    let auth = format!("Bearer {BRIDGE_TOKEN}");
    let snaps: serde_json::Value = agent
        .get(&format!("{}/api/snapshots", bridge.url))
        .set("Authorization", &auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let list = snaps["snapshots"].as_array().unwrap();
    assert_eq!(list.len(), 1, "forget kept the newest only: {snaps}");
    assert_eq!(list[0]["tags"], serde_json::json!(["second"]));
    assert_eq!(list[0]["files"], 30);
    let id = list[0]["id"].as_str().unwrap();
    for (p, b) in big_files.iter().step_by(7) {
        let mut got = Vec::new();
        agent
            .get(&format!("{}/api/snapshots/{id}/file?path={p}", bridge.url))
            .set("Authorization", &auth)
            .call()
            .unwrap()
            .into_reader()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(&got, b, "{p}");
    }
}
