//! The cryptography of v3: AES-256-CBC with a zero IV and PKCS#7 padding, streaming
//! in constant memory, and RSA-1024 with OAEP(SHA-256, MGF1-SHA-256) for the session
//! key.
//!
//! CBC decryption is parallel across blocks. Where the CPU has AVX-512 and VAES, it
//! runs through `vaes`, which keeps 32 blocks in flight (about twice the rate of the
//! `aes` crate here); elsewhere, or after [`use_portable_aes`] (the server's
//! `--aes portable`), through `cbc::Decryptor::decrypt_blocks_*`, where the `aes` crate pipelines 8 blocks
//! at a time through AES-NI. Encryption is serial by the nature of CBC.

use aes::cipher::{
    block_padding::NoPadding, inout::InOutBuf, BlockDecryptMut, BlockEncryptMut, KeyInit, KeyIvInit,
};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use rsa::{BigUint, Oaep, RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vaes;

pub use rand::rngs::OsRng;
pub use rsa::rand_core::{CryptoRng, CryptoRngCore, RngCore};

/// AES block size.
pub const BLOCK: usize = 16;
/// AES-256 key length.
pub const AES_KEY_LEN: usize = 32;
/// The v3 IV: sixteen zero bytes.
pub const ZERO_IV: [u8; BLOCK] = [0u8; BLOCK];
/// RSA modulus size of v3 keys.
pub const RSA_BITS: usize = 1024;
/// The small public exponent that keeps the DER public key at 160 bytes.
pub const RSA_EXPONENT: u32 = 17;

/// An AES-256 session key.
pub type AesKey = [u8; AES_KEY_LEN];

type CbcEnc = cbc::Encryptor<aes::Aes256Enc>;
type CbcDec = cbc::Decryptor<aes::Aes256Dec>;

/// Crypto failures.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("length {0} is not a multiple of the 16-byte AES block")]
    NotBlockAligned(usize),
    #[error("bad PKCS#7 padding")]
    BadPadding,
    #[error("public key is not a DER SubjectPublicKeyInfo of an RSA key")]
    BadPublicKey,
    #[error("RSA key of {0} bits refused (v3 needs at least 1024)")]
    WeakKey(usize),
    #[error("private key is not a DER RSA private key (PKCS#8 or PKCS#1)")]
    BadPrivateKey,
    #[error("public key DER is {0} bytes, over the 160-byte field")]
    PublicKeyTooLong(usize),
    #[error("the encrypted session key does not decrypt")]
    KeyDecrypt,
    #[error("the decrypted session key is {0} bytes, not 32")]
    KeyLength(usize),
    #[error("RSA: {0}")]
    Rsa(#[from] rsa::Error),
}

/// Ciphertext length of an `n`-byte plaintext: `16 * (floor(n / 16) + 1)`.
pub const fn ciphertext_len(n: u64) -> u64 {
    BLOCK as u64 * (n / BLOCK as u64 + 1)
}

/// A fresh random AES-256 key.
pub fn random_aes_key<R: CryptoRngCore + ?Sized>(rng: &mut R) -> AesKey {
    let mut k = [0u8; AES_KEY_LEN];
    rng.fill_bytes(&mut k);
    k
}

/// Streaming AES-256-CBC encryption with PKCS#7 padding, in constant memory.
pub struct StreamEncryptor {
    enc: CbcEnc,
    carry: [u8; BLOCK],
    carry_len: usize,
}

impl StreamEncryptor {
    /// An encryptor with the v3 zero IV.
    pub fn new(key: &AesKey) -> Self {
        Self::with_iv(key, &ZERO_IV)
    }

    /// An encryptor with an explicit IV (for tests and future versions).
    pub fn with_iv(key: &AesKey, iv: &[u8; BLOCK]) -> Self {
        Self {
            enc: CbcEnc::new(key.into(), iv.into()),
            carry: [0; BLOCK],
            carry_len: 0,
        }
    }

    /// Encrypts whole blocks in place. `buf.len()` must be a multiple of 16 and no
    /// partial block may be pending from [`update`](Self::update).
    pub fn encrypt_blocks(&mut self, buf: &mut [u8]) -> Result<(), CryptoError> {
        if !buf.len().is_multiple_of(BLOCK) || self.carry_len != 0 {
            return Err(CryptoError::NotBlockAligned(buf.len() + self.carry_len));
        }
        let (blocks, _) = InOutBuf::from(buf).into_chunks();
        self.enc.encrypt_blocks_inout_mut(blocks);
        Ok(())
    }

    /// Encrypts `input`, appending the ciphertext of every whole block to `out`; a
    /// trailing partial block waits for more input or [`finish`](Self::finish).
    pub fn update(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if self.carry_len > 0 {
            let take = (BLOCK - self.carry_len).min(input.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&input[..take]);
            self.carry_len += take;
            input = &input[take..];
            if self.carry_len < BLOCK {
                return;
            }
            self.enc.encrypt_block_mut((&mut self.carry).into());
            out.extend_from_slice(&self.carry);
            self.carry_len = 0;
        }
        let whole = input.len() / BLOCK * BLOCK;
        let start = out.len();
        out.extend_from_slice(&input[..whole]);
        let (blocks, _) = InOutBuf::from(&mut out[start..]).into_chunks();
        self.enc.encrypt_blocks_inout_mut(blocks);
        let rest = &input[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
    }

    /// Pads and encrypts `tail` (under 16 bytes, the end of the plaintext after whole
    /// blocks went through [`encrypt_blocks`](Self::encrypt_blocks)) as the final block.
    pub fn finish_tail(mut self, tail: &[u8]) -> Result<[u8; BLOCK], CryptoError> {
        if tail.len() >= BLOCK || self.carry_len != 0 {
            return Err(CryptoError::NotBlockAligned(tail.len() + self.carry_len));
        }
        self.carry[..tail.len()].copy_from_slice(tail);
        self.carry_len = tail.len();
        Ok(self.finish())
    }

    /// Pads and encrypts the final block (the pending partial block, possibly empty)
    /// and returns it. Always 16 bytes.
    pub fn finish(mut self) -> [u8; BLOCK] {
        let pad = (BLOCK - self.carry_len) as u8;
        self.carry[self.carry_len..].fill(pad);
        self.enc.encrypt_block_mut((&mut self.carry).into());
        self.carry
    }
}

/// Streaming AES-256-CBC decryption over the multi-block path.
///
/// The caller passes whole blocks; the last block of the stream holds the padding,
/// checked with [`unpad`].
pub struct StreamDecryptor {
    dec: Decrypt,
}

// One per connection at most: the size of the portable variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Decrypt {
    Portable(CbcDec),
    #[cfg(target_arch = "x86_64")]
    Vaes {
        keys: std::sync::Arc<vaes::Keys>,
        /// The previous ciphertext block.
        iv: [u8; BLOCK],
    },
}

impl StreamDecryptor {
    /// A decryptor whose previous ciphertext block is `iv` (the zero IV for the first
    /// block of a v3 file, or the last ciphertext block of the previous packet).
    pub fn new(key: &DecryptionKey, iv: &[u8; BLOCK]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = &key.vaes {
            return Self {
                dec: Decrypt::Vaes {
                    keys: keys.clone(),
                    iv: *iv,
                },
            };
        }
        use aes::cipher::InnerIvInit;
        Self {
            dec: Decrypt::Portable(CbcDec::inner_iv_init(key.aes.clone(), iv.into())),
        }
    }

    /// Decrypts whole blocks from `input` into `output` (same length, a multiple of 16).
    pub fn decrypt_b2b(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CryptoError> {
        if !input.len().is_multiple_of(BLOCK) || input.len() != output.len() {
            return Err(CryptoError::NotBlockAligned(input.len()));
        }
        match &mut self.dec {
            Decrypt::Portable(dec) => {
                let buf = InOutBuf::new(input, output)
                    .map_err(|_| CryptoError::NotBlockAligned(input.len()))?;
                dec.decrypt_blocks_inout_mut(buf.into_chunks().0);
            }
            #[cfg(target_arch = "x86_64")]
            Decrypt::Vaes { keys, iv } => keys.decrypt_b2b(iv, input, output),
        }
        Ok(())
    }

    /// Decrypts whole blocks in place.
    pub fn decrypt_in_place(&mut self, buf: &mut [u8]) -> Result<(), CryptoError> {
        if !buf.len().is_multiple_of(BLOCK) {
            return Err(CryptoError::NotBlockAligned(buf.len()));
        }
        match &mut self.dec {
            Decrypt::Portable(dec) => {
                dec.decrypt_blocks_inout_mut(InOutBuf::from(buf).into_chunks().0);
            }
            #[cfg(target_arch = "x86_64")]
            Decrypt::Vaes { keys, iv } => keys.decrypt_in_place(iv, buf),
        }
        Ok(())
    }

    /// Whether this decryptor runs on the VAES kernel.
    pub fn is_vaes(&self) -> bool {
        !matches!(self.dec, Decrypt::Portable(_))
    }
}

/// The key schedules for decryption with one session key: the `aes` crate's, and the
/// VAES kernel's where the CPU has it.
#[derive(Clone)]
pub struct DecryptionKey {
    aes: aes::Aes256Dec,
    /// Shared by the decryptor of every packet, so the schedule is not copied per
    /// packet (each copy would be one more to wipe).
    #[cfg(target_arch = "x86_64")]
    vaes: Option<std::sync::Arc<vaes::Keys>>,
}

impl std::fmt::Debug for DecryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecryptionKey(..)")
    }
}

