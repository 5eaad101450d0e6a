//! Every v3 request and response payload, encoded and decoded.
//!
//! Decoders take exactly the payload bytes (the header says how many; the session
//! bounds that before reading them) and never allocate more than what they return.
//! Encoders write whole frames (header and payload) into a caller's buffer, so a
//! runtime can reuse one buffer for every response.

use crate::common::ClientId;
use crate::v3::header::{
    RequestCode, RequestHeader, ResponseCode, ResponseHeader, RESPONSE_HEADER_LEN,
};
use crate::v3::name::{self, NameError, NAME_FIELD_LEN};
use crate::v3::{PUBLIC_KEY_LEN, VERSION};

/// Payload size of REGISTER, RECONNECT and the three CRC requests.
pub const NAME_PAYLOAD_LEN: usize = NAME_FIELD_LEN;
/// Payload size of SEND_PUBLIC_KEY.
pub const SEND_PUBLIC_KEY_LEN: usize = NAME_FIELD_LEN + PUBLIC_KEY_LEN;
/// Fixed part of SEND_FILE before the content.
pub const SEND_FILE_FIXED_LEN: usize = 4 + 4 + 2 + 2 + NAME_FIELD_LEN;
/// Payload size of FILE_RECEIVED (1603).
pub const FILE_RECEIVED_LEN: usize = 16 + 4 + NAME_FIELD_LEN + 4;
/// Encrypted AES key length for RSA-1024.
pub const ENCRYPTED_KEY_LEN: usize = 128;
/// Largest encrypted key a client accepts (RSA up to 4096 bits).
pub const MAX_ENCRYPTED_KEY_LEN: usize = 512;

/// A payload that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is {actual} bytes, expected {expected}")]
    Size { expected: usize, actual: usize },
    #[error("bad name field: {0}")]
    Name(#[from] NameError),
    #[error("unexpected response code {0}")]
    UnexpectedCode(u16),
}

fn exact(payload: &[u8], expected: usize) -> Result<(), DecodeError> {
    if payload.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::Size {
            expected,
            actual: payload.len(),
        })
    }
}

/// The fixed part of a SEND_FILE payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendFileHead<'a> {
    pub content_size: u32,
    pub orig_file_size: u32,
    pub packet_number: u16,
    pub total_packets: u16,
    /// The name bytes before the NUL (not yet checked as a file name).
    pub file_name: &'a [u8],
}

impl<'a> SendFileHead<'a> {
    /// Decodes the 267-byte fixed part.
    pub fn decode(b: &'a [u8]) -> Result<Self, DecodeError> {
        exact(b, SEND_FILE_FIXED_LEN)?;
        Ok(Self {
            content_size: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            orig_file_size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            packet_number: u16::from_le_bytes([b[8], b[9]]),
            total_packets: u16::from_le_bytes([b[10], b[11]]),
            file_name: name::decode_field(&b[12..])?,
        })
    }
}

/// Decodes a payload that is one name field (REGISTER, RECONNECT, CRC_*).
pub fn decode_name_payload(payload: &[u8]) -> Result<&[u8], DecodeError> {
    exact(payload, NAME_PAYLOAD_LEN)?;
    Ok(name::decode_field(payload)?)
}

/// Decodes SEND_PUBLIC_KEY: the name bytes and the 160-byte key field.
pub fn decode_send_public_key(
    payload: &[u8],
) -> Result<(&[u8], &[u8; PUBLIC_KEY_LEN]), DecodeError> {
    exact(payload, SEND_PUBLIC_KEY_LEN)?;
    let name = name::decode_field(&payload[..NAME_FIELD_LEN])?;
    let key = payload[NAME_FIELD_LEN..]
        .try_into()
        .map_err(|_| DecodeError::Size {
            expected: SEND_PUBLIC_KEY_LEN,
            actual: payload.len(),
        })?;
    Ok((name, key))
}

// ---------------------------------------------------------------------------
// Encoding requests (client side)

fn put_request_header(out: &mut Vec<u8>, id: &ClientId, code: RequestCode, payload_size: usize) {
    let h = RequestHeader {
        client_id: *id,
        version: VERSION,
        code,
        payload_size: payload_size as u32,
    };
    out.extend_from_slice(&h.to_bytes());
}

fn put_name(out: &mut Vec<u8>, s: &str) -> Result<(), NameError> {
    let mut f = [0u8; NAME_FIELD_LEN];
    name::encode_field(s, &mut f)?;
    out.extend_from_slice(&f);
    Ok(())
}

