//! Configuration: command-line flags, environment variables (`CYBERBACKUP_*`), a TOML
//! file (`--config`, else [`DEFAULT_CONFIG_FILE`] when it exists), `port.info` in the
//! working directory, and defaults, in that order of precedence. Everything is checked here, so the rest of the server works
//! with a [`Config`] that cannot be wrong.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use cyberbackup_protocol::v3::session::SessionConfig;
use cyberbackup_protocol::v3::MAX_CONTENT_SIZE;
use serde::Deserialize;

/// The default port of CyberBackup.
pub const DEFAULT_PORT: u16 = 1256;

/// The configuration file read when `--config` is not given and it exists (the Debian
/// package installs a commented one).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/cyberbackup/server.toml";

/// The admin HTTP listener's default address (metrics and health probes).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9256";

/// Which AES-CBC decryption code v3 uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AesKind {
    /// The VAES kernel where the CPU has AVX-512 VAES, else the `aes` crate.
    Auto,
    /// Always the `aes` crate's AES-NI pipeline (to compare, or rule the kernel out).
    Portable,
}

/// How the glommio runtime writes direct-I/O stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectWrites {
    /// Through each shard's own io_uring ring (where io_uring allows it).
    Ring,
    /// Through the writer threads, as under the mio runtime.
    Threads,
}

/// Which I/O runtime serves connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// glommio (io_uring) where it can run, else mio (epoll) with a warning.
    Auto,
    /// glommio (io_uring); an error where it cannot run.
    Glommio,
    /// mio (epoll).
    Mio,
}

