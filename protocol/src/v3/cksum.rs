//! POSIX `cksum`: CRC-32 (polynomial 0x04C11DB7, MSB first, initial value 0) over the
//! data, then over the length (least significant byte first, only while the remaining
//! length is non-zero), complemented.
//!
//! The data part is CRC-32/CKSUM, computed by `crc-fast` with carry-less multiply
//! folding (PCLMULQDQ / VPCLMULQDQ on x86_64, PMULL on aarch64, a table fallback
//! elsewhere). The length suffix is at most 8 bytes, fed through the same digest.

use crc_fast::{CrcAlgorithm, Digest};

/// A streaming POSIX cksum.
#[derive(Clone)]
pub struct Cksum {
    digest: Digest,
    len: u64,
}

impl std::fmt::Debug for Cksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cksum").field("len", &self.len).finish()
    }
}

impl Default for Cksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Cksum {
    /// A checksum over no bytes yet.
    pub fn new() -> Self {
        Self {
            digest: Digest::new(CrcAlgorithm::Crc32Cksum),
            len: 0,
        }
    }

    /// Adds `data` to the checksum.
    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        self.digest.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes checksummed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no byte has been added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `cksum` value of everything added.
    pub fn finalize(&self) -> u32 {
        let mut d = self.digest;
        let mut n = self.len;
        let mut suffix = [0u8; 8];
        let mut k = 0;
        while n != 0 {
            suffix[k] = n as u8;
            n >>= 8;
            k += 1;
        }
        d.update(&suffix[..k]);
        // CRC-32/CKSUM complements its output; finalize() returns that (as u64).
        d.finalize() as u32
    }
}

/// The POSIX `cksum` of a buffer.
pub fn cksum(data: &[u8]) -> u32 {
    let mut c = Cksum::new();
    c.update(data);
    c.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-at-a-time reference straight from the POSIX description.
    fn reference(data: &[u8]) -> u32 {
        fn step(crc: u32, b: u8) -> u32 {
            let mut c = crc ^ ((b as u32) << 24);
            for _ in 0..8 {
                c = if c & 0x8000_0000 != 0 {
                    (c << 1) ^ 0x04C1_1DB7
                } else {
                    c << 1
                };
            }
            c
        }
        let mut crc = data.iter().fold(0u32, |c, &b| step(c, b));
        let mut n = data.len() as u64;
        while n != 0 {
            crc = step(crc, n as u8);
            n >>= 8;
        }
        !crc
    }

    #[test]
    fn posix_vectors() {
        assert_eq!(cksum(b"123456789"), 930766865);
        assert_eq!(cksum(b""), 4294967295);
    }

    #[test]
    fn streaming_equals_one_shot_and_reference() {
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| i.wrapping_mul(2654435761) as u8)
            .collect();
        for split in [0, 1, 15, 16, 17, 4096, 65_537, 99_999] {
            let mut c = Cksum::new();
            c.update(&data[..split]);
            c.update(&data[split..]);
            assert_eq!(c.finalize(), reference(&data));
        }
        for n in [1, 2, 255, 256, 257, 65_536, 70_000] {
            assert_eq!(cksum(&data[..n]), reference(&data[..n]), "len {n}");
        }
    }

    #[test]
    fn matches_system_cksum_on_random_buffers() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for len in [0usize, 1, 3, 1000, 65_536, 300_001] {
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            let mut child = match std::process::Command::new("cksum")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
            {
                Ok(c) => c,
                Err(e) => panic!("the system `cksum` is needed for this test: {e}"),
            };
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().unwrap();
                stdin.write_all(&data).unwrap();
            }
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            let mut fields = text.split_whitespace();
            let sum: u32 = fields.next().unwrap().parse().unwrap();
            let size: usize = fields.next().unwrap().parse().unwrap();
            assert_eq!(size, len);
            assert_eq!(cksum(&data), sum, "len {len}");
        }
    }
}