/// Appends a request whose payload is one name field (REGISTER, RECONNECT, CRC_*).
pub fn encode_name_request(
    out: &mut Vec<u8>,
    id: &ClientId,
    code: RequestCode,
    name: &str,
) -> Result<(), NameError> {
    put_request_header(out, id, code, NAME_PAYLOAD_LEN);
    put_name(out, name)
}

/// Appends SEND_PUBLIC_KEY. `public_key` may be shorter than 160 bytes; it is
/// zero-padded.
pub fn encode_send_public_key(
    out: &mut Vec<u8>,
    id: &ClientId,
    name: &str,
    public_key: &[u8],
) -> Result<(), NameError> {
    if public_key.len() > PUBLIC_KEY_LEN {
        return Err(NameError::FieldSize);
    }
    put_request_header(out, id, RequestCode::SendPublicKey, SEND_PUBLIC_KEY_LEN);
    put_name(out, name)?;
    out.extend_from_slice(public_key);
    out.resize(out.len() + PUBLIC_KEY_LEN - public_key.len(), 0);
    Ok(())
}

/// Appends the header and fixed part of a SEND_FILE packet; the caller appends (or
/// writes separately) `content_size` bytes of ciphertext.
pub fn encode_send_file_head(
    out: &mut Vec<u8>,
    id: &ClientId,
    head: &SendFileHead<'_>,
) -> Result<(), NameError> {
    let name = std::str::from_utf8(head.file_name).map_err(|_| NameError::NotUtf8)?;
    put_request_header(
        out,
        id,
        RequestCode::SendFile,
        SEND_FILE_FIXED_LEN + head.content_size as usize,
    );
    out.extend_from_slice(&head.content_size.to_le_bytes());
    out.extend_from_slice(&head.orig_file_size.to_le_bytes());
    out.extend_from_slice(&head.packet_number.to_le_bytes());
    out.extend_from_slice(&head.total_packets.to_le_bytes());
    put_name(out, name)
}

/// Appends a whole SEND_FILE packet (header, fixed part and `content`).
pub fn encode_send_file(
    out: &mut Vec<u8>,
    id: &ClientId,
    file_name: &str,
    orig_file_size: u32,
    packet_number: u16,
    total_packets: u16,
    content: &[u8],
) -> Result<(), NameError> {
    encode_send_file_head(
        out,
        id,
        &SendFileHead {
            content_size: content.len() as u32,
            orig_file_size,
            packet_number,
            total_packets,
            file_name: file_name.as_bytes(),
        },
    )?;
    out.extend_from_slice(content);
    Ok(())
}

// ---------------------------------------------------------------------------
// Responses

/// A decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    RegisterOk {
        client_id: ClientId,
    },
    RegisterFailed,
    AesKey {
        client_id: ClientId,
        encrypted_key: Vec<u8>,
    },
    FileReceived(FileReceived),
    Ack {
        client_id: ClientId,
    },
    ReconnectOk {
        client_id: ClientId,
        encrypted_key: Vec<u8>,
    },
    ReconnectRejected {
        client_id: ClientId,
    },
    Error,
}

/// The payload of 1603.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReceived {
    pub client_id: ClientId,
    /// Total ciphertext size of the reassembled file.
    pub content_size: u32,
    pub file_name: String,
    pub cksum: u32,
}

impl Response {
    /// The code this response is sent with.
    pub fn code(&self) -> ResponseCode {
        match self {
            Response::RegisterOk { .. } => ResponseCode::RegisterOk,
            Response::RegisterFailed => ResponseCode::RegisterFailed,
            Response::AesKey { .. } => ResponseCode::AesKey,
            Response::FileReceived(_) => ResponseCode::FileReceived,
            Response::Ack { .. } => ResponseCode::Ack,
            Response::ReconnectOk { .. } => ResponseCode::ReconnectOk,
            Response::ReconnectRejected { .. } => ResponseCode::ReconnectRejected,
            Response::Error => ResponseCode::Error,
        }
    }

    /// Largest payload any v3 response may carry; a client bounds reads with it.
    pub const MAX_PAYLOAD: u32 = (16 + MAX_ENCRYPTED_KEY_LEN) as u32;

