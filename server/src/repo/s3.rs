//! The scale-out [`BlobStore`]: an S3-compatible object store (Garage in the tests;
//! anything that speaks S3's REST API with SigV4), shared by any number of server
//! nodes.
//!
//! One object per blob, under `<prefix><account>/chunk/<hex id>`,
//! `<prefix><account>/snapshot/<hex id>` or `<prefix><account>/pack/<hex id>`: an account's blobs of one kind are one listing
//! prefix, so collection's sweep and `remove-accounts` list only that account's, and
//! isolation between accounts is in the key as on the file system.
//!
//! - **Durability.** [`BlobStore::put_batch`] returns once every object's `PUT` was
//!   answered `200 OK`: S3's (and Garage's) acknowledgement that the object is stored
//!   (Garage: on a quorum of its replicas; with its `data_fsync` and `metadata_fsync`
//!   on, synced to their disks). The repository writes a chunk's registry row only
//!   after that, and acknowledges the chunk after the row: the order of the local store.
//!   A `PUT` replaces an object whole or not at all, so a crash never leaves half a blob.
//! - **Retries.** A request that fails for the transport (refused, reset, timed out) or
//!   is answered 5xx or 429 is sent again after a growing pause (50 ms doubling, up to
//!   [`ATTEMPTS`] tries, about 3 s in all); other answers are final. Every request is
//!   signed anew for each try.
//! - **Parallelism.** A batch's objects are put (or deleted) by up to [`WRITERS`]
//!   threads at once: an object store is slow per request and fast in aggregate.
//! - **A missing bucket is an error**, not every blob missing: a `404` is taken for
//!   an absent object only when its answer says `NoSuchKey` or the bucket still
//!   answers, so a bucket removed while serving fails requests (and scrub marks
//!   nothing damaged) instead of reading as an empty store.
//! - **Bounds.** A `GET` reads at most [`MAX_OBJECT`] bytes; a longer object is an
//!   error, never an allocation of what a misbehaving store announces.
//!
//! Requests are built and signed by `rusty-s3` (no I/O of its own) and carried by
//! `ureq` with connect and request timeouts.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::blob::{BlobKey, BlobKind, BlobStore};
use super::{hex, unhex, AccountId, RepoError};

/// Tries of one request (the first and the retries).
pub const ATTEMPTS: u32 = 7;
/// Objects of a batch put at once.
pub const WRITERS: usize = 8;
/// The largest object a `GET` reads: above any chunk or snapshot body the server
/// stores.
pub const MAX_OBJECT: u64 = 1 << 30;
/// How long a signed request stays valid (it is sent at once).
const SIGNED_FOR: Duration = Duration::from_secs(5 * 60);

/// Where the store is and who it is.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http://host:port` or `https://host` (path-style requests: `endpoint/bucket/key`).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Put before every key (empty, or ending in `/`), so that several repositories
    /// may share a bucket.
    pub prefix: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// A PEM file of the CA certificates an `https://` endpoint's certificate is
    /// checked against (None: the Mozilla roots ureq carries).
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// The blob store in an S3 bucket.
pub struct S3BlobStore {
    bucket: Bucket,
    creds: Credentials,
    prefix: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3BlobStore")
            .field("bucket", &self.bucket.name())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn store_err(what: impl std::fmt::Display) -> RepoError {
    RepoError::ObjectStore(what.to_string())
}

/// How one request ended.
enum Sent {
    /// Answered with this status (2xx, or a final 4xx), and the response.
    Answer(u16, Box<ureq::Response>),
}

impl S3BlobStore {
    /// A store on `cfg`'s bucket; checks that the bucket answers (`HEAD`), so a wrong
    /// endpoint, bucket or key fails at start, not at the first backup.
    pub fn open(cfg: &S3Config) -> Result<S3BlobStore, RepoError> {
        let endpoint = cfg
            .endpoint
            .parse()
            .map_err(|e| store_err(format!("endpoint {}: {e}", cfg.endpoint)))?;
        let bucket = Bucket::new(
            endpoint,
            UrlStyle::Path,
            cfg.bucket.clone(),
            cfg.region.clone(),
        )
        .map_err(|e| store_err(format!("bucket {} at {}: {e}", cfg.bucket, cfg.endpoint)))?;
        let mut prefix = cfg.prefix.trim_start_matches('/').to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .max_idle_connections_per_host(2 * WRITERS);
        if let Some(ca) = &cfg.ca_file {
            agent = agent.tls_config(std::sync::Arc::new(super::tls::client_config(
                ca,
                "--s3-ca-file",
            )?));
        }
        let agent = agent.build();
        let store = S3BlobStore {
            bucket,
            creds: Credentials::new(cfg.access_key_id.clone(), cfg.secret_access_key.clone()),
            prefix,
            agent,
        };
        match store.bucket_answers()? {
            None => Ok(store),
            Some(code) => Err(store_err(format!(
                "bucket {} at {}: answered {code} (does it exist, and may this key use it?)",
                cfg.bucket, cfg.endpoint
            ))),
        }
    }