static PORTABLE_AES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes decryption keys made from now on use the `aes` crate's portable pipeline even
/// where the CPU has VAES: the configuration's way to rule out the kernel (the server's
/// `--aes portable`), and the baseline of the benchmarks.
pub fn use_portable_aes(portable: bool) {
    PORTABLE_AES.store(portable, std::sync::atomic::Ordering::Relaxed);
}

/// Whether decryption may use the VAES kernel: the CPU has it and
/// [`use_portable_aes`] did not turn it off.
pub fn vaes_enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        !PORTABLE_AES.load(std::sync::atomic::Ordering::Relaxed)
            && *CPU.get_or_init(vaes::Keys::supported)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The key schedules for decryption with a session key.
pub fn decryption_key(key: &AesKey) -> DecryptionKey {
    DecryptionKey {
        aes: aes::Aes256Dec::new(key.into()),
        #[cfg(target_arch = "x86_64")]
        vaes: vaes_enabled()
            .then(|| vaes::Keys::new(key))
            .flatten()
            .map(std::sync::Arc::new),
    }
}

/// Checks the PKCS#7 padding of the last plaintext block and returns how many of its
/// bytes are data (0..=15).
pub fn unpad(last: &[u8; BLOCK]) -> Result<usize, CryptoError> {
    let p = last[BLOCK - 1] as usize;
    if p == 0 || p > BLOCK || last[BLOCK - p..].iter().any(|&b| b as usize != p) {
        return Err(CryptoError::BadPadding);
    }
    Ok(BLOCK - p)
}

