//! The v4 transport: the `Noise_XX_25519_AESGCM_SHA256` handshake (by the `snow`
//! crate) and the record layer after it (`docs/PROTOCOL-V4.md` §2-§3).
//!
//! snow brings X25519, SHA-256 and the handshake state machine. The AES-256-GCM cipher
//! is given to snow through a small resolver (`resolver`) backed by `ring`
//! ([`super::aead`]): snow's own AES-GCM (RustCrypto's) does not build without its
//! `std` feature and is five times slower here, and this one keeps the expanded key
//! for the session instead of expanding it again for every record. Nothing here is
//! hand-written cryptography: it is glue between snow and ring.

use super::aead::Gcm as RingGcm;
use snow::params::NoiseParams;
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroizing;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";
/// Largest Noise message (handshake message or record), without its length prefix.
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// AEAD tag bytes.
pub const TAG_LEN: usize = 16;
/// Most plaintext bytes in one record.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("noise: {0}")]
    Snow(#[from] snow::Error),
    #[error("a record of {0} bytes is shorter than its tag")]
    ShortRecord(usize),
}

fn params() -> NoiseParams {
    // The constant parses: a unit test below holds it.
    NOISE_PARAMS.parse().unwrap_or_else(|_| unreachable!())
}

/// The resolver: our AES-256-GCM, snow's X25519, SHA-256 and RNG.
fn resolver() -> Box<dyn CryptoResolver + Send> {
    Box::new(FallbackResolver::new(
        Box::new(GcmResolver),
        Box::new(DefaultResolver),
    ))
}

fn builder<'a>() -> snow::Builder<'a> {
    snow::Builder::with_resolver(params(), resolver())
}

struct GcmResolver;

impl CryptoResolver for GcmResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }
    fn resolve_dh(&self, _: &snow::params::DHChoice) -> Option<Box<dyn Dh>> {
        None
    }
    fn resolve_hash(&self, _: &snow::params::HashChoice) -> Option<Box<dyn Hash>> {
        None
    }
    fn resolve_cipher(&self, c: &snow::params::CipherChoice) -> Option<Box<dyn Cipher>> {
        matches!(c, snow::params::CipherChoice::AESGCM)
            .then(|| Box::new(Gcm(None)) as Box<dyn Cipher>)
    }
}

/// AES-256-GCM with the key expanded once; the nonce is 32 zero bits and the 64-bit
/// big-endian counter, as the Noise spec fixes for AESGCM.
struct Gcm(Option<RingGcm>);

fn gcm_nonce(n: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    b
}

impl Cipher for Gcm {
    fn name(&self) -> &'static str {
        "AESGCM"
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.0 = Some(RingGcm::new(key));
    }

    fn encrypt(&self, nonce: u64, ad: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let n = plaintext.len();
        // snow calls this only after `set`, with `out` of at least n + 16 bytes.
        let (Some(c), true) = (self.0.as_ref(), out.len() >= n + TAG_LEN) else {
            return 0;
        };
        out[..n].copy_from_slice(plaintext);
        let tag = c.seal(gcm_nonce(nonce), ad, &mut out[..n]);
        out[n..n + TAG_LEN].copy_from_slice(&tag);
        n + TAG_LEN
    }

    fn decrypt(
        &self,
        nonce: u64,
        ad: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let Some(c) = self.0.as_ref() else {
            return Err(snow::Error::Decrypt);
        };
        if ciphertext.len() < TAG_LEN {
            return Err(snow::Error::Decrypt);
        }
        let m = ciphertext.len() - TAG_LEN;
        if out.len() < m {
            return Err(snow::Error::Decrypt);
        }
        out[..m].copy_from_slice(&ciphertext[..m]);
        c.open(gcm_nonce(nonce), ad, &mut out[..m], &ciphertext[m..])
            .map(|()| m)
            .map_err(|_| snow::Error::Decrypt)
    }
}

/// An X25519 static key pair (the server's, or a device's).
#[derive(Clone)]
pub struct StaticKey {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey")
            .field("public", &fingerprint(&self.public))
            .finish_non_exhaustive()
    }
}