    /// Decodes a response payload for the given header code.
    pub fn decode(code: ResponseCode, p: &[u8]) -> Result<Self, DecodeError> {
        fn id(p: &[u8]) -> ClientId {
            let mut id = [0u8; 16];
            id.copy_from_slice(&p[..16]);
            id
        }
        fn keyed(p: &[u8]) -> Result<(ClientId, Vec<u8>), DecodeError> {
            if p.len() <= 16 || p.len() > 16 + MAX_ENCRYPTED_KEY_LEN {
                return Err(DecodeError::Size {
                    expected: 16 + ENCRYPTED_KEY_LEN,
                    actual: p.len(),
                });
            }
            Ok((id(p), p[16..].to_vec()))
        }
        Ok(match code {
            ResponseCode::RegisterOk => {
                exact(p, 16)?;
                Response::RegisterOk { client_id: id(p) }
            }
            ResponseCode::RegisterFailed => {
                exact(p, 0)?;
                Response::RegisterFailed
            }
            ResponseCode::AesKey => {
                let (client_id, encrypted_key) = keyed(p)?;
                Response::AesKey {
                    client_id,
                    encrypted_key,
                }
            }
            ResponseCode::ReconnectOk => {
                let (client_id, encrypted_key) = keyed(p)?;
                Response::ReconnectOk {
                    client_id,
                    encrypted_key,
                }
            }
            ResponseCode::FileReceived => {
                exact(p, FILE_RECEIVED_LEN)?;
                let name = name::decode_field(&p[20..20 + NAME_FIELD_LEN])?;
                Response::FileReceived(FileReceived {
                    client_id: id(p),
                    content_size: u32::from_le_bytes([p[16], p[17], p[18], p[19]]),
                    file_name: String::from_utf8_lossy(name).into_owned(),
                    cksum: u32::from_le_bytes([p[275], p[276], p[277], p[278]]),
                })
            }
            ResponseCode::Ack => {
                exact(p, 16)?;
                Response::Ack { client_id: id(p) }
            }
            ResponseCode::ReconnectRejected => {
                exact(p, 16)?;
                Response::ReconnectRejected { client_id: id(p) }
            }
            ResponseCode::Error => Response::Error,
            ResponseCode::Unknown(c) => return Err(DecodeError::UnexpectedCode(c)),
        })
    }

    /// Appends the whole response frame (header and payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; RESPONSE_HEADER_LEN]);
        match self {
            Response::RegisterOk { client_id }
            | Response::Ack { client_id }
            | Response::ReconnectRejected { client_id } => out.extend_from_slice(client_id),
            Response::AesKey {
                client_id,
                encrypted_key,
            }
            | Response::ReconnectOk {
                client_id,
                encrypted_key,
            } => {
                out.extend_from_slice(client_id);
                out.extend_from_slice(encrypted_key);
            }
            Response::FileReceived(f) => {
                out.extend_from_slice(&f.client_id);
                out.extend_from_slice(&f.content_size.to_le_bytes());
                let mut field = [0u8; NAME_FIELD_LEN];
                // A name that does not fit is cut; the server only echoes checked names.
                let n = f.file_name.len().min(NAME_FIELD_LEN - 1);
                field[..n].copy_from_slice(&f.file_name.as_bytes()[..n]);
                out.extend_from_slice(&field);
                out.extend_from_slice(&f.cksum.to_le_bytes());
            }
            Response::RegisterFailed | Response::Error => {}
        }
        let payload_size = (out.len() - start - RESPONSE_HEADER_LEN) as u32;
        let h = ResponseHeader {
            version: VERSION,
            code: self.code(),
            payload_size,
        };
        out[start..start + RESPONSE_HEADER_LEN].copy_from_slice(&h.to_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(r: Response) {
        let mut buf = Vec::new();
        r.encode(&mut buf);
        let h = ResponseHeader::parse(&buf).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.payload_size as usize, buf.len() - 7);
        assert_eq!(Response::decode(h.code, &buf[7..]).unwrap(), r);
    }

    #[test]
    fn file_received_layout() {
        let r = Response::FileReceived(FileReceived {
            client_id: [9; 16],
            content_size: 1024,
            file_name: "a.txt".into(),
            cksum: 0xDEADBEEF,
        });
        let mut buf = Vec::new();
        r.encode(&mut buf);
        assert_eq!(buf.len(), 7 + 279);
        assert_eq!(&buf[..7], &[3, 0x43, 0x06, 0x17, 0x01, 0, 0]);
        // cksum at payload offset 275
        assert_eq!(&buf[7 + 275..], &0xDEADBEEFu32.to_le_bytes());
        roundtrip(r);
    }

