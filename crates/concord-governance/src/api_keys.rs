//! API keys: `ck_<id>_<secret>`. The id finds the record; only the SHA-256 of the secret is
//! stored, and the whole key is shown once, when it is created.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use concord_store::{ApiKeyRecord, Store};
use parking_lot::Mutex;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::AuthError;
use crate::identity::Principal;

const PREFIX: &str = "ck_";
/// How long a looked-up key is trusted before the store is asked again (so a revocation made
/// from the CLI takes effect within this time on every node).
const CACHE_FOR: Duration = Duration::from_secs(2);

/// A key as returned by [`create`]: the secret is only ever in `token`.
pub struct CreatedKey {
    pub id: String,
    pub token: String,
    pub record: ApiKeyRecord,
}

pub fn looks_like_api_key(token: &str) -> bool {
    token.starts_with(PREFIX)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    hex::encode(buffer)
}

/// The hex digits of a key's id and of its secret (6 and 32 random bytes).
const ID_HEX_LEN: usize = 12;
const SECRET_HEX_LEN: usize = 64;

/// Makes and stores a new key for `principal` with `roles`.
pub async fn create(
    store: &Store,
    principal: &str,
    roles: &[String],
    now_ms: u64,
) -> Result<CreatedKey, AuthError> {
    let id = random_hex(ID_HEX_LEN / 2);
    let secret = random_hex(SECRET_HEX_LEN / 2);
    let record = ApiKeyRecord {
        id: id.clone(),
        principal: principal.to_string(),
        roles: roles.to_vec(),
        secret_sha256: sha256_hex(&secret),
        created_at_ms: now_ms,
        revoked_at_ms: None,
    };
    store.create_api_key(&record).await?;
    Ok(CreatedKey {
        token: format!("{PREFIX}{id}_{secret}"),
        id,
        record,
    })
}

/// Checks presented API keys against the store.
pub struct ApiKeyVerifier {
    store: Store,
    cache: Mutex<HashMap<String, (Instant, Option<ApiKeyRecord>)>>,
}

impl ApiKeyVerifier {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let malformed = || AuthError::Invalid("malformed API key".into());
        let rest = token.strip_prefix(PREFIX).ok_or_else(malformed)?;
        let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
        // Only the shape `create` makes reaches the cache and the store: an id of any other
        // length or alphabet would otherwise pin whatever a stranger sends in the cache.
        let hex = |text: &str, len: usize| {
            text.len() == len
                && text
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(id, ID_HEX_LEN) || !hex(secret, SECRET_HEX_LEN) {
            return Err(malformed());
        }
        let cached = self
            .cache
            .lock()
            .get(id)
            .filter(|(at, _)| at.elapsed() < CACHE_FOR)
            .map(|(_, record)| record.clone());
        let record = match cached {
            Some(record) => record,
            None => {
                let record = self.store.api_key(id).await?;
                let mut cache = self.cache.lock();
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(id.to_string(), (Instant::now(), record.clone()));
                record
            }
        };
        let record = record.ok_or_else(|| AuthError::Invalid("unknown API key".into()))?;
        if !constant_time_eq(
            sha256_hex(secret).as_bytes(),
            record.secret_sha256.as_bytes(),
        ) {
            return Err(AuthError::Invalid("unknown API key".into()));
        }
        if record.revoked_at_ms.is_some() {
            return Err(AuthError::Invalid("API key revoked".into()));
        }
        Ok(Principal {
            chain: vec![record.principal.clone()],
            id: record.principal,
            kind: "service".into(),
            roles: record.roles,
            method: "api_key".into(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
