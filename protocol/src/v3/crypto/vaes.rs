//! AES-256-CBC decryption with VAES on AVX-512: sixteen blocks per instruction group.
//!
//! The `aes` crate's own VAES backend (0.9) moves its blocks through memory between
//! calls when it is chosen at run time, and ends up slower than its AES-NI path; the
//! AES-NI path (0.8) decrypts 8 blocks at a time. This kernel keeps 32 blocks in
//! registers, with the round keys broadcast to all four lanes of a 512-bit register.
//! It is used only where the CPU has AVX-512F and VAES ([`Keys::new`] returns `None`
//! elsewhere) and is tested against the `aes` + `cbc` crates, block for block, and
//! against the FIPS-197 AES-256 example.
//!
//! Measured on the 2-vCPU AMD EPYC (Zen 4) VM of `benches/results/v3.md`, 64
//! buffers of 1 MiB decrypted in turn (so out of cache, as in the server): 12.5-14.9
//! GiB/s, against 7.3-7.5 GiB/s for `aes` 0.8 + `cbc` 0.1 and 3.5-4.7 GiB/s for `aes`
//! 0.9.4 + `cbc` 0.2 in the same runs.

use core::arch::x86_64::*;

use zeroize::Zeroize;

const ROUNDS: usize = 15;

/// AES-256 decryption round keys (the equivalent inverse cipher's), in the order the
/// rounds use them. They hold the session key in the clear (the last one is its first
/// half), so they are wiped when dropped, as the `aes` crate's schedules are.
pub struct Keys([[u8; 16]; ROUNDS]);

impl Drop for Keys {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Keys {
    /// Whether this CPU has what the kernel uses: AES-NI (for the key schedule),
    /// AVX-512F and VAES.
    pub fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("vaes")
            && is_x86_feature_detected!("aes")
    }

    /// The schedule of `key`, or `None` when this CPU lacks what the kernel uses.
    pub fn new(key: &[u8; 32]) -> Option<Keys> {
        if !Self::supported() {
            return None;
        }
        // SAFETY: AES-NI was detected just above.
        Some(unsafe { expand(key) })
    }

    /// Decrypts the whole blocks of `input` into `output`, which must be as long (the
    /// caller checks); `iv` is the previous ciphertext block and becomes the last one of
    /// `input`.
    pub fn decrypt_b2b(&self, iv: &mut [u8; 16], input: &[u8], output: &mut [u8]) {
        let blocks = input.len().min(output.len()) / 16;
        // SAFETY: `Keys` exists only where `new` detected AVX-512F and VAES; both
        // slices hold `blocks` whole blocks, and `&`/`&mut` borrows cannot overlap.
        unsafe { cbc_decrypt(&self.0, iv, input.as_ptr(), output.as_mut_ptr(), blocks) }
    }

    /// Decrypts the whole blocks of `buf` in place (as [`decrypt_b2b`](Self::decrypt_b2b)).
    pub fn decrypt_in_place(&self, iv: &mut [u8; 16], buf: &mut [u8]) {
        let blocks = buf.len() / 16;
        let p = buf.as_mut_ptr();
        // SAFETY: as in `decrypt_b2b`, with source and destination the same range,
        // which `cbc_decrypt` allows (it loads each group before storing it).
        unsafe { cbc_decrypt(&self.0, iv, p, p, blocks) }
    }
}

/// `w ^ w<<32 ^ w<<64 ^ w<<96`: each 32-bit word of the previous round key XORed with
/// all the words before it, the running XOR of the key schedule (FIPS-197 §5.2).
#[target_feature(enable = "aes")]
fn prefix_xor(mut w: __m128i) -> __m128i {
    let mut t = _mm_slli_si128::<4>(w);
    w = _mm_xor_si128(w, t);
    t = _mm_slli_si128::<4>(t);
    w = _mm_xor_si128(w, t);
    t = _mm_slli_si128::<4>(t);
    _mm_xor_si128(w, t)
}

/// The next even round key from the one two rounds back (`t1`) and
/// `aeskeygenassist` of the last one (RotWord, SubWord and Rcon in its top word).
#[target_feature(enable = "aes")]
fn assist1(t1: __m128i, t2: __m128i) -> __m128i {
    _mm_xor_si128(prefix_xor(t1), _mm_shuffle_epi32::<0xff>(t2))
}

/// The next odd round key from the one two rounds back (`t3`) and the even key just
/// made (`t1`): SubWord without rotation or Rcon, as AES-256 has it.
#[target_feature(enable = "aes")]
fn assist2(t1: __m128i, t3: __m128i) -> __m128i {
    let sub = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(t1));
    _mm_xor_si128(prefix_xor(t3), sub)
}