/// Encrypts a whole buffer (tests, small files).
pub fn encrypt(key: &AesKey, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ciphertext_len(plain.len() as u64) as usize);
    let mut e = StreamEncryptor::new(key);
    e.update(plain, &mut out);
    out.extend_from_slice(&e.finish());
    out
}

/// Decrypts a whole buffer and strips the padding (tests, small files).
pub fn decrypt(key: &AesKey, cipher: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut buf = cipher.to_vec();
    if buf.is_empty() {
        return Err(CryptoError::BadPadding);
    }
    let n = CbcDec::new(key.into(), &ZERO_IV.into())
        .decrypt_padded_mut::<NoPadding>(&mut buf)
        .map_err(|_| CryptoError::NotBlockAligned(cipher.len()))?
        .len();
    let last: [u8; BLOCK] = buf[n - BLOCK..n].try_into().expect("n >= 16");
    let keep = unpad(&last)?;
    buf.truncate(n - BLOCK + keep);
    Ok(buf)
}

// ---------------------------------------------------------------------------
// RSA

/// A client's RSA-1024 key pair.
#[derive(Clone)]
pub struct ClientKeypair {
    private: RsaPrivateKey,
    public_der: Vec<u8>,
}

impl std::fmt::Debug for ClientKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeypair(..)")
    }
}

