//! The proof that a v4 connection holds a v3 client's RSA private key, so that it may
//! read that client's v3 uploads (`docs/PROTOCOL-V4.md` §5.1).
//!
//! The client signs a digest of a fixed label, the connection's Noise handshake hash
//! and the v3 client id; the server checks it with the public key the v3 client
//! registered. The handshake hash ties the proof to one connection, so a proof seen
//! by anyone cannot be used on another.

use sha2::{Digest, Sha256};

use crate::common::ClientId;
use crate::v3::crypto::{ClientKeypair, CryptoError, PublicKey};

/// The label that opens the signed message (with its terminating zero byte).
pub const LABEL: &[u8] = b"CyberBackup v4 legacy login\0";

/// The digest a LEGACY_LOGIN signature covers.
pub fn proof_digest(handshake_hash: &[u8; 32], client_id: &ClientId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LABEL);
    h.update(handshake_hash);
    h.update(client_id);
    h.finalize().into()
}

/// The client's side: signs the proof for this connection.
pub fn sign(
    keypair: &ClientKeypair,
    handshake_hash: &[u8; 32],
    client_id: &ClientId,
) -> Result<Vec<u8>, CryptoError> {
    keypair.sign_pss(
        &mut rand::rngs::OsRng,
        &proof_digest(handshake_hash, client_id),
    )
}

/// The server's side: checks a proof against the public key field the v3 client
/// registered (160 bytes, DER, zero-padded). A field that does not parse fails.
pub fn verify(
    public_key_field: &[u8],
    handshake_hash: &[u8; 32],
    client_id: &ClientId,
    signature: &[u8],
) -> bool {
    PublicKey::from_field(public_key_field)
        .is_ok_and(|k| k.verify_pss(&proof_digest(handshake_hash, client_id), signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_connection_id_and_key() {
        let mut rng = rand::rngs::OsRng;
        let kp = ClientKeypair::generate(&mut rng).unwrap();
        let other = ClientKeypair::generate(&mut rng).unwrap();
        let (hh, id) = ([7u8; 32], [1u8; 16]);
        let sig = sign(&kp, &hh, &id).unwrap();
        assert!(verify(kp.public_der(), &hh, &id, &sig));
        // Another connection, another client id, another key, a damaged signature.
        assert!(!verify(kp.public_der(), &[8u8; 32], &id, &sig));
        assert!(!verify(kp.public_der(), &hh, &[2u8; 16], &sig));
        assert!(!verify(other.public_der(), &hh, &id, &sig));
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert!(!verify(kp.public_der(), &hh, &id, &bad));
        assert!(!verify(&[0u8; 160], &hh, &id, &sig));
        assert!(!verify(kp.public_der(), &hh, &id, &[]));
    }
}
