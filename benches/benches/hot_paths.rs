//! Criterion benchmarks of CyberBackup's hot paths.
//!
//! # Groups
//!
//! - `cksum`: the POSIX `cksum` of `cyberbackup_protocol::v3::cksum` (CRC-32/CKSUM with
//!   carry-less-multiply folding, plus the length suffix) against `crc32fast::hash`
//!   (CRC-32/ISO-HDLC, also PCLMULQDQ-folded) on the same random 4 KiB, 64 KiB and
//!   1 MiB buffers. Both are one pass over the data, so the ratio says whether the
//!   checksum the protocol mandates costs more than the usual CRC-32. Bytes/s.
//! - `codec`: the fixed-layout codecs on the request path: `RequestHeader::parse` +
//!   `to_bytes` (one 23-byte header), `ResponseHeader::to_bytes` (one 7-byte header),
//!   `SendFileHead::decode` (the 267-byte fixed part of SEND_FILE) and
//!   `Response::FileReceived` encode and decode (the 286-byte 1603 frame). Headers
//!   report elements/s, the payloads bytes/s.
//! - `aes`: AES-256-CBC over 1 MiB: decryption with `StreamDecryptor::decrypt_b2b`
//!   (the multi-block path the session uses, parallel across blocks: the VAES kernel
//!   where the CPU has it), the same with the `aes` + `cbc` crates directly
//!   (`decrypt_cbc_crate`, what `CYBERBACKUP_AES=portable` runs), and encryption
//!   with `StreamEncryptor::encrypt_blocks` (serial by the nature of CBC; what a client
//!   pays), for comparison. Bytes/s.
//! - `session`: the whole server path in memory. A client registers and exchanges keys
//!   with a `ServerSession` (fixed-seed RNGs, an in-memory registry), then a pre-built
//!   byte stream — a 16 MiB file in SEND_FILE packets of 1 MiB or 64 KiB, then CRC_OK —
//!   is fed through `ServerSession::handle_input` in 256 KiB reads, as a runtime would
//!   after each socket read. That covers header parsing, decryption into the sink, the
//!   checksum, the 1603 answer, the commit and the ACK. The throughput counts the
//!   ciphertext ingested (the packet and CRC_OK headers, under 0.5% of the stream, are
//!   fed but not counted). Sinks:
//!   - `vec`: `MemoryBackend` with one recycled `Vec` sink, so no allocation and no
//!     page fault per file: the cost of the protocol work alone.
//!   - `mmap_anon_recycled`: a `FileSink` over `memmap2::MmapMut::map_anon`, one mapping
//!     reused for every file (same work as `vec` through a mapping).
//!   - `mmap_anon_fresh`: a new anonymous mapping per file, unmapped on commit, so every
//!     file pays the page faults (and zeroing) of its sink.
//!   - `file_pwrite`: the server's sink: `pwrite` of each decrypted 64 KiB chunk into a
//!     temp file (in the target directory), overwritten by every upload; page cache
//!     only, never synced, so this is the CPU cost of ingest minus the disk.
//!
//! # Running
//!
//! ```text
//! cargo bench -p cyberbackup-benches                 # everything, about a minute and a half
//! cargo bench -p cyberbackup-benches -- cksum        # one group (a regex on the ids)
//! cargo bench -p cyberbackup-benches -- --warm-up-time 1 --measurement-time 2
//! ```
//!
//! Each benchmark warms up for 1 s and measures 20 samples over 3 s. Those settings are
//! the defaults of the `Criterion` value below rather than per-group settings, so that
//! `--warm-up-time`, `--measurement-time` and `--sample-size` on the command line still
//! apply (criterion lets a group's own settings override the command line).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
    Throughput,
};
use memmap2::MmapMut;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use cyberbackup_protocol::common::ClientId;
use cyberbackup_protocol::v3::cksum;
use cyberbackup_protocol::v3::crypto::{
    self, ciphertext_len, decryption_key, AesKey, ClientKeypair, StreamDecryptor, StreamEncryptor,
    ZERO_IV,
};
use cyberbackup_protocol::v3::header::{
    RequestCode, RequestHeader, ResponseCode, ResponseHeader, REQUEST_HEADER_LEN,
    RESPONSE_HEADER_LEN,
};
use cyberbackup_protocol::v3::message::{
    encode_name_request, encode_send_file, encode_send_file_head, encode_send_public_key,
    FileReceived, Response, SendFileHead, SEND_FILE_FIXED_LEN,
};
use cyberbackup_protocol::v3::session::memory::MemoryBackend;
use cyberbackup_protocol::v3::session::{
    sink_range, Completion, FileSink, Op, ServerSession, SessionConfig,
};
use std::os::unix::fs::FileExt;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Plaintext size of the file the `session` group uploads.
const FILE_SIZE: usize = 16 * MIB;
/// Bytes handed to `handle_input` per call, like one socket read.
const READ_SIZE: usize = 256 * KIB;
/// Name of the uploaded file.
const FILE_NAME: &str = "bench.bin";

