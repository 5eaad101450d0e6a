//! Uploads: a file of any size is read, checksummed, encrypted and sent in a two-stage
//! pipeline in constant memory (three packet buffers), with checksum retries and
//! reconnects as PROTOCOL.md says.
//!
//! A reader thread reads each packet's plaintext, feeds the checksum and encrypts it in
//! place behind the packet header; the calling thread writes finished packets to the
//! socket and reports progress. CBC encryption is serial, so it is the bound; sending
//! overlaps it.
//!
//! After the last packet the server answers 1603 with its checksum. Equal: CRC_OK and
//! the file is stored. Different: CRC_RETRY and the whole file again, at most three
//! times; the fourth mismatch sends CRC_ABORT. A dropped connection or a timeout
//! reconnects (with the session's identity) after a backoff and starts the file again.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cyberbackup_protocol::v3::cksum::Cksum;
use cyberbackup_protocol::v3::crypto::{ciphertext_len, StreamEncryptor, BLOCK};
use cyberbackup_protocol::v3::header::RequestCode;
use cyberbackup_protocol::v3::message::{
    encode_name_request, encode_send_file_head, FileReceived, Response, SendFileHead,
};
use cyberbackup_protocol::v3::{name, MAX_CONTENT_SIZE};

use crate::progress::{Cancel, Phase, Progress};
use crate::session::{io_error, read_response};
use crate::{ClientError, Session};

/// Default packet size: 1 MiB (measured against 64 KiB, 256 KiB and 4 MiB; see
/// README.md). Always a multiple of 16, never over 16 MiB.
pub const DEFAULT_PACKET_SIZE: usize = 1 << 20;

/// Largest file v3 can carry: its ciphertext size must fit a u32.
pub const MAX_FILE_SIZE: u64 = u32::MAX as u64 - 16;

/// Buffers in flight between the reader thread and the socket.
const BUFFERS: usize = 3;

/// How an upload behaves.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Packet content size (rounded down to a multiple of 16, at most 16 MiB; raised if
    /// the file would need more than 65535 packets).
    pub packet_size: usize,
    /// Resends after a checksum mismatch before aborting (the protocol says three).
    pub max_resends: u32,
    /// Reconnects after a dropped connection or a timeout.
    pub reconnects: u32,
    /// First backoff before a reconnect; doubles each time.
    pub backoff: Duration,
    /// Checked before every packet.
    pub cancel: Cancel,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            packet_size: DEFAULT_PACKET_SIZE,
            max_resends: 3,
            reconnects: 3,
            backoff: Duration::from_millis(250),
            cancel: Cancel::new(),
        }
    }
}

