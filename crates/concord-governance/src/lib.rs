//! Governance: who is calling (JWT bearer tokens, API keys), what they may do (one policy engine
//! for tool calls, resource reads, prompt gets and state writes), and a tamper-evident record of
//! it (the hash-chained audit log). The node wires these into its request paths; nothing here
//! knows about HTTP or MCP.

pub mod api_keys;
pub mod audit;
pub mod budgets;
pub mod clock;
pub mod identity;
pub mod jwt;
pub mod limits;
pub mod policy;

#[cfg(test)]
mod proptests;

use std::time::{SystemTime, UNIX_EPOCH};

use concord_config::AuthSettings;
use concord_store::Store;

pub use audit::AuditLog;
pub use identity::Principal;
pub use policy::{Action, Decision, PolicyEngine, PolicyError, Reload, RuleSet};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials on a request that needs them.
    #[error("authentication required")]
    Missing,
    /// Credentials that do not hold (the message never contains them).
    #[error("{0}")]
    Invalid(String),
    /// A token names a key this node does not have.
    #[error("the token's signing key is unknown")]
    UnknownKey,
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
    #[error("auth configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] concord_store::StoreError),
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Turns the credentials of a request into a principal.
pub struct Authenticator {
    jwt: jwt::JwtVerifier,
    api_keys: api_keys::ApiKeyVerifier,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, store: Store) -> Result<Self, AuthError> {
        Ok(Self {
            jwt: jwt::JwtVerifier::new(settings)?,
            api_keys: api_keys::ApiKeyVerifier::new(store),
        })
    }

    /// Loads the JWKS, if one is configured.
    pub async fn prepare(&self) {
        self.jwt.prefetch().await;
    }

    /// `authorization`: the request's `Authorization` header, if any.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let (scheme, credentials) = header
            .split_once(' ')
            .ok_or_else(|| AuthError::Invalid("expected `Authorization: Bearer …`".into()))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid(
                "expected `Authorization: Bearer …`".into(),
            ));
        }
        let credentials = credentials.trim();
        if api_keys::looks_like_api_key(credentials) {
            return self.api_keys.verify(credentials).await;
        }
        if !self.jwt.has_keys() {
            return Err(AuthError::Invalid(
                "this node accepts API keys only (no JWT keys are configured)".into(),
            ));
        }
        self.jwt.verify(credentials).await
    }
}