impl StaticKey {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Result<StaticKey, NoiseError> {
        let kp = builder().generate_keypair()?;
        let mut private = Zeroizing::new([0u8; 32]);
        private.copy_from_slice(&kp.private);
        let mut public = [0u8; 32];
        public.copy_from_slice(&kp.public);
        Ok(StaticKey { private, public })
    }

    /// The key pair of a stored private key.
    pub fn from_private(private: [u8; 32]) -> StaticKey {
        let private = Zeroizing::new(private);
        // X25519 public key: the scalar times the base point (clamping is X25519's).
        let public = x25519_public(&private);
        StaticKey { private, public }
    }

    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    pub fn private(&self) -> &[u8; 32] {
        &self.private
    }
}

fn x25519_public(private: &[u8; 32]) -> [u8; 32] {
    // snow's Dh computes the public key from a private one.
    let mut dh = match DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) {
        Some(dh) => dh,
        None => unreachable!("snow is built with curve25519"),
    };
    dh.set(private);
    let mut p = [0u8; 32];
    p.copy_from_slice(dh.pubkey());
    p
}

/// A key's fingerprint: `SHA256:` and the lowercase hex of the SHA-256 of the key.
pub fn fingerprint(public: &[u8; 32]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(public);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("SHA256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// One side of a handshake in progress.
pub struct Handshake {
    state: snow::HandshakeState,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake").finish_non_exhaustive()
    }
}

impl Handshake {
    /// The client's side (the initiator).
    pub fn initiator(key: &StaticKey) -> Result<Handshake, NoiseError> {
        Ok(Handshake {
            state: builder()
                .local_private_key(&key.private[..])?
                .build_initiator()?,
        })
    }

    /// The server's side (the responder).
    pub fn responder(key: &StaticKey) -> Result<Handshake, NoiseError> {
        Ok(Handshake {
            state: builder()
                .local_private_key(&key.private[..])?
                .build_responder()?,
        })
    }

    /// Writes the next handshake message with `payload`, length-prefixed, to `out`.
    pub fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let n = self.state.write_message(payload, &mut buf)?;
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&buf[..n]);
        Ok(())
    }

    /// Reads a handshake message (without its length prefix); returns its payload.
    pub fn read(&mut self, message: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let n = self.state.read_message(message, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// The peer's static key, once a message carrying it was read.
    pub fn remote_static(&self) -> Option<[u8; 32]> {
        self.state.get_remote_static()?.try_into().ok()
    }

    /// The handshake hash so far (after message 3: the same on both ends, and unique
    /// to this connection; see `docs/PROTOCOL-V4.md` §5.1).
    pub fn handshake_hash(&self) -> [u8; 32] {
        let mut h = [0u8; 32];
        let got = self.state.get_handshake_hash();
        let n = got.len().min(32);
        h[..n].copy_from_slice(&got[..n]);
        h
    }

    /// The handshake is over: the record layer.
    pub fn into_transport(self) -> Result<Transport, NoiseError> {
        Ok(Transport {
            state: self.state.into_transport_mode()?,
            scratch: vec![0u8; MAX_NOISE_MESSAGE],
            gather: Vec::new(),
        })
    }
}

/// The record layer after the handshake.
pub struct Transport {
    state: snow::TransportState,
    scratch: Vec<u8>,
    /// A record that spans the parts given to [`Transport::seal_parts`], gathered.
    gather: Vec<u8>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").finish_non_exhaustive()
    }
}