/// The AES-256 key expansion (FIPS-197 §5.2, as in Intel's AES-NI white paper), turned
/// into decryption keys with InvMixColumns (§5.3.5).
#[target_feature(enable = "aes")]
fn expand(key: &[u8; 32]) -> Keys {
    let mut ek = [_mm_setzero_si128(); ROUNDS];
    // SAFETY: both loads read 16 bytes inside the 32-byte key.
    let (mut t1, mut t3) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    ek[0] = t1;
    ek[1] = t3;
    macro_rules! step {
        ($i:expr, $rcon:expr) => {
            t1 = assist1(t1, _mm_aeskeygenassist_si128::<$rcon>(t3));
            ek[$i] = t1;
            t3 = assist2(t1, t3);
            ek[$i + 1] = t3;
        };
    }
    step!(2, 0x01);
    step!(4, 0x02);
    step!(6, 0x04);
    step!(8, 0x08);
    step!(10, 0x10);
    step!(12, 0x20);
    ek[14] = assist1(t1, _mm_aeskeygenassist_si128::<0x40>(t3));
    let mut dk = [[0u8; 16]; ROUNDS];
    for (i, d) in dk.iter_mut().enumerate() {
        let k = match i {
            0 => ek[ROUNDS - 1],
            i if i == ROUNDS - 1 => ek[0],
            i => _mm_aesimc_si128(ek[ROUNDS - 1 - i]),
        };
        // SAFETY: writes 16 bytes into a 16-byte array.
        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), k) };
    }
    ek.zeroize();
    t1.zeroize();
    t3.zeroize();
    let keys = Keys(dk);
    dk.zeroize();
    keys
}

/// Registers of four blocks decrypted per loop round.
const WIDE: usize = 8;

/// CBC-decrypts `blocks` blocks from `src` to `dst`, chaining from `iv` and leaving
/// the last ciphertext block in it.
///
/// # Safety
/// The CPU has AVX-512F and VAES; `src` is readable and `dst` writable for
/// `16 * blocks` bytes; the two ranges are the same or do not overlap.
#[target_feature(enable = "avx512f,vaes")]
unsafe fn cbc_decrypt(
    dk: &[[u8; 16]; ROUNDS],
    iv: &mut [u8; 16],
    mut src: *const u8,
    mut dst: *mut u8,
    mut blocks: usize,
) {
    let mut k = [_mm512_setzero_si512(); ROUNDS];
    for (k, d) in k.iter_mut().zip(dk) {
        // SAFETY: reads the 16-byte round key.
        *k = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(d.as_ptr().cast()) });
    }
    // The ciphertext block before the next one, in the top lane.
    // SAFETY: reads the 16-byte IV.
    let mut last = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(iv.as_ptr().cast()) });
    while blocks >= 4 * WIDE {
        let mut c = [_mm512_setzero_si512(); WIDE];
        for (j, c) in c.iter_mut().enumerate() {
            // SAFETY: inside the caller's source range (4 * WIDE blocks remain).
            *c = unsafe { _mm512_loadu_si512(src.add(64 * j).cast()) };
        }
        let mut x = c.map(|c| _mm512_xor_si512(c, k[0]));
        for k in &k[1..ROUNDS - 1] {
            for x in &mut x {
                *x = _mm512_aesdec_epi128(*x, *k);
            }
        }
        for j in 0..WIDE {
            // The previous ciphertext block of each lane: `last`'s top lane, then `c`'s.
            let prev = _mm512_alignr_epi64::<6>(c[j], last);
            x[j] = _mm512_aesdeclast_epi128(x[j], _mm512_xor_si512(k[ROUNDS - 1], prev));
            last = c[j];
        }
        for (j, x) in x.iter().enumerate() {
            // SAFETY: inside the caller's destination range; all of this round's
            // source was loaded above, so an in-place call reads no plaintext.
            unsafe { _mm512_storeu_si512(dst.add(64 * j).cast(), *x) };
        }
        // SAFETY: stays within (or one past the end of) the caller's ranges.
        unsafe {
            src = src.add(64 * WIDE);
            dst = dst.add(64 * WIDE);
        }
        blocks -= 4 * WIDE;
    }
    while blocks > 0 {
        let n = blocks.min(4);
        let mask = ((1u32 << (2 * n)) - 1) as __mmask8;
        // SAFETY: the mask loads only the `n` blocks left in the source range.
        let c = unsafe { _mm512_maskz_loadu_epi64(mask, src.cast()) };
        let mut x = _mm512_xor_si512(c, k[0]);
        for k in &k[1..ROUNDS - 1] {
            x = _mm512_aesdec_epi128(x, *k);
        }
        let prev = _mm512_alignr_epi64::<6>(c, last);
        x = _mm512_aesdeclast_epi128(x, _mm512_xor_si512(k[ROUNDS - 1], prev));
        // Block n-1 of `c` into the top lane: rotating by 2n qwords moves lane n-1
        // to lane 3.
        last = match n {
            1 => _mm512_alignr_epi64::<2>(c, c),
            2 => _mm512_alignr_epi64::<4>(c, c),
            3 => _mm512_alignr_epi64::<6>(c, c),
            _ => c,
        };
        // SAFETY: the mask stores only the `n` blocks left in the destination range.
        unsafe { _mm512_mask_storeu_epi64(dst.cast(), mask, x) };
        // SAFETY: stays within (or one past the end of) the caller's ranges.
        unsafe {
            src = src.add(16 * n);
            dst = dst.add(16 * n);
        }
        blocks -= n;
    }
    // SAFETY: writes the 16-byte IV.
    unsafe { _mm_storeu_si128(iv.as_mut_ptr().cast(), _mm512_extracti32x4_epi32::<3>(last)) };
}
