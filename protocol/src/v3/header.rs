//! The fixed headers: 23 bytes before every request, 7 before every response.
//!
//! Modeled on h2's `frame/head.rs`: a length constant, `parse(&[u8])` that says "too
//! short" instead of panicking, `encode`, and code enums with an `Unknown` variant so
//! that any u16 decodes.

/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 23;
/// Length of a response header.
pub const RESPONSE_HEADER_LEN: usize = 7;

/// Request codes of v3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestCode {
    Register,
    SendPublicKey,
    Reconnect,
    SendFile,
    CrcOk,
    CrcRetry,
    CrcAbort,
    Unknown(u16),
}

impl From<u16> for RequestCode {
    fn from(v: u16) -> Self {
        match v {
            1025 => Self::Register,
            1026 => Self::SendPublicKey,
            1027 => Self::Reconnect,
            1028 => Self::SendFile,
            1029 => Self::CrcOk,
            1030 => Self::CrcRetry,
            1031 => Self::CrcAbort,
            other => Self::Unknown(other),
        }
    }
}

impl From<RequestCode> for u16 {
    fn from(c: RequestCode) -> u16 {
        match c {
            RequestCode::Register => 1025,
            RequestCode::SendPublicKey => 1026,
            RequestCode::Reconnect => 1027,
            RequestCode::SendFile => 1028,
            RequestCode::CrcOk => 1029,
            RequestCode::CrcRetry => 1030,
            RequestCode::CrcAbort => 1031,
            RequestCode::Unknown(v) => v,
        }
    }
}

/// Response codes of v3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    RegisterOk,
    RegisterFailed,
    AesKey,
    FileReceived,
    Ack,
    ReconnectOk,
    ReconnectRejected,
    Error,
    Unknown(u16),
}

impl From<u16> for ResponseCode {
    fn from(v: u16) -> Self {
        match v {
            1600 => Self::RegisterOk,
            1601 => Self::RegisterFailed,
            1602 => Self::AesKey,
            1603 => Self::FileReceived,
            1604 => Self::Ack,
            1605 => Self::ReconnectOk,
            1606 => Self::ReconnectRejected,
            1607 => Self::Error,
            other => Self::Unknown(other),
        }
    }
}

impl From<ResponseCode> for u16 {
    fn from(c: ResponseCode) -> u16 {
        match c {
            ResponseCode::RegisterOk => 1600,
            ResponseCode::RegisterFailed => 1601,
            ResponseCode::AesKey => 1602,
            ResponseCode::FileReceived => 1603,
            ResponseCode::Ack => 1604,
            ResponseCode::ReconnectOk => 1605,
            ResponseCode::ReconnectRejected => 1606,
            ResponseCode::Error => 1607,
            ResponseCode::Unknown(v) => v,
        }
    }
}

/// Not enough bytes for a header yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("header needs {needed} bytes, {available} available")]
pub struct TooShort {
    pub needed: usize,
    pub available: usize,
}

/// The 23-byte request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub client_id: crate::common::ClientId,
    pub version: u8,
    pub code: RequestCode,
    pub payload_size: u32,
}

impl RequestHeader {
    /// Decodes the first 23 bytes of `buf`; any values decode (validation is the
    /// session's job, so that it can answer with the right error).
    pub fn parse(buf: &[u8]) -> Result<Self, TooShort> {
        let b: &[u8; REQUEST_HEADER_LEN] = buf
            .get(..REQUEST_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(TooShort {
                needed: REQUEST_HEADER_LEN,
                available: buf.len(),
            })?;
        let mut client_id = [0u8; 16];
        client_id.copy_from_slice(&b[..16]);
        Ok(Self {
            client_id,
            version: b[16],
            code: u16::from_le_bytes([b[17], b[18]]).into(),
            payload_size: u32::from_le_bytes([b[19], b[20], b[21], b[22]]),
        })
    }

    /// The header's 23 bytes.
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..16].copy_from_slice(&self.client_id);
        b[16] = self.version;
        b[17..19].copy_from_slice(&u16::from(self.code).to_le_bytes());
        b[19..23].copy_from_slice(&self.payload_size.to_le_bytes());
        b
    }
}

/// The 7-byte response header (`<BHI`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    pub version: u8,
    pub code: ResponseCode,
    pub payload_size: u32,
}

impl ResponseHeader {
    /// Decodes the first 7 bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, TooShort> {
        let b: &[u8; RESPONSE_HEADER_LEN] = buf
            .get(..RESPONSE_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(TooShort {
                needed: RESPONSE_HEADER_LEN,
                available: buf.len(),
            })?;
        Ok(Self {
            version: b[0],
            code: u16::from_le_bytes([b[1], b[2]]).into(),
            payload_size: u32::from_le_bytes([b[3], b[4], b[5], b[6]]),
        })
    }

    /// The header's 7 bytes.
    pub fn to_bytes(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut b = [0u8; RESPONSE_HEADER_LEN];
        b[0] = self.version;
        b[1..3].copy_from_slice(&u16::from(self.code).to_le_bytes());
        b[3..7].copy_from_slice(&self.payload_size.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_exact_bytes() {
        let h = RequestHeader {
            client_id: [0xAB; 16],
            version: 3,
            code: RequestCode::SendFile,
            payload_size: 267 + 16,
        };
        let b = h.to_bytes();
        let mut expect = vec![0xAB; 16];
        expect.extend_from_slice(&[3, 0x04, 0x04, 0x1B, 0x01, 0, 0]);
        assert_eq!(&b[..], &expect[..]);
        assert_eq!(RequestHeader::parse(&b), Ok(h));
    }

    #[test]
    fn response_header_exact_bytes() {
        let h = ResponseHeader {
            version: 3,
            code: ResponseCode::FileReceived,
            payload_size: 279,
        };
        assert_eq!(h.to_bytes(), [3, 0x43, 0x06, 0x17, 0x01, 0, 0]);
        assert_eq!(ResponseHeader::parse(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn short_input_is_an_error_not_a_panic() {
        for n in 0..REQUEST_HEADER_LEN {
            assert_eq!(
                RequestHeader::parse(&vec![0; n]),
                Err(TooShort {
                    needed: 23,
                    available: n
                })
            );
        }
        assert!(ResponseHeader::parse(&[3, 0, 0]).is_err());
    }

    #[test]
    fn codes_round_trip_including_unknown() {
        for v in [0u16, 1024, 1025, 1028, 1031, 1032, 1600, 1607, 65535] {
            assert_eq!(u16::from(RequestCode::from(v)), v);
            assert_eq!(u16::from(ResponseCode::from(v)), v);
        }
        assert_eq!(RequestCode::from(1032), RequestCode::Unknown(1032));
    }
}
