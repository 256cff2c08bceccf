//! Proxy tokens: minting, format checks and hashing.
//!
//! In: 32 bytes from the OS CSPRNG (minting) or a string from an `Authorization`
//! header (parsing). Out: a [`Token`] (plaintext, redacted in `Debug`) and its
//! [`TokenHash`], the only form that is ever stored outside the token Secret.
//!
//! Format: `llmp_` + 43 base62 characters (the 256-bit secret) + 6 base62 characters
//! of CRC-32 over the first two parts. The prefix lets secret scanners find leaked
//! tokens; the checksum lets the proxy refuse typos and garbage without a lookup.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Fixed prefix of every token.
pub const PREFIX: &str = "llmp_";
const SECRET_BYTES: usize = 32;
const BODY_LEN: usize = 43; // ceil(256 / log2(62))
const CHECKSUM_LEN: usize = 6; // ceil(32 / log2(62))
/// Length of every well-formed token.
pub const TOKEN_LEN: usize = PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Wrong length or prefix.
    #[error("token must be {TOKEN_LEN} characters starting with {PREFIX}")]
    Shape,
    /// A character outside base62.
    #[error("token contains a character outside [0-9A-Za-z]")]
    Alphabet,
    /// The checksum does not match.
    #[error("token checksum does not match: it was mistyped or truncated")]
    Checksum,
}

/// Minting failed.
#[derive(Debug, thiserror::Error)]
#[error("reading the OS random number generator failed")]
pub struct MintError(#[from] getrandom::Error);

/// A plaintext token. Zeroised on drop; `Debug` shows only the prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Zeroizing<String>);

impl Token {
    /// Mints a fresh token from 32 bytes of OS randomness.
    pub fn mint() -> Result<Self, MintError> {
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        getrandom::fill(secret.as_mut())?;
        let mut s = String::with_capacity(TOKEN_LEN);
        s.push_str(PREFIX);
        base62_fixed(secret.as_ref(), BODY_LEN, &mut s);
        let crc = crc32fast::hash(s.as_bytes());
        base62_fixed(&crc.to_be_bytes(), CHECKSUM_LEN, &mut s);
        Ok(Self(Zeroizing::new(s)))
    }

    /// Checks the shape and checksum of `s` and wraps it.
    pub fn parse(s: &str) -> Result<Self, FormatError> {
        check(s)?;
        Ok(Self(Zeroizing::new(s.to_string())))
    }

    /// The plaintext, for the token Secret only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the plaintext.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({PREFIX}…)")
    }
}

/// Checks the shape and checksum of `s` without copying it: the proxy's hot path.
pub fn check(s: &str) -> Result<(), FormatError> {
    let bytes = s.as_bytes();
    if bytes.len() != TOKEN_LEN || !s.starts_with(PREFIX) {
        return Err(FormatError::Shape);
    }
    if !bytes[PREFIX.len()..].iter().all(u8::is_ascii_alphanumeric) {
        return Err(FormatError::Alphabet);
    }
    let (signed, checksum) = bytes.split_at(PREFIX.len() + BODY_LEN);
    let mut expected = [0u8; CHECKSUM_LEN];
    base62_into(&crc32fast::hash(signed).to_be_bytes(), &mut expected);
    // The checksum is public information (a function of the rest of the token), so
    // comparing it in variable time leaks nothing secret.
    if checksum != expected {
        return Err(FormatError::Checksum);
    }
    Ok(())
}

/// SHA-256 of a token: the key of the routing table and what `status.tokenHash` shows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes a plaintext token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses the `sha256:<hex>` form of `status.tokenHash`.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:")?;
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Appends `bytes`, read as a big-endian number, in exactly `width` base62 digits.
fn base62_fixed(bytes: &[u8], width: usize, out: &mut String) {
    let mut digits = Zeroizing::new(vec![0u8; width]);
    base62_into(bytes, &mut digits);
    out.extend(digits.iter().map(|&d| d as char));
}