    #[test]
    fn send_file_head_round_trip() {
        let head = SendFileHead {
            content_size: 32,
            orig_file_size: 17,
            packet_number: 1,
            total_packets: 1,
            file_name: b"x.bin",
        };
        let mut buf = Vec::new();
        encode_send_file_head(&mut buf, &[1; 16], &head).unwrap();
        assert_eq!(buf.len(), 23 + 267);
        let h = RequestHeader::parse(&buf).unwrap();
        assert_eq!(h.code, RequestCode::SendFile);
        assert_eq!(h.payload_size, 267 + 32);
        assert_eq!(SendFileHead::decode(&buf[23..]).unwrap(), head);
    }

    #[test]
    fn public_key_padding() {
        let mut buf = Vec::new();
        encode_send_public_key(&mut buf, &[2; 16], "bob", &[7; 158]).unwrap();
        assert_eq!(buf.len(), 23 + 415);
        let (name, key) = decode_send_public_key(&buf[23..]).unwrap();
        assert_eq!(name, b"bob");
        assert_eq!(&key[..158], &[7; 158]);
        assert_eq!(&key[158..], &[0, 0]);
        assert!(encode_send_public_key(&mut buf, &[2; 16], "bob", &[7; 161]).is_err());
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(decode_name_payload(&[0; 254]).is_err());
        assert!(decode_send_public_key(&[0; 414]).is_err());
        assert!(SendFileHead::decode(&[0; 266]).is_err());
        assert!(Response::decode(ResponseCode::RegisterOk, &[0; 15]).is_err());
        assert!(Response::decode(ResponseCode::AesKey, &[0; 16]).is_err());
        assert!(Response::decode(ResponseCode::AesKey, &[0; 16 + 513]).is_err());
        assert!(Response::decode(ResponseCode::Unknown(5), &[]).is_err());
    }