fn size_label(n: usize) -> String {
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{}MiB", n / MIB)
    } else if n.is_multiple_of(KIB) {
        format!("{}KiB", n / KIB)
    } else {
        format!("{n}B")
    }
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

// ---------------------------------------------------------------------------
// cksum

fn bench_cksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("cksum");
    for (i, size) in [4 * KIB, 64 * KIB, MIB].into_iter().enumerate() {
        let buf = random_bytes(size, 0xC5_0000 + i as u64);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("posix_cksum", size_label(size)),
            &buf,
            |b, buf| b.iter(|| cksum(black_box(buf))),
        );
        g.bench_with_input(
            BenchmarkId::new("crc32fast", size_label(size)),
            &buf,
            |b, buf| b.iter(|| crc32fast::hash(black_box(buf))),
        );
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// codec

fn bench_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let id: ClientId = core::array::from_fn(|i| (i as u8).wrapping_mul(37));

    let req = RequestHeader {
        client_id: id,
        version: cyberbackup_protocol::v3::VERSION,
        code: RequestCode::SendFile,
        payload_size: (SEND_FILE_FIXED_LEN + MIB) as u32,
    }
    .to_bytes();
    g.throughput(Throughput::Elements(1));
    g.bench_function("request_header_parse_to_bytes", |b| {
        b.iter(|| {
            let h = RequestHeader::parse(black_box(&req[..])).expect("23 bytes");
            black_box(h.to_bytes())
        })
    });

    let resp = ResponseHeader {
        version: cyberbackup_protocol::v3::VERSION,
        code: ResponseCode::FileReceived,
        payload_size: 279,
    };
    g.throughput(Throughput::Elements(1));
    g.bench_function("response_header_encode", |b| {
        b.iter(|| black_box(black_box(&resp).to_bytes()))
    });

    let mut packet = Vec::new();
    encode_send_file_head(
        &mut packet,
        &id,
        &SendFileHead {
            content_size: MIB as u32,
            orig_file_size: FILE_SIZE as u32,
            packet_number: 3,
            total_packets: 17,
            file_name: b"holiday-photos-2024.tar",
        },
    )
    .expect("valid name");
    let fixed = &packet[REQUEST_HEADER_LEN..];
    assert_eq!(fixed.len(), SEND_FILE_FIXED_LEN);
    g.throughput(Throughput::Bytes(SEND_FILE_FIXED_LEN as u64));
    g.bench_function("send_file_head_decode", |b| {
        b.iter(|| {
            let h = SendFileHead::decode(black_box(fixed)).expect("decodes");
            black_box((h.content_size, h.packet_number, h.file_name.len()))
        })
    });

    let received = Response::FileReceived(FileReceived {
        client_id: id,
        content_size: ciphertext_len(FILE_SIZE as u64) as u32,
        file_name: "holiday-photos-2024.tar".into(),
        cksum: 0xDEAD_BEEF,
    });
    let mut frame = Vec::new();
    received.encode(&mut frame);
    g.throughput(Throughput::Bytes(frame.len() as u64));
    let mut out = Vec::with_capacity(frame.len());
    g.bench_function("file_received_encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&received).encode(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("file_received_decode", |b| {
        b.iter(|| {
            let f = black_box(&frame[..]);
            let h = ResponseHeader::parse(f).expect("7 bytes");
            Response::decode(h.code, &f[RESPONSE_HEADER_LEN..]).expect("decodes")
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// aes

fn bench_aes(c: &mut Criterion) {
    let mut g = c.benchmark_group("aes");
    let key: AesKey = core::array::from_fn(|i| i as u8 ^ 0x5A);
    let plain = random_bytes(MIB, 0xAE5);
    // The first 1 MiB of the ciphertext: whole blocks, no padding block.
    let cipher = crypto::encrypt(&key, &plain)[..MIB].to_vec();
    let dk = decryption_key(&key);
    g.throughput(Throughput::Bytes(MIB as u64));

    let mut out = vec![0u8; MIB];
    // Checked once up front: a filter on the command line may skip the closure below.
    StreamDecryptor::new(&dk, &ZERO_IV)
        .decrypt_b2b(&cipher, &mut out)
        .expect("block aligned");
    assert_eq!(out, plain, "decrypt_b2b round trip");
    g.bench_function(BenchmarkId::new("decrypt_b2b", "1MiB"), |b| {
        b.iter(|| {
            let mut d = StreamDecryptor::new(&dk, &ZERO_IV);
            d.decrypt_b2b(black_box(&cipher), &mut out)
                .expect("block aligned");
            black_box(&out);
        })
    });

    {
        use aes::cipher::{inout::InOutBuf, BlockDecryptMut, KeyIvInit};
        g.bench_function(BenchmarkId::new("decrypt_cbc_crate", "1MiB"), |b| {
            b.iter(|| {
                let mut d = cbc::Decryptor::<aes::Aes256Dec>::new((&key).into(), (&ZERO_IV).into());
                let buf = InOutBuf::new(black_box(&cipher[..]), &mut out[..]).expect("same length");
                d.decrypt_blocks_inout_mut(buf.into_chunks().0);
                black_box(&out);
            })
        });
        assert_eq!(out, plain, "cbc crate round trip");
    }

    let mut buf = plain.clone();
    g.bench_function(BenchmarkId::new("encrypt_serial", "1MiB"), |b| {
        b.iter(|| {
            let mut e = StreamEncryptor::new(&key);
            e.encrypt_blocks(black_box(&mut buf))
                .expect("block aligned");
            black_box(&buf);
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// session

/// A `FileSink` over an anonymous memory mapping (the sink may be a longer recycled
/// mapping; the session sees exactly `len` bytes), or over a temp file written with
/// `pwrite` as the server's sink is (page cache only: the file is never synced).
enum MmapSink {
    Map(MmapMut, usize),
    File(std::fs::File, u64),
}

impl FileSink for MmapSink {
    fn len(&self) -> u64 {
        match self {
            MmapSink::Map(_, len) => *len as u64,
            MmapSink::File(_, len) => *len,
        }
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let r = sink_range(FileSink::len(self) as usize, offset, data.len())?;
        match self {
            MmapSink::Map(map, _) => map[r].copy_from_slice(data),
            MmapSink::File(f, _) => f.write_all_at(data, offset)?,
        }
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let r = sink_range(FileSink::len(self) as usize, offset, buf.len())?;
        match self {
            MmapSink::Map(map, _) => buf.copy_from_slice(&map[r]),
            MmapSink::File(f, _) => f.read_exact_at(buf, offset)?,
        }
        Ok(())
    }
    fn stage(&mut self, offset: u64, max: usize) -> Option<&mut [u8]> {
        let r = sink_range(FileSink::len(self) as usize, offset, max).ok()?;
        match self {
            MmapSink::Map(map, _) => Some(&mut map[r]),
            MmapSink::File(..) => None,
        }
    }
}

/// Runs a session's ops: what a runtime does between reads.
trait Driver<S: FileSink> {
    /// Feeds all of `input`, running ops as they come; returns the bytes consumed.
    fn feed(&mut self, s: &mut ServerSession<S, StdRng>, now: Instant, input: &[u8]) -> usize;
    /// Called after each upload: hands the committed sink back for the next file, for
    /// backends that keep committed files.
    fn reclaim(&mut self, client: &ClientId);
}

impl Driver<Vec<u8>> for MemoryBackend {
    fn feed(
        &mut self,
        s: &mut ServerSession<Vec<u8>, StdRng>,
        now: Instant,
        input: &[u8],
    ) -> usize {
        MemoryBackend::feed(self, s, now, input)
    }

    fn reclaim(&mut self, client: &ClientId) {
        // MemoryBackend keeps committed files; take the buffer back so the next
        // OpenFile reuses it (capacity kept, so no allocation or zeroing).
        if let Some((buf, _)) = self.files.remove(&(*client, FILE_NAME.to_owned())) {
            self.recycle = Some(buf);
        }
    }
}

/// Registry ops go to a `MemoryBackend`; files go to anonymous mappings, or to one
/// temp file overwritten by every upload.
struct MmapBackend {
    registry: MemoryBackend,
    /// Keep the mapping (or the file) of a committed file for the next one.
    recycle: bool,
    /// Files go to a temp file rather than a mapping.
    file: bool,
    spare: Option<MmapSink>,
}

impl MmapBackend {
    fn new(recycle: bool) -> Self {
        Self {
            registry: MemoryBackend::default(),
            recycle,
            file: false,
            spare: None,
        }
    }

    fn temp_file() -> Self {
        Self {
            registry: MemoryBackend::default(),
            recycle: true,
            file: true,
            spare: None,
        }
    }

    fn execute(&mut self, op: Op<MmapSink>) -> Option<Completion<MmapSink>> {
        let registry_op = match op {
            Op::OpenFile { len, .. } => {
                let sink = match self.spare.take() {
                    Some(MmapSink::Map(m, _)) if m.len() as u64 >= len => {
                        MmapSink::Map(m, len as usize)
                    }
                    Some(MmapSink::File(f, _)) => {
                        f.set_len(len).expect("sizing the temp file");
                        MmapSink::File(f, len)
                    }
                    _ if self.file => {
                        let f =
                            tempfile::tempfile_in(env!("CARGO_TARGET_TMPDIR")).expect("temp file");
                        f.set_len(len).expect("sizing the temp file");
                        MmapSink::File(f, len)
                    }
                    _ => MmapSink::Map(
                        MmapMut::map_anon((len as usize).max(1)).expect("anonymous mapping"),
                        len as usize,
                    ),
                };
                return Some(Completion::FileOpened(Ok(sink)));
            }
            Op::Commit { sink, .. } => {
                if self.recycle {
                    self.spare = Some(sink);
                }
                return Some(Completion::Committed(Ok(())));
            }
            Op::Discard { sink } => {
                if self.recycle && self.spare.is_none() {
                    self.spare = Some(sink);
                }
                return None;
            }
            Op::Register { client_id, name } => Op::Register { client_id, name },
            Op::StorePublicKey {
                client_id,
                name,
                public_key,
                registered_here,
            } => Op::StorePublicKey {
                client_id,
                name,
                public_key,
                registered_here,
            },
            Op::Reconnect { client_id, name } => Op::Reconnect { client_id, name },
        };
        self.registry
            .execute(registry_op)
            .map(|completion| match completion {
                Completion::Registered(ok) => Completion::Registered(ok),
                Completion::PublicKeyStored(r) => Completion::PublicKeyStored(r),
                Completion::Reconnect(look) => Completion::Reconnect(look),
                Completion::Committed(r) => Completion::Committed(r),
                Completion::FileOpened(_) => unreachable!("registry ops open no file"),
            })
    }
}

impl Driver<MmapSink> for MmapBackend {
    /// The same loop as `MemoryBackend::feed`.
    fn feed(
        &mut self,
        s: &mut ServerSession<MmapSink, StdRng>,
        now: Instant,
        mut input: &[u8],
    ) -> usize {
        let total = input.len();
        loop {
            let n = s.handle_input(now, input);
            input = &input[n..];
            while let Some(op) = s.poll_op() {
                if let Some(c) = self.execute(op) {
                    s.complete(now, c);
                }
            }
            if input.is_empty() || s.is_closing() || (n == 0 && !s.is_waiting()) {
                break;
            }
        }
        total - input.len()
    }

    fn reclaim(&mut self, _client: &ClientId) {}
}

/// Splits a session's output into responses.
fn take_responses<S: FileSink>(s: &mut ServerSession<S, StdRng>) -> Vec<Response> {
    let mut v = Vec::new();
    let mut out = s.output();
    while !out.is_empty() {
        let h = ResponseHeader::parse(out).expect("whole response header");
        let end = RESPONSE_HEADER_LEN + h.payload_size as usize;
        v.push(Response::decode(h.code, &out[RESPONSE_HEADER_LEN..end]).expect("decodes"));
        out = &out[end..];
    }
    s.clear_output();
    v
}

/// A logged-in client: its id and session key.
struct Client {
    id: ClientId,
    key: AesKey,
}

/// Registers `name` and exchanges keys, as in the session tests.
fn login<S: FileSink, D: Driver<S>>(
    d: &mut D,
    s: &mut ServerSession<S, StdRng>,
    now: Instant,
    kp: &ClientKeypair,
    name: &str,
) -> Client {
    let mut req = Vec::new();
    encode_name_request(&mut req, &[0; 16], RequestCode::Register, name).expect("valid name");
    assert_eq!(d.feed(s, now, &req), req.len());
    let Some(Response::RegisterOk { client_id }) = take_responses(s).pop() else {
        panic!("register failed")
    };
    req.clear();
    encode_send_public_key(&mut req, &client_id, name, kp.public_der()).expect("valid key");
    assert_eq!(d.feed(s, now, &req), req.len());
    let Some(Response::AesKey { encrypted_key, .. }) = take_responses(s).pop() else {
        panic!("no AES key")
    };
    let key = kp
        .decrypt_session_key(&encrypted_key)
        .expect("session key decrypts");
    Client { id: client_id, key }
}

/// The byte stream of one upload: SEND_FILE packets of `packet` ciphertext bytes,
/// then CRC_OK. Returns it with the ciphertext length.
fn upload_stream(c: &Client, data: &[u8], packet: usize) -> (Vec<u8>, u64) {
    let ct = crypto::encrypt(&c.key, data);
    let total = ct.len().div_ceil(packet);
    let mut stream = Vec::with_capacity(ct.len() + (total + 1) * 512);
    for (i, chunk) in ct.chunks(packet).enumerate() {
        encode_send_file(
            &mut stream,
            &c.id,
            FILE_NAME,
            data.len() as u32,
            i as u16 + 1,
            total as u16,
            chunk,
        )
        .expect("valid packet");
    }
    encode_name_request(&mut stream, &c.id, RequestCode::CrcOk, FILE_NAME).expect("valid name");
    (stream, ct.len() as u64)
}

/// Feeds one whole upload in `READ_SIZE` reads.
fn ingest<S: FileSink, D: Driver<S>>(
    d: &mut D,
    s: &mut ServerSession<S, StdRng>,
    now: Instant,
    stream: &[u8],
) {
    for read in stream.chunks(READ_SIZE) {
        let used = d.feed(s, now, black_box(read));
        assert_eq!(used, read.len(), "the session stopped consuming input");
    }
}

/// Logs a client in on a fresh session, builds its upload stream, checks one upload end
/// to end (1603 with the right checksum, then ACK) and benchmarks the upload.
fn bench_upload<S: FileSink, D: Driver<S>>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    sink: &str,
    mut d: D,
    kp: &ClientKeypair,
    data: &[u8],
    expect_cksum: u32,
    packet: usize,
) {
    let now = Instant::now();
    let mut s = ServerSession::new(SessionConfig::default(), StdRng::seed_from_u64(2), now);
    let c = login(&mut d, &mut s, now, kp, "bench");
    let (stream, cipher_len) = upload_stream(&c, data, packet);

    ingest(&mut d, &mut s, now, &stream);
    let r = take_responses(&mut s);
    assert!(
        matches!(&r[..], [Response::FileReceived(f), Response::Ack { .. }]
            if f.cksum == expect_cksum && f.content_size as u64 == cipher_len),
        "unexpected answers to the upload: {r:?}"
    );
    d.reclaim(&c.id);
    // 1603 (7 + 279 bytes) and ACK (7 + 16) per upload.
    let answer_len = RESPONSE_HEADER_LEN + 279 + RESPONSE_HEADER_LEN + 16;

    g.throughput(Throughput::Bytes(cipher_len));
    g.bench_function(
        BenchmarkId::new(sink, format!("{}_packets", size_label(packet))),
        |b| {
            b.iter(|| {
                ingest(&mut d, &mut s, now, &stream);
                assert_eq!(s.output().len(), answer_len, "1603 and ACK");
                s.clear_output();
                d.reclaim(&c.id);
            })
        },
    );
    assert!(!s.is_closing());
    assert_eq!(s.stats().errors, 0);
}

fn bench_session(c: &mut Criterion) {
    let kp = ClientKeypair::generate(&mut StdRng::seed_from_u64(1)).expect("RSA key");
    let data = random_bytes(FILE_SIZE, 0x5E55);
    let expect = cksum(&data);

    let mut g = c.benchmark_group("session");
    // An iteration is a whole 16 MiB upload (milliseconds): the same number of
    // iterations in every sample.
    g.sampling_mode(SamplingMode::Flat);
    for packet in [MIB, 64 * KIB] {
        bench_upload(
            &mut g,
            "vec",
            MemoryBackend::default(),
            &kp,
            &data,
            expect,
            packet,
        );
    }
    bench_upload(
        &mut g,
        "mmap_anon_recycled",
        MmapBackend::new(true),
        &kp,
        &data,
        expect,
        MIB,
    );
    bench_upload(
        &mut g,
        "mmap_anon_fresh",
        MmapBackend::new(false),
        &kp,
        &data,
        expect,
        MIB,
    );
    bench_upload(
        &mut g,
        "file_pwrite",
        MmapBackend::temp_file(),
        &kp,
        &data,
        expect,
        MIB,
    );
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = bench_cksum, bench_codec, bench_aes, bench_session
}
criterion_main!(hot_paths);
