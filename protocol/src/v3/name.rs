//! The `name[255]` field and the rules for what a name may hold.
//!
//! On the wire a name is a UTF-8 string, a NUL, then padding (zeros from well-behaved
//! peers; bytes after the first NUL are ignored, as the reference server does). What
//! is accepted is stricter than what decodes: user names are at most 100 bytes, file
//! names at most 250 bytes and never a path.

/// Width of a name field.
pub const NAME_FIELD_LEN: usize = 255;
/// Longest user name.
pub const MAX_USER_NAME: usize = 100;
/// Longest file name.
pub const MAX_FILE_NAME: usize = 250;

/// Why a name field or name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name field is not 255 bytes")]
    FieldSize,
    #[error("name has no NUL terminator within 255 bytes")]
    Unterminated,
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes, over the limit of {1}")]
    TooLong(usize, usize),
    #[error("name is not valid UTF-8")]
    NotUtf8,
    #[error("name contains a control character")]
    Control,
    #[error("file name is a path or a special name, not a bare file name")]
    NotBare,
}

/// The bytes before the first NUL of a 255-byte name field.
pub fn decode_field(field: &[u8]) -> Result<&[u8], NameError> {
    if field.len() != NAME_FIELD_LEN {
        return Err(NameError::FieldSize);
    }
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(NameError::Unterminated)?;
    Ok(&field[..end])
}

/// Writes `name` as a 255-byte field: the bytes, a NUL, zero padding.
pub fn encode_field(name: &str, out: &mut [u8; NAME_FIELD_LEN]) -> Result<(), NameError> {
    let b = name.as_bytes();
    if b.len() >= NAME_FIELD_LEN {
        return Err(NameError::TooLong(b.len(), NAME_FIELD_LEN - 1));
    }
    if b.contains(&0) {
        return Err(NameError::Control);
    }
    out.fill(0);
    out[..b.len()].copy_from_slice(b);
    Ok(())
}

fn checked_text(raw: &[u8], max: usize) -> Result<&str, NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.len() > max {
        return Err(NameError::TooLong(raw.len(), max));
    }
    let s = std::str::from_utf8(raw).map_err(|_| NameError::NotUtf8)?;
    if s.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(s)
}

/// A user name: 1..=100 bytes of UTF-8 without control characters.
pub fn check_user_name(raw: &[u8]) -> Result<&str, NameError> {
    checked_text(raw, MAX_USER_NAME)
}

/// A file name: 1..=250 bytes of UTF-8, no control characters, no `/` or `\`, not `.`
/// or `..`. Such a name can be joined to a directory without leaving it.
pub fn check_file_name(raw: &[u8]) -> Result<&str, NameError> {
    let s = checked_text(raw, MAX_FILE_NAME)?;
    if s == "." || s == ".." || s.contains(['/', '\\']) {
        return Err(NameError::NotBare);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(bytes: &[u8]) -> [u8; 255] {
        let mut f = [0u8; 255];
        f[..bytes.len()].copy_from_slice(bytes);
        f
    }

    #[test]
    fn decode_stops_at_first_nul_and_ignores_padding() {
        let mut f = field(b"alice");
        f[10] = b'x';
        assert_eq!(decode_field(&f), Ok(&b"alice"[..]));
        assert_eq!(decode_field(&[1u8; 255]), Err(NameError::Unterminated));
        assert_eq!(decode_field(&[0u8; 10]), Err(NameError::FieldSize));
    }

    #[test]
    fn encode_round_trip_and_limits() {
        let mut f = [0xFFu8; 255];
        encode_field("bob", &mut f).unwrap();
        assert_eq!(&f[..4], b"bob\0");
        assert!(f[4..].iter().all(|&b| b == 0));
        assert!(encode_field(&"a".repeat(254), &mut f).is_ok());
        assert!(encode_field(&"a".repeat(255), &mut f).is_err());
    }

    #[test]
    fn file_name_rules() {
        assert_eq!(check_file_name(b"report.pdf"), Ok("report.pdf"));
        assert_eq!(check_file_name("été.txt".as_bytes()), Ok("été.txt"));
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"/etc/passwd",
            b"..\\x",
            b"a\nb",
            b"\x7f",
            b"\xff\xfe",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name("a".repeat(250).as_bytes()).is_ok());
        assert_eq!(
            check_file_name("a".repeat(251).as_bytes()),
            Err(NameError::TooLong(251, 250))
        );
    }

    #[test]
    fn user_name_rules() {
        assert!(check_user_name(b"alice").is_ok());
        assert!(check_user_name("a".repeat(100).as_bytes()).is_ok());
        assert!(check_user_name("a".repeat(101).as_bytes()).is_err());
        assert!(check_user_name(b"").is_err());
        assert!(check_user_name(b"a\tb").is_err());
    }
}