/// Writes `bytes` (big-endian) as base62 digits into `out`, most significant first.
fn base62_into(bytes: &[u8], out: &mut [u8]) {
    let mut num = Zeroizing::new(bytes.to_vec());
    for slot in out.iter_mut().rev() {
        let mut remainder = 0u32;
        for byte in num.iter_mut() {
            let acc = (remainder << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            remainder = acc % 62;
        }
        *slot = ALPHABET[remainder as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_parse_and_differ() {
        let a = Token::mint().unwrap();
        let b = Token::mint().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), TOKEN_LEN);
        assert!(a.expose().starts_with(PREFIX));
        assert_eq!(Token::parse(a.expose()).unwrap(), a);
    }

    #[test]
    fn a_single_changed_character_fails_the_checksum() {
        let token = Token::mint().unwrap();
        let mut chars: Vec<char> = token.expose().chars().collect();
        let i = PREFIX.len() + 7;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(check(&typo), Err(FormatError::Checksum));
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let token = Token::mint().unwrap();
        assert_eq!(check(""), Err(FormatError::Shape));
        assert_eq!(check(&token.expose()[1..]), Err(FormatError::Shape));
        assert_eq!(check(&token.expose().replacen("llmp_", "sk-x_", 1)), Err(FormatError::Shape));
        let mut bad = token.expose().to_string();
        bad.replace_range(10..11, "-");
        assert_eq!(check(&bad), Err(FormatError::Alphabet));
    }

    #[test]
    fn hash_round_trips_through_its_status_form() {
        let token = Token::mint().unwrap();
        let hash = token.hash();
        let shown = hash.to_string();
        assert!(shown.starts_with("sha256:") && shown.len() == 71);
        assert_eq!(TokenHash::parse(&shown), Some(hash));
        assert_eq!(TokenHash::parse("sha256:zz"), None);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = Token::mint().unwrap();
        let shown = format!("{token:?}");
        assert!(!shown.contains(&token.expose()[PREFIX.len()..PREFIX.len() + 8]));
    }

    #[test]
    fn base62_is_fixed_width_and_big_endian() {
        let mut out = [0u8; 3];
        base62_into(&[0, 62], &mut out);
        assert_eq!(&out, b"010");
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The parser never panics on any input, and refuses everything that is not
        /// token-shaped with the reason that applies. (Random strings are never tokens,
        /// so this property checks refusals; the next one checks acceptance.)
        #[test]
        fn check_never_panics_and_names_what_is_wrong(s in ".{0,80}") {
            let shaped = s.len() == TOKEN_LEN && s.starts_with(PREFIX);
            let base62 = s.bytes().skip(PREFIX.len()).all(|b| b.is_ascii_alphanumeric());
            match check(&s) {
                Err(FormatError::Shape) => prop_assert!(!shaped),
                Err(FormatError::Alphabet) => prop_assert!(shaped && !base62),
                Err(FormatError::Checksum) | Ok(()) => prop_assert!(shaped && base62),
            }
        }

        /// Any token-shaped string is accepted exactly when its last six characters are
        /// the checksum of the rest: every such string is a test of both branches.
        #[test]
        fn a_shaped_string_is_accepted_exactly_with_its_checksum(
            body in "[0-9A-Za-z]{43}",
            suffix in "[0-9A-Za-z]{6}",
        ) {
            let signed = format!("{PREFIX}{body}");
            let mut checksum = [0u8; CHECKSUM_LEN];
            base62_into(&crc32fast::hash(signed.as_bytes()).to_be_bytes(), &mut checksum);
            let checksum = std::str::from_utf8(&checksum).unwrap();
            prop_assert_eq!(check(&format!("{signed}{checksum}")), Ok(()));
            let other = format!("{signed}{suffix}");
            prop_assert_eq!(check(&other), if suffix == checksum { Ok(()) } else { Err(FormatError::Checksum) });
        }

        /// Any single-character change of a real token is caught by the checksum.
        #[test]
        fn every_single_character_typo_is_caught(position in PREFIX.len()..TOKEN_LEN, replacement in "[0-9A-Za-z]") {
            let token = Token::mint().unwrap();
            let mut typo = token.expose().to_string();
            let replacement = replacement.chars().next().unwrap();
            prop_assume!(typo.as_bytes()[position] as char != replacement);
            typo.replace_range(position..position + 1, &replacement.to_string());
            prop_assert_eq!(check(&typo), Err(FormatError::Checksum));
        }
    }
}