impl Transport {
    /// Encrypts `plaintext` into records (at most 65,519 plaintext bytes each),
    /// appending them length-prefixed to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        self.seal_parts(&[plaintext], out)
    }

    /// Seals the concatenation of `parts` exactly as [`Self::seal`] would, without
    /// concatenating them first: a record that lies within one part is sealed from
    /// it, and only a record that spans parts is gathered (so a frame header and a
    /// chunk are sent without copying the chunk into a frame).
    pub fn seal_parts(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        // Bytes not yet sealed: the current record is the next min(left, the limit).
        let mut left: usize = parts.iter().map(|p| p.len()).sum();
        let mut gather = std::mem::take(&mut self.gather);
        gather.clear();
        let r = (|| {
            for &part in parts {
                let mut p = part;
                while !p.is_empty() {
                    let n = left.min(MAX_RECORD_PLAINTEXT);
                    if gather.is_empty() && p.len() >= n {
                        seal_record(&mut self.state, &p[..n], out)?;
                        p = &p[n..];
                        left -= n;
                        continue;
                    }
                    let take = (n - gather.len()).min(p.len());
                    gather.extend_from_slice(&p[..take]);
                    p = &p[take..];
                    if gather.len() == n {
                        seal_record(&mut self.state, &gather, out)?;
                        gather.clear();
                        left -= n;
                    }
                }
            }
            Ok(())
        })();
        self.gather = gather;
        r
    }

    /// Decrypts one record (without its length prefix), appending its plaintext.
    pub fn open(&mut self, record: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        if record.len() < TAG_LEN {
            return Err(NoiseError::ShortRecord(record.len()));
        }
        let n = self.state.read_message(record, &mut self.scratch)?;
        out.extend_from_slice(&self.scratch[..n]);
        Ok(())
    }

    /// Decrypts one record (without its length prefix) straight into `frames`.
    pub fn open_into(
        &mut self,
        record: &[u8],
        frames: &mut super::wire::FrameReader,
    ) -> Result<(), NoiseError> {
        if record.len() < TAG_LEN {
            return Err(NoiseError::ShortRecord(record.len()));
        }
        let state = &mut self.state;
        frames.push_with(record.len() - TAG_LEN, |out| {
            state.read_message(record, out)
        })?;
        Ok(())
    }

    /// The peer's static key.
    pub fn remote_static(&self) -> Option<[u8; 32]> {
        self.state.get_remote_static()?.try_into().ok()
    }
}

/// Seals one record (at most [`MAX_RECORD_PLAINTEXT`] bytes) with its length prefix.
fn seal_record(
    state: &mut snow::TransportState,
    part: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), NoiseError> {
    let start = out.len();
    out.resize(start + 2 + part.len() + TAG_LEN, 0);
    let n = state.write_message(part, &mut out[start + 2..])?;
    out.truncate(start + 2 + n);
    out[start..start + 2].copy_from_slice(&(n as u16).to_le_bytes());
    Ok(())
}

/// The length-prefixed Noise message at the front of `b`, if it is all there, and the
/// bytes it takes (with its prefix).
pub fn whole_message(b: &[u8]) -> Option<(&[u8], usize)> {
    let n = 2 + u16::from_le_bytes([*b.first()?, *b.get(1)?]) as usize;
    Some((b.get(2..n)?, n))
}

/// Splits a byte stream into length-prefixed Noise messages.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
    head: usize,
}