impl ClientKeypair {
    /// Generates an RSA-1024 key with exponent 17: its DER public key is 160 bytes.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Result<Self, CryptoError> {
        let private = RsaPrivateKey::new_with_exp(rng, RSA_BITS, &BigUint::from(RSA_EXPONENT))?;
        Self::from_private(private)
    }

    fn from_private(private: RsaPrivateKey) -> Result<Self, CryptoError> {
        let public_der = private
            .to_public_key()
            .to_public_key_der()
            .map_err(|_| CryptoError::BadPublicKey)?
            .into_vec();
        if public_der.len() > crate::v3::PUBLIC_KEY_LEN {
            return Err(CryptoError::PublicKeyTooLong(public_der.len()));
        }
        Ok(Self {
            private,
            public_der,
        })
    }

    /// Loads a private key from DER (PKCS#8, or PKCS#1 as a fallback).
    pub fn from_private_der(der: &[u8]) -> Result<Self, CryptoError> {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let private = RsaPrivateKey::from_pkcs8_der(der)
            .or_else(|_| RsaPrivateKey::from_pkcs1_der(der))
            .map_err(|_| CryptoError::BadPrivateKey)?;
        Self::from_private(private)
    }

    /// The private key as PKCS#8 DER (what me.info stores, base64-encoded).
    pub fn private_der(&self) -> Vec<u8> {
        self.private
            .to_pkcs8_der()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default()
    }

    /// The DER SubjectPublicKeyInfo (160 bytes for a key made by [`generate`](Self::generate)).
    pub fn public_der(&self) -> &[u8] {
        &self.public_der
    }

    /// Signs a SHA-256 digest with RSASSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt):
    /// how a v4 connection proves it holds this v3 identity (`docs/PROTOCOL-V4.md`
    /// §5.1).
    pub fn sign_pss<R: CryptoRngCore>(
        &self,
        rng: &mut R,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>, CryptoError> {
        Ok(self
            .private
            .sign_with_rng(rng, rsa::Pss::new::<Sha256>(), digest)?)
    }

    /// Decrypts the session key of an AES_KEY / RECONNECT_OK answer.
    pub fn decrypt_session_key(&self, encrypted: &[u8]) -> Result<AesKey, CryptoError> {
        let k = self
            .private
            .decrypt(Oaep::new::<Sha256>(), encrypted)
            .map_err(|_| CryptoError::KeyDecrypt)?;
        k.as_slice()
            .try_into()
            .map_err(|_| CryptoError::KeyLength(k.len()))
    }
}

/// A client's public key as the server holds it.
#[derive(Clone, Debug)]
pub struct PublicKey(RsaPublicKey);

impl PublicKey {
    /// Parses the 160-byte field: a DER SubjectPublicKeyInfo, possibly shorter and
    /// zero-padded. Keys under 1024 bits are refused.
    pub fn from_field(field: &[u8]) -> Result<Self, CryptoError> {
        let len = der_sequence_len(field).ok_or(CryptoError::BadPublicKey)?;
        if field[len..].iter().any(|&b| b != 0) {
            return Err(CryptoError::BadPublicKey);
        }
        let key = RsaPublicKey::from_public_key_der(&field[..len])
            .map_err(|_| CryptoError::BadPublicKey)?;
        let bits = rsa::traits::PublicKeyParts::n(&key).bits();
        if bits < RSA_BITS {
            return Err(CryptoError::WeakKey(bits));
        }
        Ok(Self(key))
    }