    proptest! {
        #[test]
        fn responses_round_trip(id in any::<[u8; 16]>(), key in proptest::collection::vec(any::<u8>(), 1..=512),
                                size in any::<u32>(), ck in any::<u32>(), name in "[a-zA-Z0-9._ -]{1,250}") {
            roundtrip(Response::RegisterOk { client_id: id });
            roundtrip(Response::RegisterFailed);
            roundtrip(Response::AesKey { client_id: id, encrypted_key: key.clone() });
            roundtrip(Response::ReconnectOk { client_id: id, encrypted_key: key });
            roundtrip(Response::Ack { client_id: id });
            roundtrip(Response::ReconnectRejected { client_id: id });
            roundtrip(Response::Error);
            roundtrip(Response::FileReceived(FileReceived { client_id: id, content_size: size, file_name: name, cksum: ck }));
        }

        #[test]
        fn name_requests_round_trip(id in any::<[u8; 16]>(), name in "[^\u{0}]{0,60}", code in 1025u16..=1031) {
            let mut buf = Vec::new();
            encode_name_request(&mut buf, &id, RequestCode::from(code), &name).unwrap();
            let h = RequestHeader::parse(&buf).unwrap();
            prop_assert_eq!(h.client_id, id);
            prop_assert_eq!(h.payload_size as usize, buf.len() - 23);
            prop_assert_eq!(decode_name_payload(&buf[23..]).unwrap(), name.as_bytes());
        }

        #[test]
        fn request_headers_round_trip(bytes in any::<[u8; 23]>(), id in any::<[u8; 16]>(),
                                      version in any::<u8>(), code in any::<u16>(), size in any::<u32>()) {
            let h = RequestHeader::parse(&bytes).unwrap();
            prop_assert_eq!(h.to_bytes(), bytes);
            let h = RequestHeader { client_id: id, version, code: code.into(), payload_size: size };
            prop_assert_eq!(RequestHeader::parse(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn response_headers_round_trip(bytes in any::<[u8; 7]>(), version in any::<u8>(),
                                       code in any::<u16>(), size in any::<u32>()) {
            let h = ResponseHeader::parse(&bytes).unwrap();
            prop_assert_eq!(h.to_bytes(), bytes);
            let h = ResponseHeader { version, code: code.into(), payload_size: size };
            prop_assert_eq!(ResponseHeader::parse(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn send_public_key_round_trips(id in any::<[u8; 16]>(), name in "[^\u{0}]{0,60}",
                                       key in proptest::collection::vec(any::<u8>(), 0..=PUBLIC_KEY_LEN)) {
            let mut buf = Vec::new();
            encode_send_public_key(&mut buf, &id, &name, &key).unwrap();
            let h = RequestHeader::parse(&buf).unwrap();
            prop_assert_eq!((h.client_id, h.version, h.code), (id, VERSION, RequestCode::SendPublicKey));
            prop_assert_eq!(h.payload_size as usize, SEND_PUBLIC_KEY_LEN);
            prop_assert_eq!(buf.len(), 23 + SEND_PUBLIC_KEY_LEN);
            let (n, k) = decode_send_public_key(&buf[23..]).unwrap();
            prop_assert_eq!(n, name.as_bytes());
            prop_assert_eq!(&k[..key.len()], &key[..]);
            prop_assert!(k[key.len()..].iter().all(|&b| b == 0));
        }

        #[test]
        fn send_file_round_trips(id in any::<[u8; 16]>(), name in "[^\u{0}]{0,60}", orig in any::<u32>(),
                                 number in any::<u16>(), total in any::<u16>(),
                                 content in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = Vec::new();
            encode_send_file(&mut buf, &id, &name, orig, number, total, &content).unwrap();
            let h = RequestHeader::parse(&buf).unwrap();
            prop_assert_eq!((h.client_id, h.version, h.code), (id, VERSION, RequestCode::SendFile));
            prop_assert_eq!(h.payload_size as usize, SEND_FILE_FIXED_LEN + content.len());
            prop_assert_eq!(buf.len(), 23 + h.payload_size as usize);
            let head = SendFileHead::decode(&buf[23..23 + SEND_FILE_FIXED_LEN]).unwrap();
            prop_assert_eq!(head, SendFileHead {
                content_size: content.len() as u32,
                orig_file_size: orig,
                packet_number: number,
                total_packets: total,
                file_name: name.as_bytes(),
            });
            prop_assert_eq!(&buf[23 + SEND_FILE_FIXED_LEN..], &content[..]);
        }

        /// Decode then encode: a canonical payload (UTF-8 name, zero padding) of every
        /// request and response comes back byte for byte (the fuzz harness's checks).
        #[test]
        fn canonical_payloads_decode_and_encode_back(
            code in prop::sample::select(vec![1025u16, 1026, 1027, 1028, 1029, 1030, 1031,
                                              1600, 1601, 1602, 1603, 1604, 1605, 1606, 1607]),
            name in "[^\u{0}]{0,60}",
            body in proptest::collection::vec(any::<u8>(), 1..=512),
            noise in any::<u8>(),
        ) {
            let mut frame = Vec::new();
            let skip = match code {
                1025 | 1027 | 1029..=1031 => {
                    encode_name_request(&mut frame, &[1; 16], code.into(), &name).unwrap();
                    23
                }
                1026 => {
                    encode_send_public_key(&mut frame, &[1; 16], &name, &body[..body.len().min(160)]).unwrap();
                    23
                }
                1028 => {
                    encode_send_file(&mut frame, &[1; 16], &name, 7, 1, 1, &body).unwrap();
                    23
                }
                _ => {
                    let mut id = [0u8; 16];
                    id.copy_from_slice(&body[..16.min(body.len())].iter().copied().chain([noise; 16]).take(16).collect::<Vec<_>>());
                    let r = match ResponseCode::from(code) {
                        ResponseCode::RegisterOk => Response::RegisterOk { client_id: id },
                        ResponseCode::RegisterFailed => Response::RegisterFailed,
                        ResponseCode::AesKey => Response::AesKey { client_id: id, encrypted_key: body.clone() },
                        ResponseCode::FileReceived => Response::FileReceived(FileReceived {
                            client_id: id, content_size: body.len() as u32, file_name: name.clone(), cksum: noise as u32 * 77,
                        }),
                        ResponseCode::Ack => Response::Ack { client_id: id },
                        ResponseCode::ReconnectOk => Response::ReconnectOk { client_id: id, encrypted_key: body.clone() },
                        ResponseCode::ReconnectRejected => Response::ReconnectRejected { client_id: id },
                        _ => Response::Error,
                    };
                    r.encode(&mut frame);
                    7
                }
            };
            let mut input = code.to_le_bytes().to_vec();
            input.extend_from_slice(&frame[skip..]);
            crate::v3::fuzzing::payload(&input);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), code in any::<u16>()) {
            let _ = Response::decode(ResponseCode::from(code), &bytes);
            let _ = SendFileHead::decode(&bytes);
            let _ = decode_name_payload(&bytes);
            let _ = decode_send_public_key(&bytes);
            let _ = RequestHeader::parse(&bytes);
        }
    }
}