    fn object(&self, key: &BlobKey) -> String {
        format!(
            "{}{}/{}/{}",
            self.prefix,
            key.account(),
            kind_name(key.kind()),
            hex(key.id())
        )
    }

    /// Sends a request (built and signed anew by `req` for each try) until it is
    /// answered with something other than 5xx or 429, or the tries are spent.
    fn send(
        &self,
        what: &str,
        req: impl Fn(&Self) -> Result<ureq::Response, Box<ureq::Error>>,
    ) -> Result<Sent, RepoError> {
        let mut pause = Duration::from_millis(50);
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match req(self).map_err(|e| *e) {
                Ok(r) => return Ok(Sent::Answer(r.status(), Box::new(r))),
                Err(ureq::Error::Status(code, r)) if code < 500 && code != 429 => {
                    return Ok(Sent::Answer(code, Box::new(r)));
                }
                Err(ureq::Error::Status(code, r)) => {
                    last = format!("answered {code}: {}", brief(r));
                }
                // Not `t`'s Display: it starts with the URL, whose query is the
                // request's signature (a bearer token while it is valid).
                Err(ureq::Error::Transport(t)) => {
                    last = format!("{}: {}", t.kind(), t.message().unwrap_or("no detail"));
                    // The cause (a refused certificate, say), which names no URL.
                    if let Some(cause) = std::error::Error::source(&t) {
                        last = format!("{last}: {cause}");
                    }
                }
            }
            if attempt < ATTEMPTS {
                tracing::debug!(what, attempt, error = %last, "object store request failed; trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
        Err(store_err(format!("{what}: {last} ({ATTEMPTS} tries)")))
    }

    /// Whether the bucket answers `HEAD` with 200.
    fn bucket_answers(&self) -> Result<Option<u16>, RepoError> {
        match self.send("checking the bucket", |s| {
            let url = s.bucket.head_bucket(Some(&s.creds)).sign(SIGNED_FOR);
            s.agent.head(url.as_str()).call().map_err(Box::new)
        })? {
            Sent::Answer(200, _) => Ok(None),
            Sent::Answer(code, _) => Ok(Some(code)),
        }
    }

    /// A 404 means the object is absent only if the bucket is there: a bucket removed
    /// (or a wrong one) while serving must be an error, not every blob missing (scrub
    /// would mark every chunk damaged). `body` is the answer's start, when it has one
    /// (S3 names the error in it); a `HEAD` has none, so the bucket is asked.
    fn absent(&self, name: &str, body: Option<&str>) -> Result<(), RepoError> {
        let gone = match body {
            Some(b) if b.contains("NoSuchKey") => false,
            Some(b) if b.contains("NoSuchBucket") => true,
            _ => self.bucket_answers()?.is_some(),
        };
        if gone {
            Err(store_err(format!(
                "{name}: the bucket {} is gone (or this key may no longer use it)",
                self.bucket.name()
            )))
        } else {
            Ok(())
        }
    }

    /// Runs `f` on every item, up to [`WRITERS`] at once; the first error stops the
    /// others taking more items, and is returned.
    fn parallel<T: Sync>(
        &self,
        items: &[T],
        f: impl Fn(&T) -> Result<(), RepoError> + Sync,
    ) -> Result<(), RepoError> {
        let workers = WRITERS.min(items.len());
        if workers <= 1 {
            return items.iter().try_for_each(f);
        }
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<RepoError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(item) {
                        next.store(items.len(), Ordering::Relaxed);
                        failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A `DELETE` of the object, whether or not it exists.
    fn remove(&self, key: &BlobKey) -> Result<(), RepoError> {
        let name = self.object(key);
        match self.send("deleting an object", |s| {
            let url = s
                .bucket
                .delete_object(Some(&s.creds), &name)
                .sign(SIGNED_FOR);
            s.agent.delete(url.as_str()).call().map_err(Box::new)
        })? {
            Sent::Answer(200..=299, _) => Ok(()),
            Sent::Answer(404, r) => self.absent(&name, Some(&brief(*r))),
            Sent::Answer(code, r) => Err(store_err(format!(
                "deleting {name}: answered {code}: {}",
                brief(*r)
            ))),
        }
    }

    fn put(&self, key: &BlobKey, data: &[u8]) -> Result<(), RepoError> {
        let name = self.object(key);
        match self.send("putting an object", |s| {
            let url = s.bucket.put_object(Some(&s.creds), &name).sign(SIGNED_FOR);
            s.agent.put(url.as_str()).send_bytes(data).map_err(Box::new)
        })? {
            Sent::Answer(200..=299, _) => Ok(()),
            Sent::Answer(code, r) => Err(store_err(format!(
                "putting {name}: answered {code}: {}",
                brief(*r)
            ))),
        }
    }

    /// A `GET` of the object, whole or with a `Range`; `None` when it does not exist.
    fn fetch(
        &self,
        key: &BlobKey,
        range: Option<(u64, u64)>,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let name = self.object(key);
        let sent = self.send("reading an object", |s| {
            let url = s.bucket.get_object(Some(&s.creds), &name).sign(SIGNED_FOR);
            let mut r = s.agent.get(url.as_str());
            if let Some((from, to)) = range {
                r = r.set("Range", &format!("bytes={from}-{to}"));
            }
            r.call().map_err(Box::new)
        })?;
        match sent {
            Sent::Answer(status @ (200 | 206), r) => {
                let mut body = Vec::new();
                if let Some(n) = r
                    .header("Content-Length")
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    if n > MAX_OBJECT {
                        return Err(store_err(format!("{name}: {n} bytes, over {MAX_OBJECT}")));
                    }
                    // Only what a blob is likely to be is taken on the store's word;
                    // more grows as it arrives.
                    body.reserve_exact(n.min(16 << 20) as usize);
                }
                r.into_reader()
                    .take(MAX_OBJECT + 1)
                    .read_to_end(&mut body)
                    .map_err(|e| store_err(format!("reading {name}: {e}")))?;
                if body.len() as u64 > MAX_OBJECT {
                    return Err(store_err(format!("{name}: over {MAX_OBJECT} bytes")));
                }
                // A store that ignores Range answers 200 with the whole object.
                if let (200, Some((from, to))) = (status, range) {
                    let from = usize::try_from(from).unwrap_or(usize::MAX).min(body.len());
                    let to = usize::try_from(to).unwrap_or(usize::MAX).saturating_add(1);
                    body = body[from..to.min(body.len())].to_vec();
                }
                Ok(Some(body))
            }
            Sent::Answer(404, r) => self.absent(&name, Some(&brief(*r))).map(|()| None),
            // A range from at or past the end of an object that exists.
            Sent::Answer(416, _) => Ok(Some(Vec::new())),
            Sent::Answer(code, r) => Err(store_err(format!(
                "reading {name}: answered {code}: {}",
                brief(*r)
            ))),
        }
    }
}

/// The start of an error answer's body, for messages.
fn brief(r: ureq::Response) -> String {
    let mut s = String::new();
    let _ = r.into_reader().take(300).read_to_string(&mut s);
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn kind_name(k: BlobKind) -> &'static str {
    match k {
        BlobKind::Chunk => "chunk",
        BlobKind::SnapshotBody => "snapshot",
        BlobKind::Pack => "pack",
    }
}

impl BlobStore for S3BlobStore {
    fn put_batch(&self, items: &[(BlobKey, &[u8])]) -> Result<(), RepoError> {
        // On an error, what is stored stays (the trait allows it), and nothing is
        // acknowledged.
        self.parallel(items, |(k, d)| self.put(k, d))
    }

    fn ready(&self) -> Result<(), RepoError> {
        match self.bucket_answers()? {
            None => Ok(()),
            Some(code) => Err(store_err(format!(
                "bucket {}: answered {code}",
                self.bucket.name()
            ))),
        }
    }

    fn delete_batch(&self, keys: &[BlobKey]) -> Result<(), RepoError> {
        self.parallel(keys, |k| self.remove(k))
    }

    fn get(&self, key: &BlobKey) -> Result<Option<Vec<u8>>, RepoError> {
        self.fetch(key, None)
    }

    fn get_range(
        &self,
        key: &BlobKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        if len == 0 {
            return Ok(self.len(key)?.map(|_| Vec::new()));
        }
        let last = offset.saturating_add(len - 1);
        self.fetch(key, Some((offset, last)))
    }

    fn len(&self, key: &BlobKey) -> Result<Option<u64>, RepoError> {
        let name = self.object(key);
        match self.send("reading an object's length", |s| {
            let url = s.bucket.head_object(Some(&s.creds), &name).sign(SIGNED_FOR);
            s.agent.head(url.as_str()).call().map_err(Box::new)
        })? {
            Sent::Answer(200, r) => r
                .header("Content-Length")
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| store_err(format!("{name}: no Content-Length"))),
            Sent::Answer(404, _) => self.absent(&name, None).map(|()| None),
            Sent::Answer(code, r) => {
                Err(store_err(format!("{name}: answered {code}: {}", brief(*r))))
            }
        }
    }

    fn delete(&self, key: &BlobKey) -> Result<bool, RepoError> {
        // S3 answers a DELETE alike whether the object was there: ask first.
        if self.len(key)?.is_none() {
            return Ok(false);
        }
        self.remove(key)?;
        Ok(true)
    }

    fn list(&self, account: AccountId, kind: BlobKind) -> Result<Vec<Vec<u8>>, RepoError> {
        let dir = format!("{}{account}/{}/", self.prefix, kind_name(kind));
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        // A store that hands back the same token, or pages without end, is an error,
        // not a loop: 100,000 pages are 100 million objects.
        let mut seen_tokens = std::collections::HashSet::new();
        for _page in 0..100_000 {
            let sent = self.send("listing objects", |s| {
                let mut l = s.bucket.list_objects_v2(Some(&s.creds));
                l.with_prefix(dir.as_str());
                if let Some(t) = &token {
                    l.with_continuation_token(t.as_str());
                }
                let url = l.sign(SIGNED_FOR);
                s.agent.get(url.as_str()).call().map_err(Box::new)
            })?;
            let text = match sent {
                Sent::Answer(200, r) => r
                    .into_string()
                    .map_err(|e| store_err(format!("listing {dir}: {e}")))?,
                Sent::Answer(code, r) => {
                    return Err(store_err(format!(
                        "listing {dir}: answered {code}: {}",
                        brief(*r)
                    )))
                }
            };
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text)
                .map_err(|e| store_err(format!("listing {dir}: {e}")))?;
            for o in &page.contents {
                // The keys come URL-encoded (the listing asks for `encoding-type=url`).
                let key = percent_encoding::percent_decode_str(&o.key).decode_utf8_lossy();
                let Some(name) = key.strip_prefix(&dir) else {
                    continue;
                };
                // Only names this store makes; anything else in the prefix is left.
                match kind {
                    BlobKind::Chunk => {
                        if let Some(id) = unhex::<32>(name) {
                            out.push(id.to_vec());
                        }
                    }
                    BlobKind::SnapshotBody | BlobKind::Pack => {
                        if let Some(id) = unhex::<16>(name) {
                            out.push(id.to_vec());
                        }
                    }
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => {
                    if !seen_tokens.insert(t.clone()) {
                        return Err(store_err(format!(
                            "listing {dir}: the store repeated a page"
                        )));
                    }
                    token = Some(t);
                }
                _ => return Ok(out),
            }
        }
        Err(store_err(format!("listing {dir}: over 100,000 pages")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::conformance::BlobHarness;
    use std::sync::atomic::AtomicU64;

    /// The test object store (`scripts/garage-test.sh` starts three Garage nodes and
    /// prints its settings; CI sets `CYBERBACKUP_TEST_S3`): `endpoint bucket region
    /// key-id secret`, space-separated. `None` where there is none: the S3 tests then
    /// say so and pass, except under CI, where they fail.
    pub(crate) fn config() -> Option<S3Config> {
        static CFG: std::sync::OnceLock<Option<S3Config>> = std::sync::OnceLock::new();
        let cfg = CFG.get_or_init(|| {
            let line = match std::env::var("CYBERBACKUP_TEST_S3") {
                Ok(v) if !v.is_empty() => v,
                _ => {
                    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/garage-test.sh");
                    let out = std::process::Command::new("bash")
                        .arg(script)
                        .output()
                        .ok()?;
                    if !out.status.success() {
                        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
                        return None;
                    }
                    String::from_utf8(out.stdout).ok()?.trim().to_owned()
                }
            };
            let f: Vec<&str> = line.split_whitespace().collect();
            let [endpoint, bucket, region, key, secret] = f[..] else {
                panic!("CYBERBACKUP_TEST_S3: want 'endpoint bucket region key-id secret'");
            };
            Some(S3Config {
                endpoint: endpoint.into(),
                bucket: bucket.into(),
                region: region.into(),
                prefix: String::new(),
                access_key_id: key.into(),
                secret_access_key: secret.into(),
                ca_file: None,
            })
        });
        match cfg {
            Some(c) => Some(c.clone()),
            None if std::env::var_os("CI").is_some() => {
                panic!("no S3 object store for the tests (CI runs them): set CYBERBACKUP_TEST_S3 or install garage")
            }
            None => {
                eprintln!(
                    "no S3 object store here (CYBERBACKUP_TEST_S3 unset, no garage): test not run"
                );
                None
            }
        }
    }

    /// A prefix of the test bucket of its own, emptied at the end.
    pub(crate) struct S3Harness {
        cfg: S3Config,
    }

    impl BlobHarness for S3Harness {
        type Store = S3BlobStore;
        fn available() -> bool {
            config().is_some()
        }
        fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let mut cfg = config().expect("an S3 store");
            cfg.prefix = format!(
                "test-{}-{}-{}/",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed),
                rand::random::<u32>()
            );
            S3Harness { cfg }
        }
        fn open(&mut self) -> S3BlobStore {
            S3BlobStore::open(&self.cfg).unwrap()
        }
    }

    impl Drop for S3Harness {
        fn drop(&mut self) {
            let Ok(s) = S3BlobStore::open(&self.cfg) else {
                return;
            };
            for account in 0..8 {
                for kind in BlobKind::ALL {
                    for id in s.list(account, kind).unwrap_or_default() {
                        if let Some(key) = BlobKey::of(account, kind, &id) {
                            let _ = s.delete(&key);
                        }
                    }
                }
            }
        }
    }

    crate::blob_store_conformance!(S3Harness);

    #[test]
    fn a_wrong_bucket_or_key_fails_at_open_with_the_stores_answer() {
        let Some(cfg) = config() else { return };
        let mut wrong = cfg.clone();
        wrong.bucket = "no-such-bucket-here".into();
        let e = S3BlobStore::open(&wrong).unwrap_err().to_string();
        assert!(
            e.contains("no-such-bucket-here") && e.contains("answered"),
            "{e}"
        );
        let mut wrong = cfg.clone();
        wrong.secret_access_key = "0".repeat(64);
        let e = S3BlobStore::open(&wrong).unwrap_err().to_string();
        assert!(e.contains("answered 403"), "{e}");
    }

    /// A bucket gone while serving (here: the store pointed at one that does not
    /// exist, after its check at open) fails every read and delete: a blob is never
    /// reported missing when the store cannot know.
    #[test]
    fn a_bucket_gone_while_serving_is_an_error_not_missing_blobs() {
        let Some(cfg) = config() else { return };
        let mut h = S3Harness::new();
        let mut store = h.open();
        let key = BlobKey::Chunk(1, [5; 32]);
        store.put_batch(&[(key, b"here")]).unwrap();
        let absent = BlobKey::Chunk(1, [6; 32]);
        assert_eq!(
            store.get(&absent).unwrap(),
            None,
            "a missing object is None"
        );
        assert_eq!(store.len(&absent).unwrap(), None);
        assert!(!store.delete(&absent).unwrap());
        store.bucket = Bucket::new(
            cfg.endpoint.parse().unwrap(),
            UrlStyle::Path,
            "gone-bucket".to_string(),
            cfg.region.clone(),
        )
        .unwrap();
        for e in [
            store.get(&key).unwrap_err(),
            store.get_range(&key, 0, 2).unwrap_err(),
            store.len(&key).unwrap_err(),
            store.delete(&key).unwrap_err(),
            store.delete_batch(&[key, absent]).unwrap_err(),
            store.list(1, BlobKind::Chunk).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains("gone-bucket") || e.contains("NoSuchBucket"),
                "{e}"
            );
        }
    }

    /// A test CA, another CA, and a certificate for 127.0.0.1 the first signed, made
    /// with openssl in `dir`.
    fn test_pki(dir: &std::path::Path) {
        let sh = format!(
            r#"set -e; cd {d}
            ca() {{ openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
              -days 30 -subj "/CN=$1" -addext basicConstraints=critical,CA:TRUE \
              -addext keyUsage=critical,keyCertSign,cRLSign -keyout $1.key -out $1.crt 2>/dev/null; }}
            ca ca; ca other
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
              -keyout server.key -out server.csr 2>/dev/null
            printf '%s\n' subjectAltName=IP:127.0.0.1 basicConstraints=CA:FALSE \
              extendedKeyUsage=serverAuth > server.ext
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
              -extfile server.ext -out server.crt 2>/dev/null"#,
            d = dir.display()
        );
        let st = std::process::Command::new("bash")
            .args(["-c", &sh])
            .status()
            .unwrap();
        assert!(st.success(), "openssl");
    }

    /// An https:// store whose certificate a private CA signed is trusted with
    /// --s3-ca-file naming that CA, and refused without it or with another CA. (The
    /// store here answers 200 to anything: only the TLS is under test.)
    #[test]
    fn a_private_ca_is_trusted_with_the_ca_file_and_only_then() {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let dir = tempfile::tempdir().unwrap();
        test_pki(dir.path());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.path().join("server.crt"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).unwrap();
        let server = std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let conn = rustls::ServerConnection::new(server.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match std::io::Read::read(&mut tls, &mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => break,
                    }
                }
                let _ = std::io::Write::write_all(
                    &mut tls,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                let _ = std::io::Write::flush(&mut tls);
            }
        });
        let cfg = |ca: Option<&str>| S3Config {
            endpoint: format!("https://127.0.0.1:{port}"),
            bucket: "b".into(),
            region: "r".into(),
            prefix: String::new(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            ca_file: ca.map(|f| dir.path().join(f)),
        };
        S3BlobStore::open(&cfg(Some("ca.crt"))).unwrap();
        for ca in [None, Some("other.crt")] {
            let e = S3BlobStore::open(&cfg(ca)).unwrap_err().to_string();
            assert!(
                e.contains("certificate") || e.contains("Issuer"),
                "{ca:?}: {e}"
            );
        }
        let e = S3BlobStore::open(&cfg(Some("absent.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--s3-ca-file") && e.contains("absent.pem"),
            "{e}"
        );
    }

    /// An https:// endpoint is spoken to over TLS (refused here: nothing listens),
    /// not refused for want of a TLS backend.
    #[test]
    fn an_https_endpoint_is_tried_over_tls() {
        let cfg = S3Config {
            endpoint: "https://127.0.0.1:1".into(),
            bucket: "b".into(),
            region: "r".into(),
            prefix: String::new(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            ca_file: None,
        };
        let e = S3BlobStore::open(&cfg).unwrap_err().to_string();
        assert!(!e.contains("TLS"), "{e}");
        assert!(e.contains("Connection Failed"), "{e}");
    }

    #[test]
    fn an_unreachable_store_is_an_error_after_its_retries() {
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            region: "garage".into(),
            prefix: String::new(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            ca_file: None,
        };
        let t = std::time::Instant::now();
        let e = S3BlobStore::open(&cfg).unwrap_err().to_string();
        assert!(e.contains(&format!("{ATTEMPTS} tries")), "{e}");
        // The pauses between tries were taken (50 ms doubling, up to 1 s).
        assert!(
            t.elapsed() >= Duration::from_millis(50 + 100 + 200 + 400),
            "{:?}",
            t.elapsed()
        );
    }
}