    /// Checks an RSASSA-PSS signature (see [`ClientKeypair::sign_pss`]) of a digest.
    pub fn verify_pss(&self, digest: &[u8; 32], signature: &[u8]) -> bool {
        self.0
            .verify(rsa::Pss::new::<Sha256>(), digest, signature)
            .is_ok()
    }

    /// Encrypts a session key with RSA-OAEP (SHA-256, MGF1-SHA-256).
    pub fn encrypt_session_key<R: CryptoRngCore>(
        &self,
        rng: &mut R,
        key: &AesKey,
    ) -> Result<Vec<u8>, CryptoError> {
        Ok(self.0.encrypt(rng, Oaep::new::<Sha256>(), key)?)
    }
}

/// How a session key reaches the client: parse the client's public key field, make a
/// session key, encrypt it to the public key.
///
/// v3 is [`RsaOaep`], the default of [`ServerSession`](crate::v3::session::ServerSession)
/// and a zero-sized type, so the production path is monomorphised exactly as if it
/// called [`PublicKey`] directly. The trait exists so that fuzz targets (feature
/// `fuzzing`) can swap in a provider whose session key is known and whose "encryption"
/// is trivial, and so reach the file transfer with inputs that carry valid ciphertext.
pub trait KeyExchange {
    /// A client's public key, parsed.
    type PublicKey;
    /// Parses the 160-byte public key field (or a key on file, which may be shorter).
    fn parse_public_key(&self, field: &[u8]) -> Result<Self::PublicKey, CryptoError>;
    /// A fresh session key.
    fn session_key<R: CryptoRngCore + ?Sized>(&self, rng: &mut R) -> AesKey;
    /// The session key encrypted to `public_key`, as AES_KEY / RECONNECT_OK carry it.
    fn encrypt_session_key<R: CryptoRngCore>(
        &self,
        public_key: &Self::PublicKey,
        rng: &mut R,
        key: &AesKey,
    ) -> Result<Vec<u8>, CryptoError>;
}

/// The v3 key exchange: RSA public keys from DER, random AES-256 keys, RSA-OAEP
/// (SHA-256, MGF1-SHA-256).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RsaOaep;

impl KeyExchange for RsaOaep {
    type PublicKey = PublicKey;

    #[inline]
    fn parse_public_key(&self, field: &[u8]) -> Result<PublicKey, CryptoError> {
        PublicKey::from_field(field)
    }

    #[inline]
    fn session_key<R: CryptoRngCore + ?Sized>(&self, rng: &mut R) -> AesKey {
        random_aes_key(rng)
    }

    #[inline]
    fn encrypt_session_key<R: CryptoRngCore>(
        &self,
        public_key: &PublicKey,
        rng: &mut R,
        key: &AesKey,
    ) -> Result<Vec<u8>, CryptoError> {
        public_key.encrypt_session_key(rng, key)
    }
}

