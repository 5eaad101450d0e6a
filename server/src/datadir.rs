//! One server per data directory, and per port.
//!
//! [`lock`] takes an exclusive `flock` on `<storage>/.lock` for the life of the process
//! and writes the holder's pid in it: a second server started on the same directory
//! (by mistake, or by a unit that restarted too early) exits at once naming the first,
//! before it could sweep the first one's temp files as a crash's leftovers.
//! [`check_port`] refuses a port another process already serves: the shards bind with
//! `SO_REUSEPORT`, which would otherwise let a second server share the port and split
//! the traffic.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The lock file in the storage root.
pub const LOCK: &str = ".lock";

/// Held for the life of the process.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

/// Locks `dir` (created if needed) for this process.
pub fn lock(dir: &Path) -> Result<DirLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(LOCK);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::flock(f.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(()) => {}
        Err(nix::errno::Errno::EWOULDBLOCK) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            bail!(
                "another cyberbackup-server{} is using {}: stop it first, or give this one its own --storage, --database and --repository",
                if pid.is_empty() { String::new() } else { format!(" (pid {pid})") },
                dir.display()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("locking {}", path.display())),
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    f.sync_all()?;
    Ok(DirLock(f))
}

/// Fails if another process listens on `addr` (port 0, any free port, always passes).
pub fn check_port(addr: SocketAddr) -> Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    // A plain bind (no SO_REUSEPORT) fails while anyone listens there, whether or not
    // they set SO_REUSEPORT.
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "port {} on {} is already served by another process (another cyberbackup-server?): stop it, or choose another --port",
            addr.port(),
            addr.ip()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_lock_names_the_first_holder() {
        let d = tempfile::tempdir().unwrap();
        let first = super::lock(d.path()).unwrap();
        // flock is per open file description: a second open in this process conflicts.
        let e = super::lock(d.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        super::lock(d.path()).unwrap();
    }

    #[test]
    fn a_served_port_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(super::check_port(addr).is_err());
        drop(l);
        super::check_port(addr).unwrap();
        super::check_port("127.0.0.1:0".parse().unwrap()).unwrap();
    }
}