/// Administrative commands. Each one talks to the running server over its admin
/// socket (`--admin-socket`), or, when no server runs, works on the stopped one's data.
#[derive(Debug, Clone, clap::Subcommand, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admin {
    /// The server's state: whether it runs, its pid, connections, draining, and the
    /// progress of a collection or scrub.
    Status,
    /// Every v4 account: devices, snapshots, stored bytes, quota and last backup.
    Accounts,
    /// The devices of an account, with their capabilities and whether revoked.
    Devices {
        /// The account's name.
        #[arg(long)]
        account: String,
    },
    /// Revoke a device of an account: its connections are refused from now on.
    Revoke {
        /// The account's name.
        #[arg(long)]
        account: String,
        /// The device's id (see `devices`).
        #[arg(long)]
        device: u64,
    },
    /// The server's v4 key fingerprint (what clients pin on first use).
    Key,
    /// Check the configuration (file, flags, environment) and the data paths, print
    /// the settings in effect, and exit 0 if the server could start with them.
    CheckConfig,
    /// Re-read every stored chunk and snapshot body and compare it with the hash
    /// recorded at ingest; damaged chunks are reported and dropped from the index, so
    /// the next backup that has them sends them again. Exit code 3 when damage is found.
    Scrub,
    /// Delete the chunks no snapshot references (and not asked about or stored within
    /// the grace period), and blobs that no record names.
    Gc {
        /// Hours a chunk must be untouched before it may go [default: the server's
        /// gc_grace, in hours rounded up].
        #[arg(long)]
        grace_hours: Option<u64>,
    },
    /// Set an account's quota (bytes of stored chunks; "none" removes it); backups over
    /// it are refused before data is sent.
    Quota {
        /// The account's name.
        #[arg(long)]
        account: String,
        /// Bytes (suffixes K, M, G, T in powers of 1024), or "none".
        #[arg(long)]
        bytes: String,
    },
    /// Remove the v3 clients whose names start with a prefix (such as the load
    /// generator's users): their registry rows and stored files. Only while the server
    /// is stopped.
    RemoveV3Clients {
        /// The names' prefix (at least 3 characters).
        #[arg(long)]
        name_prefix: String,
        /// List what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove the v4 accounts whose names start with a prefix (such as the load
    /// generator's), with their devices, snapshots, chunks and enrolment codes: their
    /// registry rows and blobs. A local repository only while the server is stopped; a
    /// shared one (PostgreSQL and S3) while the nodes run.
    RemoveAccounts {
        /// The names' prefix (at least 3 characters).
        #[arg(long)]
        name_prefix: String,
        /// List what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a one-time enrolment code for a new device of an account: the recovery
    /// path when every device is lost (`cyberbackup enrol CODE` on the new machine;
    /// the passphrase still decides who can read the data).
    EnrolCode {
        /// The account's name.
        #[arg(long)]
        account: String,
        /// The new device's capabilities: all, or backup,read,forget,admin.
        #[arg(long, default_value = "all")]
        capabilities: String,
        /// Hours the code stays valid.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The CyberBackup server: keeps protocol v4's end-to-end encrypted, deduplicated
/// snapshots, and receives protocol v3's encrypted files, on one port.
///
/// Every flag can also be set by its environment variable or in the TOML file given
/// with --config, else /etc/cyberbackup/server.toml when it exists (keys as the long
/// flag names, with underscores). The port comes from, in order: --port,
/// CYBERBACKUP_PORT, the config file, port.info in the working directory, 1256.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(name = "cyberbackup-server", version, about, long_about)]
#[serde(deny_unknown_fields, default)]
pub struct Args {
    /// An administrative command instead of serving: it talks to the running server
    /// over its admin socket, or works on the data of a stopped one.
    #[command(subcommand)]
    #[serde(skip)]
    pub admin: Option<Admin>,

    /// TOML configuration file [default: /etc/cyberbackup/server.toml when it exists].
    #[arg(long, env = "CYBERBACKUP_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "CYBERBACKUP_BIND")]
    pub bind: Option<IpAddr>,

    /// TCP port [default: port.info, else 1256].
    #[arg(long, short, env = "CYBERBACKUP_PORT")]
    pub port: Option<u16>,

    /// I/O runtime: auto (glommio where io_uring works, else mio), glommio, or mio
    /// [default: auto].
    #[arg(long, value_enum, env = "CYBERBACKUP_RUNTIME")]
    pub runtime: Option<RuntimeKind>,

    /// Number of shards (event loops, one per core) [default: number of CPUs].
    #[arg(long, env = "CYBERBACKUP_SHARDS")]
    pub shards: Option<usize>,

    /// Directory holding one directory of files per client [default: received_files].
    #[arg(long, env = "CYBERBACKUP_STORAGE")]
    pub storage: Option<PathBuf>,

    /// SQLite database of clients and files [default: defensive.db].
    #[arg(long, env = "CYBERBACKUP_DATABASE")]
    pub database: Option<PathBuf>,

    /// Directory of the protocol v4 repository: encrypted chunk and snapshot blobs,
    /// their SQLite registry, and the server's key (server.key) [default: repository].
    #[arg(long, env = "CYBERBACKUP_REPOSITORY")]
    pub repository: Option<PathBuf>,

    /// v4: the registry (accounts, devices, chunk records, snapshots) in PostgreSQL,
    /// at this `postgres://` URL, shared by every node given the same one
    /// [default: SQLite, repo.db in the --repository directory].
    #[arg(long, env = "CYBERBACKUP_REGISTRY", hide_env_values = true)]
    pub registry: Option<String>,

    /// v4: the most connections a node keeps to the PostgreSQL registry (with
    /// --registry; at least 2: a commit round holds one while it writes its blobs)
    /// [default: 8].
    #[arg(long, env = "CYBERBACKUP_REGISTRY_CONNECTIONS")]
    pub registry_connections: Option<usize>,

    /// v4: chunks of fewer stored bytes than this are written together, per account
    /// and commit round, as packs of up to 16 MiB: one file or object for many small
    /// chunks (docs/PACKS.md). 0 turns packing off; at most 16777216 [default: 1048576].
    #[arg(long, env = "CYBERBACKUP_PACK_BELOW", value_name = "BYTES")]
    pub pack_below: Option<u64>,

    /// v4: keep the blobs (encrypted chunks and snapshot bodies) in an S3-compatible
    /// object store at this endpoint (http://HOST:PORT or https://HOST), shared by
    /// every node given the same one [default: files under the --repository directory].
    #[arg(long, env = "CYBERBACKUP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// v4: the object store's bucket (with --s3-endpoint).
    #[arg(long, env = "CYBERBACKUP_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// v4: the object store's region (with --s3-endpoint) [default: us-east-1].
    #[arg(long, env = "CYBERBACKUP_S3_REGION")]
    pub s3_region: Option<String>,

    /// v4: a prefix for every object's key (with --s3-endpoint) [default: none].
    #[arg(long, env = "CYBERBACKUP_S3_PREFIX")]
    pub s3_prefix: Option<String>,

    /// v4: the object store's access key id (with --s3-endpoint).
    #[arg(long, env = "CYBERBACKUP_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,

    /// v4: the object store's secret key (with --s3-endpoint; better in the
    /// environment or the config file than on a command line others can read).
    #[arg(long, env = "CYBERBACKUP_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,

    /// v4: a PEM file of the CA certificates an https:// object store's certificate
    /// is checked against, instead of the public roots (a store with a private CA's
    /// certificate) [default: the Mozilla roots the server carries].
    #[arg(long, env = "CYBERBACKUP_S3_CA_FILE")]
    pub s3_ca_file: Option<PathBuf>,

    /// Whether v4 clients may create accounts (`cyberbackup init`) [default: true].
    #[arg(long, env = "CYBERBACKUP_REGISTRATION")]
    pub registration: Option<bool>,

    /// v4: bytes of requests a client may have unanswered [default: 67108864]. The
    /// server holds up to this much for each v4 connection.
    #[arg(long, env = "CYBERBACKUP_V4_WINDOW")]
    pub v4_window: Option<u32>,

    /// v4: seconds between collections of unreferenced chunks while serving; 0 turns
    /// collection off (then run `cyberbackup-server gc` when it suits)
    /// [default: 86400].
    #[arg(long, env = "CYBERBACKUP_GC_INTERVAL")]
    pub gc_interval: Option<u64>,

    /// v4: seconds a chunk must have been neither stored nor asked about before a
    /// collection may delete it, so that a backup in flight keeps what it was told is
    /// held [default: 86400].
    #[arg(long, env = "CYBERBACKUP_GC_GRACE")]
    pub gc_grace: Option<u64>,

    /// Most connections served at once; more are closed on accept [default: 1024].
    #[arg(long, env = "CYBERBACKUP_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Seconds a connection may sit idle between requests [default: 300].
    #[arg(long, env = "CYBERBACKUP_IDLE_TIMEOUT")]
    pub idle_timeout: Option<u64>,

    /// Seconds allowed for a request header (and a packet's fixed part) once it has
    /// begun [default: 30].
    #[arg(long, env = "CYBERBACKUP_HEADER_TIMEOUT")]
    pub header_timeout: Option<u64>,

    /// Slowest accepted upload rate in bytes per second: packet content is owed in
    /// windows of min-rate x header-timeout bytes, each within header-timeout +
    /// window / min-rate seconds of the last [default: 16384].
    #[arg(long, env = "CYBERBACKUP_MIN_RATE")]
    pub min_rate: Option<u32>,

    /// Largest file accepted, in bytes [default and maximum: 4294967279].
    #[arg(long, env = "CYBERBACKUP_MAX_FILE_SIZE")]
    pub max_file_size: Option<u64>,

    /// Most bytes that uploads in flight may hold on disk at once; a file that would go
    /// over is answered 1607 [default: 34359738368 (32 GiB)].
    #[arg(long, env = "CYBERBACKUP_MAX_PENDING_BYTES")]
    pub max_pending_bytes: Option<u64>,

    /// Files up to this many bytes that finish together are made durable together (one
    /// syncfs for the group); larger ones get their own fdatasync. 0 turns grouping off
    /// [default: 262144].
    #[arg(long, env = "CYBERBACKUP_GROUP_COMMIT_MAX_SIZE")]
    pub group_commit_max_size: Option<u64>,

    /// Temp files of at least this many bytes are written with O_DIRECT, bypassing the
    /// page cache (falls back to the cache where the file system refuses it); 0 turns
    /// direct I/O off [default: 1048576].
    #[arg(long, env = "CYBERBACKUP_DIRECT_IO_MIN_SIZE")]
    pub direct_io_min_size: Option<u64>,

    /// Largest packet content accepted, in bytes [default and maximum: 16777216].
    #[arg(long, env = "CYBERBACKUP_MAX_PACKET")]
    pub max_packet: Option<u32>,

    /// Seconds that in-flight files get to finish after SIGINT/SIGTERM [default: 30].
    #[arg(long, env = "CYBERBACKUP_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<u64>,

    /// Address of the admin HTTP listener: Prometheus metrics at /metrics, probes at
    /// /healthz and /readyz; "off" turns it off [default: 127.0.0.1:9256].
    #[arg(long, env = "CYBERBACKUP_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,

    /// Unix socket of the admin commands (mode 0600: the server's user and root)
    /// [default: admin.sock in the --repository directory].
    #[arg(long, env = "CYBERBACKUP_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,

    /// Export each account's usage as metrics labelled with its name (one series per
    /// account and metric: mind the cardinality) [default: false].
    #[arg(long, env = "CYBERBACKUP_METRICS_PER_ACCOUNT")]
    pub metrics_per_account: Option<bool>,

    /// v3 AES-CBC decryption: auto (the VAES kernel where the CPU has it) or portable
    /// (the aes crate's AES-NI code) [default: auto].
    #[arg(long, value_enum, env = "CYBERBACKUP_AES")]
    pub aes: Option<AesKind>,

    /// glommio runtime: direct writes through each shard's io_uring ring, or through
    /// the writer threads [default: ring].
    #[arg(long, value_enum, env = "CYBERBACKUP_DIRECT_WRITES")]
    pub direct_writes: Option<DirectWrites>,

    /// Log format [default: text].
    #[arg(long, value_enum, env = "CYBERBACKUP_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. info, debug, cyberbackup_server=debug [default: info; RUST_LOG
    /// also works].
    #[arg(long, env = "CYBERBACKUP_LOG")]
    pub log: Option<String>,
}

/// A PostgreSQL URL, which may hold a password: its `Debug` shows the scheme only.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryUrl(String);

impl std::ops::Deref for RegistryUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = self.0.split("://").next().unwrap_or("postgres");
        write!(f, "{scheme}://(hidden)")
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub runtime: RuntimeKind,
    pub shards: usize,
    pub storage: PathBuf,
    pub database: PathBuf,
    pub repository: PathBuf,
    /// The PostgreSQL registry's URL (None: SQLite in the repository directory).
    pub registry: Option<RegistryUrl>,
    /// The most connections to the PostgreSQL registry.
    pub registry_connections: usize,
    /// Chunks smaller than this are packed (0: none).
    pub pack_below: u64,
    /// The S3 blob store (None: files in the repository directory).
    pub s3: Option<crate::repo::s3::S3Config>,
    pub registration: bool,
    pub v4_window: u32,
    /// Collection interval (None: off).
    pub gc_interval: Option<Duration>,
    pub gc_grace: Duration,
    pub max_connections: usize,
    pub max_pending_bytes: u64,
    pub group_commit_max_size: u64,
    pub direct_io_min_size: u64,
    pub session: SessionConfig,
    pub shutdown_grace: Duration,
    /// The admin HTTP listener (None: off).
    pub admin_listen: Option<SocketAddr>,
    pub admin_socket: PathBuf,
    pub metrics_per_account: bool,
    pub aes: AesKind,
    pub direct_writes: DirectWrites,
    pub log_format: LogFormat,
    pub log: String,
    /// The configuration file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// Reads `port.info` (one line, a port number) if present.
fn port_info(dir: &Path) -> Result<Option<u16>> {
    let path = dir.join("port.info");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let t = s.trim();
            let port = t.parse::<u16>().ok().filter(|p| *p != 0).with_context(|| {
                format!("{}: {t:?} is not a port number (1-65535)", path.display())
            })?;
            Ok(Some(port))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl Args {
    /// Merges flags and environment (already in `self`) over the TOML file, port.info
    /// and the defaults, and checks the result.
    pub fn resolve(self, cwd: &Path) -> Result<Config> {
        self.resolve_with_default(cwd, Path::new(DEFAULT_CONFIG_FILE))
    }

    /// [`resolve`](Self::resolve), with `default_file` read when `--config` is not
    /// given and it exists.
    pub fn resolve_with_default(self, cwd: &Path, default_file: &Path) -> Result<Config> {
        let config_file = self
            .config
            .clone()
            .or_else(|| default_file.exists().then(|| default_file.to_owned()));
        let file: Args = match &config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Args::default(),
        };
        macro_rules! pick {
            ($f:ident) => {
                self.$f.or(file.$f)
            };
        }
        let port = match pick!(port) {
            Some(p) => p,
            None => port_info(cwd)?.unwrap_or(DEFAULT_PORT),
        };
        let shards = pick!(shards).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        if shards == 0 || shards > 1024 {
            bail!("--shards must be between 1 and 1024, not {shards}");
        }
        let max_connections = pick!(max_connections).unwrap_or(1024);
        if max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        let max_packet = pick!(max_packet).unwrap_or(MAX_CONTENT_SIZE);
        if !(16..=MAX_CONTENT_SIZE).contains(&max_packet) {
            bail!("--max-packet must be between 16 and {MAX_CONTENT_SIZE}, not {max_packet}");
        }
        let limit = u32::MAX as u64 - 16;
        let max_file_size = pick!(max_file_size).unwrap_or(limit);
        if max_file_size > limit {
            bail!("--max-file-size is at most {limit} in protocol v3");
        }
        let secs = |v: Option<u64>, d: u64, name: &str| -> Result<Duration> {
            let v = v.unwrap_or(d);
            if v == 0 || v > 86_400 * 7 {
                bail!("--{name} must be between 1 and 604800 seconds, not {v}");
            }
            Ok(Duration::from_secs(v))
        };
        let session = SessionConfig {
            max_payload: max_packet + cyberbackup_protocol::v3::message::SEND_FILE_FIXED_LEN as u32,
            max_file_size,
            header_timeout: secs(pick!(header_timeout), 30, "header-timeout")?,
            idle_timeout: secs(pick!(idle_timeout), 300, "idle-timeout")?,
            min_rate: match pick!(min_rate).unwrap_or(16 * 1024) {
                0 => bail!("--min-rate must be at least 1 byte per second"),
                r => r,
            },
        };
        let admin_listen = match pick!(admin_listen) {
            Some(a) if a.eq_ignore_ascii_case("off") => None,
            a => {
                let a = a.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
                Some(a.parse::<SocketAddr>().with_context(|| {
                    format!(
                        "--admin-listen {a:?}: expected an address such as 127.0.0.1:9256, or off"
                    )
                })?)
            }
        };
        let repository: PathBuf = pick!(repository).unwrap_or_else(|| "repository".into());
        let admin_socket = pick!(admin_socket).unwrap_or_else(|| repository.join("admin.sock"));
        // sockaddr_un holds 108 bytes with the terminating NUL.
        if admin_socket.as_os_str().len() > 107 {
            bail!(
                "--admin-socket {}: a Unix socket path is at most 107 bytes; choose a shorter one",
                admin_socket.display()
            );
        }
        let has = |a: &Option<String>, b: &Option<String>| a.is_some() || b.is_some();
        if has(&self.s3_endpoint, &file.s3_endpoint) && !has(&self.registry, &file.registry) {
            bail!(
                "--s3-endpoint needs --registry (PostgreSQL) too: an object store is shared, and \
                 servers sharing one must share one registry (with one SQLite registry each, \
                 each would collect the others' blobs as orphans)"
            );
        }
        Ok(Config {
            listen: SocketAddr::new(pick!(bind).unwrap_or(IpAddr::from([0, 0, 0, 0])), port),
            runtime: pick!(runtime).unwrap_or(RuntimeKind::Auto),
            shards,
            storage: pick!(storage).unwrap_or_else(|| "received_files".into()),
            database: pick!(database).unwrap_or_else(|| "defensive.db".into()),
            repository,
            registry: match pick!(registry) {
                Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                    Some(RegistryUrl(url))
                }
                Some(_) => {
                    bail!("--registry takes a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE)")
                }
                None => None,
            },
            registry_connections: match pick!(registry_connections).unwrap_or(8) {
                n @ 2..=1000 => n,
                n => bail!("--registry-connections {n}: expected 2 to 1000"),
            },
            pack_below: match pick!(pack_below).unwrap_or(1 << 20) {
                n @ 0..=16_777_216 => n,
                n => bail!("--pack-below {n}: expected 0 (off) to 16777216 bytes"),
            },
            s3: match pick!(s3_endpoint) {
                None => None,
                Some(endpoint) => {
                    let need = |v: Option<String>, flag: &str| match v {
                        Some(v) if !v.is_empty() => Ok(v),
                        _ => Err(anyhow::anyhow!("--s3-endpoint needs {flag} too")),
                    };
                    Some(crate::repo::s3::S3Config {
                        endpoint,
                        bucket: need(pick!(s3_bucket), "--s3-bucket")?,
                        region: pick!(s3_region).unwrap_or_else(|| "us-east-1".into()),
                        prefix: pick!(s3_prefix).unwrap_or_default(),
                        access_key_id: need(pick!(s3_access_key_id), "--s3-access-key-id")?,
                        secret_access_key: need(
                            pick!(s3_secret_access_key),
                            "--s3-secret-access-key",
                        )?,
                        ca_file: pick!(s3_ca_file),
                    })
                }
            },
            registration: pick!(registration).unwrap_or(true),
            gc_interval: match pick!(gc_interval).unwrap_or(86_400) {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            gc_grace: match pick!(gc_grace).unwrap_or(86_400) {
                g @ 0..=2_592_000 => Duration::from_secs(g),
                g => bail!("--gc-grace is at most 2592000 seconds (30 days), not {g}"),
            },
            v4_window: match pick!(v4_window).unwrap_or(64 << 20) {
                w @ (65_536..=1_073_741_824) => w,
                w => bail!("--v4-window must be between 65536 and 1073741824 bytes, not {w}"),
            },
            max_connections,
            max_pending_bytes: pick!(max_pending_bytes).unwrap_or(32 << 30),
            group_commit_max_size: pick!(group_commit_max_size).unwrap_or(256 * 1024),
            direct_io_min_size: pick!(direct_io_min_size)
                .unwrap_or(crate::storage::DIRECT_MIN_DEFAULT),
            session,
            shutdown_grace: secs(pick!(shutdown_grace), 30, "shutdown-grace")?,
            admin_listen,
            admin_socket,
            metrics_per_account: pick!(metrics_per_account).unwrap_or(false),
            aes: pick!(aes).unwrap_or(AesKind::Auto),
            direct_writes: pick!(direct_writes).unwrap_or(DirectWrites::Ring),
            config_file,
            log_format: pick!(log_format).unwrap_or(LogFormat::Text),
            log: pick!(log)
                .or_else(|| std::env::var("RUST_LOG").ok())
                .unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("cyberbackup-server").chain(v.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults_and_port_info() {
        let dir = tempfile::tempdir().unwrap();
        let c = args(&[])
            .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
            .unwrap();
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert_eq!(c.storage, PathBuf::from("received_files"));
        assert_eq!(c.database, PathBuf::from("defensive.db"));
        std::fs::write(dir.path().join("port.info"), "4242\n").unwrap();
        assert_eq!(
            args(&[])
                .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
                .unwrap()
                .listen
                .port(),
            4242
        );
        assert_eq!(
            args(&["--port", "5000"])
                .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
                .unwrap()
                .listen
                .port(),
            5000
        );
        std::fs::write(dir.path().join("port.info"), "http").unwrap();
        let e = args(&[])
            .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("not a port number"));
    }

    #[test]
    fn toml_file_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "port = 7000\nshards = 3\nstorage = \"/srv/x\"\nlog_format = \"json\"\nruntime = \"mio\"\n",
        )
        .unwrap();
        let c = args(&["--config", f.to_str().unwrap(), "--shards", "2"])
            .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
            .unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.shards, 2);
        assert_eq!(c.storage, PathBuf::from("/srv/x"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.runtime, RuntimeKind::Mio);
        std::fs::write(&f, "prot = 1\n").unwrap();
        assert!(args(&["--config", f.to_str().unwrap()])
            .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
            .is_err());
    }

    /// The package's default config (`contrib/server.toml`, installed as
    /// /etc/cyberbackup/server.toml).
    const PACKAGED: &str = include_str!("../../contrib/server.toml");

    /// `contrib/server.toml` with every `# key = value` line uncommented, but `skip`.
    fn packaged_uncommented(skip: &[&str]) -> String {
        let mut out = String::new();
        for line in PACKAGED.lines() {
            let setting = line
                .strip_prefix("# ")
                .and_then(|rest| Some((rest, rest.split_once(" = ")?.0)))
                .filter(|(_, key)| {
                    key.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                });
            match setting {
                Some((_, key)) if skip.contains(&key) => {}
                Some((rest, _)) => out.push_str(rest),
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// The keys a TOML file may set: the long flags but --config (and --help and
    /// --version), with underscores.
    fn accepted_keys() -> Vec<String> {
        use clap::CommandFactory;
        Args::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "config" | "help" | "version"))
            .map(|l| l.replace('-', "_"))
            .collect()
    }

    #[test]
    fn packaged_config_lists_every_key_with_its_default() {
        let accepted = accepted_keys();
        // Every line, uncommented, is a key the server knows with a value it takes.
        let text = packaged_uncommented(&[]);
        let parsed: Args = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("contrib/server.toml, uncommented: {e}"));
        // ... and every key the server knows is in the file.
        let table: toml::Table = toml::from_str(&text).unwrap();
        for key in &accepted {
            assert!(
                table.contains_key(key),
                "contrib/server.toml does not document {key}"
            );
        }
        // The data paths are set for the package; the rest stays commented out.
        let as_is: toml::Table = toml::from_str(PACKAGED).unwrap();
        let mut set: Vec<&str> = as_is.keys().map(String::as_str).collect();
        set.sort_unstable();
        assert_eq!(set, ["database", "repository", "storage"]);
        assert_eq!(
            parsed.repository.as_deref(),
            Some(Path::new("/var/lib/cyberbackup/repository"))
        );

        // The commented values are the defaults: the file uncommented resolves to the
        // same configuration as the file as shipped. (Not shards, whose default is the
        // CPU count, nor log, which RUST_LOG may change.)
        let dir = tempfile::tempdir().unwrap();
        let resolve = |text: &str| {
            let path = dir.path().join("server.toml");
            std::fs::write(&path, text).unwrap();
            let args = Args {
                config: Some(path),
                ..Args::default()
            };
            format!("{:?}", args.resolve(dir.path()).unwrap())
        };
        assert_eq!(
            resolve(&packaged_uncommented(&[
                "shards",
                "log",
                "registry",
                "s3_endpoint",
                "s3_bucket",
                "s3_region",
                "s3_prefix",
                "s3_access_key_id",
                "s3_secret_access_key",
                "s3_ca_file",
            ])),
            resolve(PACKAGED)
        );
    }

    #[test]
    fn the_registry_url_is_not_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let c = args(&["--registry", "postgres://u:s3cret@db:5432/cb"])
            .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
            .unwrap();
        assert_eq!(
            c.registry.as_deref(),
            Some("postgres://u:s3cret@db:5432/cb")
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("postgres://(hidden)"),
            "{shown}"
        );
    }

    #[test]
    fn impossible_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            &["--shards", "0"][..],
            &["--max-connections", "0"],
            &["--max-packet", "8"],
            &["--max-packet", "16777217"],
            &["--idle-timeout", "0"],
            &["--max-file-size", "4294967295"],
            &["--min-rate", "0"],
            &["--registry", "/var/lib/repo.db"],
            &["--pack-below", "16777217"],
            &["--s3-endpoint", "http://127.0.0.1:3900"],
            &[
                "--s3-endpoint",
                "http://127.0.0.1:3900",
                "--s3-bucket",
                "b",
                "--s3-access-key-id",
                "k",
                "--s3-secret-access-key",
                "s",
            ],
        ] {
            assert!(
                args(bad)
                    .resolve_with_default(dir.path(), &dir.path().join("absent.toml"))
                    .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_default_file_is_read_when_present_and_admin_settings_checked() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("server.toml");
        std::fs::write(
            &etc,
            "port = 7100\nrepository = \"/srv/repo\"\nadmin_listen = \"off\"\naes = \"portable\"\ndirect_writes = \"threads\"\n",
        )
        .unwrap();
        let c = args(&[]).resolve_with_default(dir.path(), &etc).unwrap();
        assert_eq!(c.listen.port(), 7100);
        assert_eq!(c.config_file.as_deref(), Some(etc.as_path()));
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.admin_socket, PathBuf::from("/srv/repo/admin.sock"));
        assert_eq!(c.aes, AesKind::Portable);
        assert_eq!(c.direct_writes, DirectWrites::Threads);
        // --config wins over the default file; defaults where neither says.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "").unwrap();
        let c = args(&["--config", other.to_str().unwrap()])
            .resolve_with_default(dir.path(), &etc)
            .unwrap();
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert_eq!(c.admin_listen, Some("127.0.0.1:9256".parse().unwrap()));
        assert_eq!(c.aes, AesKind::Auto);
        for bad in [
            &["--admin-listen", "localhost"][..],
            &["--admin-socket", &"x".repeat(200)],
        ] {
            assert!(
                args(bad).resolve_with_default(dir.path(), &other).is_err(),
                "{bad:?}"
            );
        }
    }
}