impl MessageReader {
    /// Appends bytes from the socket.
    pub fn push(&mut self, b: &[u8]) {
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        } else if self.head > 256 * 1024 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(b);
    }

    /// Bytes waiting.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }

    /// The length (with its 2-byte prefix) of the message being read, once its prefix
    /// is here.
    pub fn current_len(&self) -> Option<usize> {
        let b = self.buf.get(self.head..self.head + 2)?;
        Some(2 + u16::from_le_bytes([b[0], b[1]]) as usize)
    }

    /// The next whole message, if one is here.
    pub fn next_message(&mut self) -> Option<&[u8]> {
        let (msg, taken) = whole_message(&self.buf[self.head..])?;
        self.head += taken;
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse() {
        let _ = params();
    }

    fn pair() -> (Transport, Transport, [u8; 32], [u8; 32]) {
        let (ck, sk) = (
            StaticKey::generate().unwrap(),
            StaticKey::generate().unwrap(),
        );
        let mut c = Handshake::initiator(&ck).unwrap();
        let mut s = Handshake::responder(&sk).unwrap();
        let mut wire = Vec::new();
        c.write(&[], &mut wire).unwrap();
        s.read(&wire[2..]).unwrap();
        wire.clear();
        s.write(b"hello", &mut wire).unwrap();
        assert_eq!(c.read(&wire[2..]).unwrap(), b"hello");
        assert_eq!(c.remote_static(), Some(*sk.public()));
        wire.clear();
        c.write(b"login", &mut wire).unwrap();
        assert_eq!(s.read(&wire[2..]).unwrap(), b"login");
        assert_eq!(s.remote_static(), Some(*ck.public()));
        (
            c.into_transport().unwrap(),
            s.into_transport().unwrap(),
            *ck.public(),
            *sk.public(),
        )
    }

    #[test]
    fn sealing_parts_is_sealing_their_concatenation() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let m = MAX_RECORD_PLAINTEXT;
        let splits: [&[usize]; 6] = [
            &[],
            &[16],
            &[16, 16 + m],
            &[m],
            &[1, 2, 3, m - 1, m + 5, 200_000],
            &[0, 0, 299_999],
        ];
        let records = |w: &[u8], s: &mut Transport| {
            let mut r = MessageReader::default();
            r.push(w);
            let (mut lens, mut out) = (Vec::new(), Vec::new());
            while let Some(msg) = r.next_message() {
                lens.push(msg.len());
                s.open(msg, &mut out).unwrap();
            }
            (lens, out)
        };
        for cuts in splits {
            let mut parts = Vec::new();
            let mut at = 0;
            for &c in cuts {
                parts.push(&data[at..c]);
                at = c;
            }
            parts.push(&data[at..]);
            let (mut c1, mut s1, _, _) = pair();
            let mut a = Vec::new();
            c1.seal_parts(&parts, &mut a).unwrap();
            let (mut c2, mut s2, _, _) = pair();
            let mut b = Vec::new();
            c2.seal(&data, &mut b).unwrap();
            let (la, pa) = records(&a, &mut s1);
            let (lb, pb) = records(&b, &mut s2);
            assert_eq!(pa, data, "{cuts:?}");
            assert_eq!(pb, data, "{cuts:?}");
            assert_eq!(la, lb, "the same records: {cuts:?}");
        }
        // Gathering leaves the transport able to open full records.
        let (mut c, mut s, _, _) = pair();
        let mut w = Vec::new();
        // (The last, short record spans the parts: it is the one gathered.)
        c.seal_parts(&[&data[..299_995], &data[299_995..]], &mut w)
            .unwrap();
        let mut back = Vec::new();
        s.seal(&data, &mut back).unwrap();
        let mut r = MessageReader::default();
        r.push(&back);
        let mut out = Vec::new();
        while let Some(msg) = r.next_message() {
            c.open(msg, &mut out).unwrap();
        }
        assert_eq!(out, data);
    }

    #[test]
    fn records_round_trip_and_split_at_the_limit() {
        let (mut c, mut s, _, _) = pair();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        c.seal(&data, &mut wire).unwrap();
        let mut r = MessageReader::default();
        r.push(&wire);
        let mut out = Vec::new();
        let mut records = 0;
        while let Some(m) = r.next_message() {
            assert!(m.len() <= MAX_NOISE_MESSAGE);
            s.open(m, &mut out).unwrap();
            records += 1;
        }
        assert_eq!(records, 4);
        assert_eq!(out, data);
    }

    #[test]
    fn a_flipped_bit_or_a_replay_fails() {
        let (mut c, mut s, _, _) = pair();
        let mut wire = Vec::new();
        c.seal(b"first", &mut wire).unwrap();
        let mut bad = wire.clone();
        bad[5] ^= 1;
        assert!(s.open(&bad[2..], &mut Vec::new()).is_err());
        // A failed record leaves the counter where it was: the good one still opens.
        let mut out = Vec::new();
        s.open(&wire[2..], &mut out).unwrap();
        assert_eq!(out, b"first");
        // Replayed: the counter moved on.
        assert!(s.open(&wire[2..], &mut Vec::new()).is_err());
    }

    #[test]
    fn public_key_from_private_matches_generated() {
        let k = StaticKey::generate().unwrap();
        let again = StaticKey::from_private(*k.private());
        assert_eq!(again.public(), k.public());
        assert!(fingerprint(k.public()).starts_with("SHA256:"));
        assert_eq!(fingerprint(k.public()).len(), 7 + 64);
    }
}
