//! The seed corpus, the committed corpus and every crash the fuzzers found, replayed
//! through the harnesses under `cargo test`; and a few hundred cheap mutations of the
//! seeds, so that the harnesses' invariants run in CI even without a fuzzer.

use super::*;

fn run(target: &str, data: &[u8]) -> Option<SessionReport> {
    match target {
        "request_header" => request_header(data),
        "request_payload" => payload(data),
        "session" => return Some(session(data)),
        // The v4 targets replay in `v4::fuzzing`.
        "v4_frames" => crate::v4::fuzzing::frames(data),
        "v4_session" => {
            let _ = crate::v4::fuzzing::session(data);
        }
        other => panic!("unknown target {other}"),
    }
    None
}

#[test]
fn seeds_pass_the_harnesses_and_reach_the_commit() {
    let mut committed = 0;
    for (target, name, data) in seeds() {
        let Some(r) = run(target, &data) else {
            continue;
        };
        committed += r.files.len();
        match name.as_str() {
            "upload_one_packet" | "upload_one_packet_split" | "bob_finishes_registration" => {
                assert_eq!(r.files.len(), 1, "{name}");
                assert_eq!(r.consumed, data.len() - 5, "{name}");
            }
            "retry_reorder_abort" => assert_eq!(r.files.len(), 1, "{name}"),
            "reconnect_uneven_packets" => assert_eq!(r.files.len(), 2, "{name}"),
            "reconnect_second_commit_fails" => {
                assert_eq!(r.files.len(), 1, "{name}");
                assert!(r.output.ends_with(error_frame()), "{name}");
            }
            "refusals" => {
                assert!(r.files.is_empty());
                assert!(r.closing, "the old version closes");
                let errors = r.output.windows(7).filter(|w| *w == error_frame()).count();
                assert!(errors >= 8, "{errors} errors");
            }
            _ => {}
        }
    }
    assert!(committed >= 6);
}

#[test]
fn the_committed_corpus_replays() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let Ok(targets) = std::fs::read_dir(&root) else {
        return;
    };
    for t in targets {
        let t = t.unwrap();
        let target = t.file_name().into_string().unwrap();
        for f in std::fs::read_dir(t.path()).unwrap() {
            let data = std::fs::read(f.unwrap().path()).unwrap();
            run(&target, &data);
        }
    }
}

/// Writes the seed corpus: `cargo test -p cyberbackup-protocol --lib write_seed_corpus
/// -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus"]
fn write_seed_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, name, data) in seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}

#[test]
fn mutated_seeds_keep_the_invariants() {
    let mut rng = FuzzRng(99);
    for (target, _, data) in seeds() {
        for _ in 0..40 {
            let mut d = data.clone();
            for _ in 0..1 + rng.next_u32() % 4 {
                let r = rng.next_u64();
                if d.is_empty() {
                    break;
                }
                let i = (r >> 8) as usize % d.len();
                match r & 3 {
                    0 => d[i] ^= 1 << ((r >> 40) % 8),
                    1 => d[i] = (r >> 40) as u8,
                    2 => {
                        d.truncate(i);
                    }
                    _ => {
                        let b = d[i..].to_vec();
                        d.extend_from_slice(&b[..b.len().min(300)]);
                    }
                }
            }
            run(target, &d);
        }
    }
}