/// Length of the DER SEQUENCE at the start of `b` (header included), if it fits in `b`.
fn der_sequence_len(b: &[u8]) -> Option<usize> {
    if *b.first()? != 0x30 {
        return None;
    }
    let (hdr, body) = match *b.get(1)? {
        n if n < 0x80 => (2, n as usize),
        0x81 => (3, *b.get(2)? as usize),
        0x82 => (4, (*b.get(2)? as usize) << 8 | *b.get(3)? as usize),
        _ => return None,
    };
    let total = hdr + body;
    (total <= b.len()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(42)
    }

    #[test]
    fn ciphertext_lengths() {
        assert_eq!(ciphertext_len(0), 16);
        assert_eq!(ciphertext_len(15), 16);
        assert_eq!(ciphertext_len(16), 32);
        assert_eq!(ciphertext_len(17), 32);
        for n in [0usize, 1, 15, 16, 17, 1000] {
            assert_eq!(
                encrypt(&[1; 32], &vec![7; n]).len() as u64,
                ciphertext_len(n as u64)
            );
        }
    }

    #[test]
    fn known_answer_zero_iv() {
        // AES-256-CBC, key 00..1f, IV 0, plaintext "hello" + PKCS#7
        // (openssl enc -aes-256-cbc -K 000102..1f -iv 0 gives the same bytes).
        let key: AesKey = core::array::from_fn(|i| i as u8);
        let c = encrypt(&key, b"hello");
        assert_eq!(c.len(), 16);
        assert_eq!(decrypt(&key, &c).unwrap(), b"hello");
        // The first block of CBC with a zero IV is plain AES-ECB of the padded block.
        use aes::cipher::BlockEncrypt;
        let mut blk = *b"hello\x0b\x0b\x0b\x0b\x0b\x0b\x0b\x0b\x0b\x0b\x0b";
        aes::Aes256::new((&key).into()).encrypt_block((&mut blk).into());
        assert_eq!(&c[..], &blk[..]);
    }

    #[test]
    fn streaming_matches_one_shot_at_any_chunking() {
        let key: AesKey = [9; 32];
        let mut r = rng();
        let mut data = vec![0u8; 10_000];
        r.fill(&mut data[..]);
        let whole = encrypt(&key, &data);
        for chunk in [1usize, 7, 16, 33, 4096] {
            let mut e = StreamEncryptor::new(&key);
            let mut out = Vec::new();
            for c in data.chunks(chunk) {
                e.update(c, &mut out);
            }
            out.extend_from_slice(&e.finish());
            assert_eq!(out, whole, "chunk {chunk}");
        }
        // decrypt in pieces with chained IVs
        let dk = decryption_key(&key);
        let mut d = StreamDecryptor::new(&dk, &ZERO_IV);
        let mut plain = vec![0u8; whole.len()];
        for (i, o) in whole.chunks(160).zip(plain.chunks_mut(160)) {
            d.decrypt_b2b(i, o).unwrap();
        }
        let last: [u8; 16] = plain[plain.len() - 16..].try_into().unwrap();
        let keep = unpad(&last).unwrap();
        plain.truncate(plain.len() - 16 + keep);
        assert_eq!(plain, data);
    }

    #[test]
    fn blocks_then_tail_equals_one_shot() {
        let key: AesKey = [3; 32];
        for n in [0usize, 5, 16, 31, 32, 100] {
            let plain: Vec<u8> = (0..n as u8).collect();
            let whole = n / BLOCK * BLOCK;
            let mut buf = plain[..whole].to_vec();
            let mut e = StreamEncryptor::new(&key);
            e.encrypt_blocks(&mut buf).unwrap();
            buf.extend_from_slice(&e.finish_tail(&plain[whole..]).unwrap());
            assert_eq!(buf, encrypt(&key, &plain), "n {n}");
        }
        assert!(StreamEncryptor::new(&key).finish_tail(&[0; 16]).is_err());
    }

    #[test]
    fn bad_padding_is_detected() {
        let mut b = [3u8; 16];
        assert_eq!(unpad(&b).unwrap(), 13);
        b[15] = 0;
        assert!(unpad(&b).is_err());
        b[15] = 17;
        assert!(unpad(&b).is_err());
        b = [16; 16];
        assert_eq!(unpad(&b).unwrap(), 0);
        b[0] = 15;
        assert!(unpad(&b).is_err());
        // Whole ciphertexts: a last block that decrypts to a bad padding is refused,
        // a good one gives the data before it.
        let key = [5u8; 32];
        let sealed = |last: [u8; 16]| {
            let mut buf = last;
            StreamEncryptor::new(&key).encrypt_blocks(&mut buf).unwrap();
            buf
        };
        assert!(decrypt(&key, &sealed([0; 16])).is_err(), "padding byte 0");
        assert!(decrypt(&key, &sealed([17; 16])).is_err(), "padding byte 17");
        let mut two = [9u8; 16];
        two[14..].copy_from_slice(&[2, 2]);
        assert_eq!(decrypt(&key, &sealed(two)).unwrap(), vec![9u8; 14]);
        assert!(decrypt(&[0; 32], &[]).is_err());
        assert!(decrypt(&[0; 32], &[0; 15]).is_err());
    }

    #[test]
    fn rsa_public_key_is_160_bytes_and_oaep_round_trips() {
        let kp = ClientKeypair::generate(&mut rng()).unwrap();
        assert_eq!(kp.public_der().len(), 160);
        let pk = PublicKey::from_field(kp.public_der()).unwrap();
        let key = random_aes_key(&mut rng());
        let ct = pk.encrypt_session_key(&mut rng(), &key).unwrap();
        assert_eq!(ct.len(), 128);
        assert_eq!(kp.decrypt_session_key(&ct).unwrap(), key);
        // the private key survives a DER round trip
        let again = ClientKeypair::from_private_der(&kp.private_der()).unwrap();
        assert_eq!(again.decrypt_session_key(&ct).unwrap(), key);
    }

    #[test]
    fn public_key_field_rules() {
        assert!(PublicKey::from_field(&[0u8; 160]).is_err());
        assert!(PublicKey::from_field(&[0x30, 0x82, 0xff, 0xff]).is_err());
        let kp = ClientKeypair::generate(&mut rng()).unwrap();
        let mut f = kp.public_der().to_vec();
        f[159] ^= 1;
        let _ = PublicKey::from_field(&f); // must not panic
                                           // a shorter DER zero-padded to 160 is accepted; garbage padding is not
        let small = RsaPrivateKey::new_with_exp(&mut rng(), 1024, &BigUint::from(3u32)).unwrap();
        let der = small
            .to_public_key()
            .to_public_key_der()
            .unwrap()
            .into_vec();
        assert!(der.len() <= 160);
        let mut field = der.clone();
        field.resize(160, 0);
        assert!(PublicKey::from_field(&field).is_ok());
        if der.len() < 160 {
            field[159] = 1;
            assert!(PublicKey::from_field(&field).is_err());
        }
        assert!(ClientKeypair::from_private_der(b"not a key").is_err());
    }

    /// FIPS-197 Appendix C.3: AES-256 of 00112233..ff under key 00..1f. With a zero IV,
    /// the first CBC block is that ECB block.
    const FIPS_KEY: AesKey = [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
        25, 26, 27, 28, 29, 30, 31,
    ];
    const FIPS_PLAIN: [u8; 16] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];
    const FIPS_CIPHER: [u8; 16] = [
        0x8e, 0xa2, 0xb7, 0xca, 0x51, 0x67, 0x45, 0xbf, 0xea, 0xfc, 0x49, 0x90, 0x4b, 0x49, 0x60,
        0x89,
    ];

    #[test]
    fn the_fips_197_example_decrypts() {
        let mut out = [0u8; 16];
        StreamDecryptor::new(&decryption_key(&FIPS_KEY), &ZERO_IV)
            .decrypt_b2b(&FIPS_CIPHER, &mut out)
            .unwrap();
        assert_eq!(out, FIPS_PLAIN);
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = vaes::Keys::new(&FIPS_KEY) {
            let mut iv = ZERO_IV;
            let mut buf = FIPS_CIPHER;
            k.decrypt_in_place(&mut iv, &mut buf);
            assert_eq!(buf, FIPS_PLAIN);
            assert_eq!(iv, FIPS_CIPHER);
        }
    }

    /// The VAES kernel is what decryption uses wherever the CPU has it.
    #[test]
    fn decryption_uses_vaes_where_the_cpu_has_it() {
        let d = StreamDecryptor::new(&decryption_key(&[1; 32]), &ZERO_IV);
        #[cfg(target_arch = "x86_64")]
        let expected = vaes::Keys::supported() && vaes_enabled();
        #[cfg(not(target_arch = "x86_64"))]
        let expected = false;
        assert_eq!(d.is_vaes(), expected);
    }

    /// Decrypts `cipher` with the `cbc` crate: the reference for the kernel.
    fn portable(key: &AesKey, iv: &[u8; BLOCK], cipher: &[u8]) -> Vec<u8> {
        let mut out = cipher.to_vec();
        CbcDec::new(key.into(), iv.into())
            .decrypt_padded_mut::<NoPadding>(&mut out)
            .unwrap();
        out
    }

    #[cfg(target_arch = "x86_64")]
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Any key, IV, length and split into calls (in place or not): the kernel's
        /// plaintext and chaining match the `cbc` crate's.
        #[test]
        fn vaes_matches_the_cbc_crate(
            key in proptest::prelude::any::<AesKey>(),
            iv in proptest::prelude::any::<[u8; BLOCK]>(),
            seed in proptest::prelude::any::<u64>(),
            blocks in 0usize..200,
            cuts in proptest::collection::vec(0usize..200, 0..4),
            in_place in proptest::prelude::any::<bool>(),
        ) {
            let Some(k) = vaes::Keys::new(&key) else { return Ok(()) };
            let mut cipher = vec![0u8; blocks * BLOCK];
            rand::rngs::StdRng::seed_from_u64(seed).fill(&mut cipher[..]);
            let want = portable(&key, &iv, &cipher);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(blocks) * BLOCK).collect();
            cuts.push(0);
            cuts.push(cipher.len());
            cuts.sort();
            let mut chain = iv;
            let mut got = vec![0u8; cipher.len()];
            if in_place {
                got.copy_from_slice(&cipher);
            }
            for w in cuts.windows(2) {
                let (a, b) = (w[0], w[1]);
                if in_place {
                    k.decrypt_in_place(&mut chain, &mut got[a..b]);
                } else {
                    k.decrypt_b2b(&mut chain, &cipher[a..b], &mut got[a..b]);
                }
            }
            proptest::prop_assert_eq!(&got, &want);
            let last = if blocks == 0 { iv } else { cipher[cipher.len() - BLOCK..].try_into().unwrap() };
            proptest::prop_assert_eq!(chain, last);
        }
    }

    /// The kernel writes exactly the blocks it is given: guard bytes after the output
    /// (and after an in-place buffer) stay as they were, for every tail length.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vaes_writes_nothing_past_the_output() {
        let key: AesKey = [5; 32];
        let Some(k) = vaes::Keys::new(&key) else {
            return;
        };
        const GUARD: usize = 64;
        for blocks in 0..=40usize {
            let mut cipher = vec![0u8; blocks * BLOCK];
            rng().fill(&mut cipher[..]);
            let want = portable(&key, &ZERO_IV, &cipher);
            let mut out = vec![0xA5u8; blocks * BLOCK + GUARD];
            let mut iv = ZERO_IV;
            k.decrypt_b2b(&mut iv, &cipher, &mut out[..blocks * BLOCK]);
            assert_eq!(&out[..blocks * BLOCK], &want[..], "{blocks} blocks");
            assert!(
                out[blocks * BLOCK..].iter().all(|&b| b == 0xA5),
                "{blocks} blocks: wrote past the output"
            );
            let mut buf = cipher.clone();
            buf.extend_from_slice(&[0x5Au8; GUARD]);
            let mut iv = ZERO_IV;
            k.decrypt_in_place(&mut iv, &mut buf[..blocks * BLOCK]);
            assert_eq!(
                &buf[..blocks * BLOCK],
                &want[..],
                "{blocks} blocks in place"
            );
            assert!(
                buf[blocks * BLOCK..].iter().all(|&b| b == 0x5A),
                "{blocks} blocks: wrote past the buffer"
            );
        }
    }
}
