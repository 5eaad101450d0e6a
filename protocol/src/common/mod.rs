//! What every protocol version shares: the client identifier and the hex helpers that
//! name clients on disk and in logs.
//!
//! Nothing here is tied to one wire format; a version's codecs, limits and session live
//! in its own module ([`v3`](crate::v3)).

pub mod hex;

/// A client identifier: 16 opaque bytes (a UUIDv4 when this server makes one).
pub type ClientId = [u8; 16];

/// Lowercase hex of a client id, as used for directory names and me.info.
pub fn client_id_hex(id: &ClientId) -> String {
    hex::encode(id)
}

/// Parses 32 hex characters (either case) into a client id.
pub fn parse_client_id_hex(s: &str) -> Option<ClientId> {
    hex::decode_array(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_hex_round_trip() {
        let id: ClientId = core::array::from_fn(|i| (i * 17) as u8);
        let hex = client_id_hex(&id);
        assert_eq!(hex, "00112233445566778899aabbccddeeff");
        assert_eq!(parse_client_id_hex(&hex), Some(id));
        assert_eq!(parse_client_id_hex(&hex.to_uppercase()), Some(id));
        assert_eq!(parse_client_id_hex("00"), None);
        assert_eq!(parse_client_id_hex(&"g".repeat(32)), None);
    }
}
