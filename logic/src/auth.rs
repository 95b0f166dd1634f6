//! Credentials: argon2id password hashes, HS256 JWT access tokens, and
//! opaque refresh tokens (stored only as SHA-256 hashes).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// argon2id cost; defaults follow OWASP's minimum (19 MiB, t=2, p=1).
#[derive(Debug, Clone, Copy)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        Self { memory_kib: 19 * 1024, iterations: 2 }
    }
}

fn argon(cost: HashCost) -> Result<Argon2<'static>, ApiError> {
    let params = Params::new(cost.memory_kib, cost.iterations, 1, None)
        .map_err(|e| ApiError::new("internal", format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password into a PHC string.
pub fn hash_password(password: &str, cost: HashCost) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon(cost)?
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::new("internal", format!("hashing failed: {e}")))
}

/// Checks a password against a PHC string (its own parameters apply).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub sid: String,
    pub dev: String,
    pub iat: u64,
    pub exp: u64,
    pub typ: String,
}

/// Session ids of tokens minted offline with the deployment key
/// ([`mint`]); they have no stored session.
pub const MINTED_SESSION_PREFIX: &str = "cli-";

/// Mints an access token for `user` on `device` valid `ttl_secs`, without
/// a stored session (for operators and load tests).
pub fn mint(key: &TokenKey, user: &str, device: &str, ttl_secs: u64) -> String {
    let now = now_secs();
    key.sign(&Claims {
        sub: user.to_owned(),
        sid: format!("{MINTED_SESSION_PREFIX}{}", random_token(9)),
        dev: device.to_owned(),
        iat: now,
        exp: now + ttl_secs,
        typ: "access".into(),
    })
}

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Signs and verifies HS256 JWTs with one deployment-wide secret.
#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl TokenKey {
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC accepts keys of any length")
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).expect("claims always serialize");
        let signing_input = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    /// Verifies signature, algorithm, type and expiry (`now` in seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, ApiError> {
        let bad = |m: &str| ApiError::new("bad_token", m.to_string());
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad("malformed token"));
        };
        let sig = B64.decode(s).map_err(|_| bad("malformed signature"))?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| bad("signature mismatch"))?;
        let header: serde_json::Value = serde_json::from_slice(&B64.decode(h).map_err(|_| bad("malformed header"))?)
            .map_err(|_| bad("malformed header"))?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(bad("unsupported algorithm"));
        }
        let claims: Claims = serde_json::from_slice(&B64.decode(p).map_err(|_| bad("malformed claims"))?)
            .map_err(|_| bad("malformed claims"))?;
        if claims.typ != "access" {
            return Err(bad("not an access token"));
        }
        if claims.exp <= now {
            return Err(bad("token expired"));
        }
        Ok(claims)
    }
}

/// A fresh random token or id: `bytes` random bytes, base64url.
pub fn random_token(bytes: usize) -> String {
    let buf: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    B64.encode(buf)
}

/// The stored form of a refresh token.
pub fn refresh_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    switchboard_storage::now_ms() / 1000
}

/// Usernames: 3–32 chars of `[a-z0-9_.-]`.
pub fn valid_username(name: &str) -> bool {
    (3..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims { sub: "alice".into(), sid: "s".into(), dev: "d".into(), iat: 1, exp, typ: "access".into() }
    }

    #[test]
    fn jwt_round_trip_and_rejections() {
        let key = TokenKey::new(b"secret".to_vec());
        let t = key.sign(&claims(100));
        assert_eq!(key.verify(&t, 50).unwrap(), claims(100));
        assert_eq!(key.verify(&t, 100).unwrap_err().message, "token expired");
        assert!(TokenKey::new(b"other".to_vec()).verify(&t, 50).is_err());
        // tampered payload
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(serde_json::to_vec(&Claims { sub: "mallory".into(), ..claims(100) }).unwrap());
        parts[1] = &forged;
        assert!(key.verify(&parts.join("."), 50).is_err());
        for junk in ["", "a.b", "a.b.c.d", "...", "x.y.z"] {
            assert_eq!(key.verify(junk, 50).unwrap_err().code, "bad_token");
        }
        let refresh_like = key.sign(&Claims { typ: "refresh".into(), ..claims(100) });
        assert!(key.verify(&refresh_like, 50).is_err());
    }

    #[test]
    fn passwords_hash_and_verify() {
        let cost = HashCost { memory_kib: 1024, iterations: 1 };
        let h = hash_password("correct horse", cost).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn usernames() {
        assert!(valid_username("alice_01.x-y"));
        for bad in ["al", "Alice", "a b c", &"a".repeat(33), "ümlaut"] {
            assert!(!valid_username(bad), "{bad}");
        }
    }
}