/// A stored file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadSummary {
    pub name: String,
    pub size: u64,
    pub cksum: u32,
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
    /// Times the file was sent (1 unless a checksum differed or the connection dropped).
    pub attempts: u32,
    pub packets: u32,
    pub packet_size: usize,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl UploadSummary {
    /// Plaintext megabytes (10^6 bytes) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.size as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The name a path is stored under: its last component, checked against the protocol's
/// rules.
pub fn stored_name(path: &Path) -> Result<String, ClientError> {
    let bad = |reason: String| ClientError::BadInput {
        path: path.to_owned(),
        reason,
    };
    let base = path
        .file_name()
        .ok_or_else(|| bad("has no file name".into()))?
        .to_str()
        .ok_or_else(|| bad("the name is not UTF-8, which the protocol cannot carry".into()))?;
    name::check_file_name(base.as_bytes())
        .map_err(|e| bad(format!("the name cannot be carried by the protocol: {e}")))?;
    Ok(base.to_owned())
}

/// Checks that `path` can be uploaded (a readable regular file within the size limit)
/// and returns its stored name and size. Call it for every file before connecting.
pub fn check_path(path: &Path) -> Result<(String, u64), ClientError> {
    let name = stored_name(path)?;
    let meta = std::fs::metadata(path).map_err(|source| ClientError::File {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_dir() {
        return Err(ClientError::BadInput {
            path: path.to_owned(),
            reason: "is a directory".into(),
        });
    }
    if !meta.is_file() {
        return Err(ClientError::BadInput {
            path: path.to_owned(),
            reason: "is not a regular file".into(),
        });
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(ClientError::BadInput {
            path: path.to_owned(),
            reason: format!(
                "is {} bytes; protocol v3 carries at most {MAX_FILE_SIZE}",
                meta.len()
            ),
        });
    }
    File::open(path).map_err(|source| ClientError::File {
        path: path.to_owned(),
        source,
    })?;
    Ok((name, meta.len()))
}

/// The packet size used for a file: the wanted size made valid, raised so that the file
/// fits in 65535 packets.
pub fn packet_size_for(size: u64, wanted: usize) -> usize {
    let wanted = (wanted.clamp(BLOCK, MAX_CONTENT_SIZE as usize) / BLOCK) * BLOCK;
    let min = ciphertext_len(size).div_ceil(65_535).div_ceil(BLOCK as u64) as usize * BLOCK;
    wanted.max(min)
}

impl Session {
    /// Uploads the file at `path` under its file name.
    pub fn upload_path(
        &mut self,
        path: &Path,
        opts: &UploadOptions,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> Result<UploadSummary, ClientError> {
        let (name, size) = check_path(path)?;
        let file_err = |source| ClientError::File {
            path: path.to_owned(),
            source,
        };
        self.upload(&name, size, || File::open(path), opts, progress)
            .map_err(|e| match e {
                ClientError::File { source, .. } => file_err(source),
                e => e,
            })
    }

    /// Uploads `size` bytes read from what `open` returns, under `name`. `open` is
    /// called again for every resend, so it must give the same bytes each time.
    pub fn upload<F, R>(
        &mut self,
        name: &str,
        size: u64,
        mut open: F,
        opts: &UploadOptions,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> Result<UploadSummary, ClientError>
    where
        F: FnMut() -> io::Result<R>,
        R: Read + Send,
    {
        name::check_file_name(name.as_bytes()).map_err(|e| ClientError::BadInput {
            path: name.into(),
            reason: format!("the name cannot be carried by the protocol: {e}"),
        })?;
        if size > MAX_FILE_SIZE {
            return Err(ClientError::BadInput {
                path: name.into(),
                reason: format!("is {size} bytes; protocol v3 carries at most {MAX_FILE_SIZE}"),
            });
        }
        let packet = packet_size_for(size, opts.packet_size);
        let total_packets = ciphertext_len(size).div_ceil(packet as u64) as u32;
        let start = Instant::now();
        let (mut attempts, mut resends, mut reconnects) = (0u32, 0u32, 0u32);
        loop {
            if opts.cancel.is_cancelled() {
                return Err(ClientError::Cancelled);
            }
            if self.broken {
                progress(&Progress {
                    file: name,
                    phase: Phase::Reconnecting,
                    bytes: 0,
                    total: size,
                    packet: 0,
                    total_packets,
                    attempt: attempts + 1,
                    bytes_per_sec: 0.0,
                    elapsed: start.elapsed(),
                });
                match self.reconnect() {
                    Ok(()) => {}
                    Err(e) if e.is_transient() && reconnects < opts.reconnects => {
                        std::thread::sleep(backoff(opts.backoff, reconnects));
                        reconnects += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            attempts += 1;
            let reader = open().map_err(|source| ClientError::File {
                path: name.into(),
                source,
            })?;
            let sent = self.send_once(name, size, packet, reader, attempts, opts, progress);
            let (local, reply) = match sent {
                Ok(v) => v,
                Err(e) => {
                    self.broken = true;
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    if e.is_transient() && reconnects < opts.reconnects {
                        tracing::warn!(error = %e, file = name, "connection trouble; reconnecting");
                        std::thread::sleep(backoff(opts.backoff, reconnects));
                        reconnects += 1;
                        continue;
                    }
                    return Err(e);
                }
            };
            let expected_len = ciphertext_len(size);
            let good = reply.cksum == local
                && reply.content_size as u64 == expected_len
                && reply.file_name == name;
            let code = if good {
                RequestCode::CrcOk
            } else if resends < opts.max_resends {
                RequestCode::CrcRetry
            } else {
                RequestCode::CrcAbort
            };
            if !good {
                tracing::warn!(
                    file = name,
                    ours = local,
                    theirs = reply.cksum,
                    attempt = attempts,
                    "checksum mismatch"
                );
            }
            match self.crc_request(code, name) {
                Ok(()) => {}
                // The connection dropped between 1603 and the ACK: whatever the server
                // did, sending the file again on a new connection is safe (a commit
                // of the same name replaces it).
                Err(e)
                    if e.is_transient()
                        && code != RequestCode::CrcAbort
                        && reconnects < opts.reconnects =>
                {
                    tracing::warn!(error = %e, file = name, "connection trouble after 1603; sending again");
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    std::thread::sleep(backoff(opts.backoff, reconnects));
                    reconnects += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
            if good {
                let elapsed = start.elapsed();
                progress(&Progress {
                    file: name,
                    phase: Phase::Done,
                    bytes: size,
                    total: size,
                    packet: total_packets,
                    total_packets,
                    attempt: attempts,
                    bytes_per_sec: size as f64 / elapsed.as_secs_f64().max(1e-9),
                    elapsed,
                });
                return Ok(UploadSummary {
                    name: name.to_owned(),
                    size,
                    cksum: local,
                    elapsed,
                    attempts,
                    packets: total_packets,
                    packet_size: packet,
                });
            }
            if code == RequestCode::CrcAbort {
                return Err(ClientError::ChecksumFailed {
                    file: name.to_owned(),
                    attempts: resends + 1,
                });
            }
            resends += 1;
            progress(&Progress {
                file: name,
                phase: Phase::Retrying,
                bytes: 0,
                total: size,
                packet: 0,
                total_packets,
                attempt: attempts + 1,
                bytes_per_sec: 0.0,
                elapsed: start.elapsed(),
            });
        }
    }

    /// Sends a file already encrypted under [`Session::session_key`]: its ciphertext is
    /// `body` (whole blocks) followed by `last` (the padded final block), cut into
    /// packets of `packet` bytes and written without copying. Returns the server's 1603;
    /// answer it with [`Session::crc_request`]. For load generators.
    pub fn send_ciphertext(
        &mut self,
        name: &str,
        orig_size: u64,
        body: &[u8],
        last: &[u8; BLOCK],
        packet: usize,
    ) -> Result<FileReceived, ClientError> {
        let cipher_len = body.len() as u64 + BLOCK as u64;
        if cipher_len != ciphertext_len(orig_size) || orig_size > MAX_FILE_SIZE {
            return Err(ClientError::BadInput {
                path: name.into(),
                reason: "ciphertext length does not match the file size".into(),
            });
        }
        let packet = packet_size_for(orig_size, packet);
        let total = cipher_len.div_ceil(packet as u64) as u16;
        let t = self.opts.io_timeout;
        let mut head = Vec::with_capacity(23 + 267);
        for k in 1..=total {
            let start = (k as usize - 1) * packet;
            let end = (start + packet).min(cipher_len as usize);
            head.clear();
            encode_send_file_head(
                &mut head,
                &self.identity.id,
                &SendFileHead {
                    content_size: (end - start) as u32,
                    orig_file_size: orig_size as u32,
                    packet_number: k,
                    total_packets: total,
                    file_name: name.as_bytes(),
                },
            )
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let b_end = end.min(body.len());
            let body_part = if start < body.len() {
                &body[start..b_end]
            } else {
                &[][..]
            };
            let last_part = if end > body.len() {
                &last[start.max(body.len()) - body.len()..end - body.len()]
            } else {
                &[][..]
            };
            let mut slices = [
                io::IoSlice::new(&head),
                io::IoSlice::new(body_part),
                io::IoSlice::new(last_part),
            ];
            write_all_vectored(&mut self.stream, &mut slices).map_err(|e| {
                self.broken = true;
                io_error(e, t)
            })?;
        }
        match read_response(&mut self.stream, t) {
            Ok(Response::FileReceived(f)) => Ok(f),
            other => Err(self.unexpected(other, "receiving the file", "after the last packet")),
        }
    }

    /// The error for an answer other than the one expected; the connection may be out
    /// of step, so the next upload reconnects first.
    fn unexpected(
        &mut self,
        got: Result<Response, ClientError>,
        during: &'static str,
        context: &str,
    ) -> ClientError {
        self.broken = true;
        match got {
            Ok(Response::Error) => ClientError::ServerError(during),
            Ok(r) => ClientError::Protocol(format!(
                "unexpected answer {} {context}",
                u16::from(r.code())
            )),
            Err(e) => e,
        }
    }

    /// Sends CRC_OK, CRC_RETRY or CRC_ABORT for `name` and waits for the ACK.
    pub fn crc_request(&mut self, code: RequestCode, name: &str) -> Result<(), ClientError> {
        let t = self.opts.io_timeout;
        self.req.clear();
        encode_name_request(&mut self.req, &self.identity.id, code, name)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        use std::io::Write;
        let r = self
            .stream
            .write_all(&self.req)
            .map_err(|e| io_error(e, t))
            .and_then(|_| read_response(&mut self.stream, t));
        let during = match code {
            RequestCode::CrcOk => "storing the file",
            _ => "discarding the file",
        };
        match r {
            Ok(Response::Ack { .. }) => Ok(()),
            other => Err(self.unexpected(other, during, "to a CRC request")),
        }
    }

    /// Sends every packet once; returns our checksum and the server's 1603.
    #[allow(clippy::too_many_arguments)]
    fn send_once<R: Read + Send>(
        &mut self,
        name: &str,
        size: u64,
        packet: usize,
        mut reader: R,
        attempt: u32,
        opts: &UploadOptions,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> Result<(u32, FileReceived), ClientError> {
        let cipher_len = ciphertext_len(size);
        let total = cipher_len.div_ceil(packet as u64) as u16;
        let key = self.key;
        let id = self.identity.id;
        let timeout = self.opts.io_timeout;
        let stream = &mut self.stream;
        let start = Instant::now();
        std::thread::scope(|s| {
            let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
            let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
            for _ in 0..BUFFERS {
                let _ = empty_tx.send(Vec::with_capacity(packet + 23 + 267));
            }
            let producer = s.spawn(move || -> Result<u32, ClientError> {
                let mut enc = StreamEncryptor::new(&key);
                let mut ck = Cksum::new();
                let file_err = |source: io::Error| {
                    if source.kind() == io::ErrorKind::UnexpectedEof {
                        ClientError::BadInput {
                            path: name.into(),
                            reason: "the file got shorter while it was being sent".into(),
                        }
                    } else {
                        ClientError::File {
                            path: name.into(),
                            source,
                        }
                    }
                };
                for k in 1..=total {
                    let Ok(mut buf) = empty_rx.recv() else {
                        return Ok(0); // the sender gave up; its error is reported
                    };
                    let offset = (k as u64 - 1) * packet as u64;
                    let clen = (cipher_len - offset).min(packet as u64) as usize;
                    buf.clear();
                    encode_send_file_head(
                        &mut buf,
                        &id,
                        &SendFileHead {
                            content_size: clen as u32,
                            orig_file_size: size as u32,
                            packet_number: k,
                            total_packets: total,
                            file_name: name.as_bytes(),
                        },
                    )
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    let h = buf.len();
                    if k < total {
                        buf.resize(h + clen, 0);
                        reader.read_exact(&mut buf[h..]).map_err(file_err)?;
                        ck.update(&buf[h..]);
                        enc.encrypt_blocks(&mut buf[h..])?;
                    } else {
                        let r = (size - offset) as usize;
                        let whole = r / BLOCK * BLOCK;
                        buf.resize(h + r, 0);
                        reader.read_exact(&mut buf[h..]).map_err(file_err)?;
                        ck.update(&buf[h..]);
                        let mut tail = [0u8; BLOCK];
                        tail[..r - whole].copy_from_slice(&buf[h + whole..]);
                        buf.truncate(h + whole);
                        enc.encrypt_blocks(&mut buf[h..])?;
                        let last = std::mem::replace(&mut enc, StreamEncryptor::new(&key))
                            .finish_tail(&tail[..r - whole])?;
                        buf.extend_from_slice(&last);
                        debug_assert_eq!(buf.len(), h + clen);
                    }
                    if full_tx.send(buf).is_err() {
                        return Ok(0);
                    }
                }
                Ok(ck.finalize())
            });

            use std::io::Write;
            let mut sent_plain = 0u64;
            for k in 1..=total as u32 {
                if opts.cancel.is_cancelled() {
                    drop(full_rx);
                    drop(empty_tx);
                    let _ = producer.join();
                    return Err(ClientError::Cancelled);
                }
                let Ok(buf) = full_rx.recv() else {
                    // The reader stopped early: its error says why.
                    drop(empty_tx);
                    return Err(match producer.join() {
                        Ok(Err(e)) => e,
                        _ => ClientError::Protocol("the reader thread stopped".into()),
                    });
                };
                stream.write_all(&buf).map_err(|e| io_error(e, timeout))?;
                sent_plain = (sent_plain + packet as u64).min(size);
                let elapsed = start.elapsed();
                progress(&Progress {
                    file: name,
                    phase: if k == total as u32 {
                        Phase::Verifying
                    } else {
                        Phase::Sending
                    },
                    bytes: sent_plain,
                    total: size,
                    packet: k,
                    total_packets: total as u32,
                    attempt,
                    bytes_per_sec: sent_plain as f64 / elapsed.as_secs_f64().max(1e-9),
                    elapsed,
                });
                let _ = empty_tx.send(buf);
            }
            let local = match producer.join() {
                Ok(r) => r?,
                Err(_) => return Err(ClientError::Protocol("the reader thread panicked".into())),
            };
            match read_response(stream, timeout)? {
                Response::FileReceived(f) => Ok((local, f)),
                Response::Error => Err(ClientError::ServerError("receiving the file")),
                r => Err(ClientError::Protocol(format!(
                    "unexpected answer {} after the last packet",
                    u16::from(r.code())
                ))),
            }
        })
    }
}

/// The wait before reconnect number `n` (from 0): `base * 2^n`, capped.
fn backoff(base: Duration, n: u32) -> Duration {
    base.saturating_mul(1u32 << n.min(16))
        .min(Duration::from_secs(60))
}

/// `write_all` over several buffers with one `writev` per call.
fn write_all_vectored(
    stream: &mut std::net::TcpStream,
    mut bufs: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    use std::io::Write;
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_sizes() {
        assert_eq!(packet_size_for(0, 1 << 20), 1 << 20);
        assert_eq!(packet_size_for(100, 100), 96);
        assert_eq!(packet_size_for(100, 1), 16);
        assert_eq!(packet_size_for(10, usize::MAX), 16 << 20);
        // 4 GiB in 64 KiB packets would need 65537 packets: raised
        let p = packet_size_for(MAX_FILE_SIZE, 65_536);
        assert!(ciphertext_len(MAX_FILE_SIZE).div_ceil(p as u64) <= 65_535);
        assert_eq!(p % 16, 0);
    }

    #[test]
    fn names() {
        assert_eq!(stored_name(Path::new("/tmp/a.txt")).unwrap(), "a.txt");
        assert!(stored_name(Path::new("/")).is_err());
        assert!(stored_name(Path::new("dir/..")).is_err());
        let long = "x".repeat(251);
        assert!(stored_name(Path::new(&long)).is_err());
        assert!(stored_name(Path::new("bad\nname")).is_err());
    }
}
