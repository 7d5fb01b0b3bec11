//! JWT bearer tokens: HS256, RS256, ES256 and EdDSA, with issuer, audience, expiry and
//! not-before checks (a small clock-skew allowance), keys from the config and/or a JWKS URL.
//!
//! Every key verifies exactly one algorithm, and a token whose header names another algorithm
//! is refused before any signature check: that closes algorithm confusion (an HS256 token
//! "signed" with an RSA public key as the HMAC secret). `alg: none` has no key and is refused.
//! An unknown `kid` refetches the JWKS (at most once a second), so a key rotation at the
//! identity provider needs no restart.

use std::time::{Duration, Instant};

use base64::Engine;
use concord_config::{AuthSettings, StaticKey};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use parking_lot::RwLock;
use serde_json::Value;

use crate::AuthError;
use crate::identity::Principal;

/// How often an unknown `kid` may trigger a JWKS fetch.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

pub struct JwtVerifier {
    settings: AuthSettings,
    configured: Vec<VerifyingKey>,
    published: RwLock<Vec<VerifyingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    http: reqwest::Client,
}

fn algorithm_named(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

fn configured_key(key: &StaticKey) -> Result<VerifyingKey, AuthError> {
    let algorithm = algorithm_named(&key.algorithm)
        .ok_or_else(|| AuthError::Config(format!("unsupported algorithm {}", key.algorithm)))?;
    let pem = || {
        key.public_key_pem
            .as_deref()
            .map(str::as_bytes)
            .ok_or_else(|| AuthError::Config(format!("{} key without a public key", key.algorithm)))
    };
    let bad = |e: jsonwebtoken::errors::Error| AuthError::Config(format!("bad key: {e}"));
    let decoding = match algorithm {
        Algorithm::HS256 => DecodingKey::from_secret(
            key.secret
                .as_deref()
                .ok_or_else(|| AuthError::Config("HS256 key without a secret".into()))?
                .as_bytes(),
        ),
        Algorithm::RS256 => DecodingKey::from_rsa_pem(pem()?).map_err(bad)?,
        Algorithm::ES256 => DecodingKey::from_ec_pem(pem()?).map_err(bad)?,
        _ => DecodingKey::from_ed_pem(pem()?).map_err(bad)?,
    };
    Ok(VerifyingKey {
        kid: key.kid.clone(),
        algorithm,
        key: decoding,
    })
}

/// The keys of a JWKS this verifier can use: RSA (RS256), P-256 (ES256) and Ed25519 (EdDSA).
/// Symmetric keys are never taken from a URL.
fn published_keys(set: &JwkSet) -> Vec<VerifyingKey> {
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Some(Algorithm::ES256)
            }
            AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
            _ => None,
        };
        let declared = match jwk.common.key_algorithm {
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
            Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
            Some(_) => None,
            None => implied,
        };
        let (Some(algorithm), Some(implied)) = (declared, implied) else {
            continue;
        };
        if algorithm != implied {
            continue;
        }
        if let Ok(key) = DecodingKey::from_jwk(jwk) {
            keys.push(VerifyingKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
    }
    keys
}

impl JwtVerifier {
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        let configured = settings
            .keys
            .iter()
            .map(configured_key)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            settings: settings.clone(),
            configured,
            published: RwLock::new(Vec::new()),
            last_fetch: tokio::sync::Mutex::new(None),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| AuthError::Config(format!("HTTP client: {e}")))?,
        })
    }

    /// True when any JWT key source is configured.
    pub fn has_keys(&self) -> bool {
        !self.configured.is_empty() || self.settings.jwks_url.is_some()
    }

    /// Fetches the JWKS now (at start); a failure is logged, and the next unknown `kid` tries
    /// again.
    pub async fn prefetch(&self) {
        if self.settings.jwks_url.is_some()
            && let Err(e) = self.refresh(true).await
        {
            tracing::warn!(error = %e, "JWKS fetch failed; will retry when a token needs it");
        }
    }

    async fn refresh(&self, force: bool) -> Result<(), AuthError> {
        let Some(url) = &self.settings.jwks_url else {
            return Ok(());
        };
        let mut last = self.last_fetch.lock().await;
        if !force && last.is_some_and(|at| at.elapsed() < MIN_REFRESH_INTERVAL) {
            return Ok(());
        }
        *last = Some(Instant::now());
        let set: JwkSet = self
            .http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| AuthError::KeysUnavailable(format!("not a JWKS: {e}")))?;
        let keys = published_keys(&set);
        tracing::info!(keys = keys.len(), "JWKS loaded");
        *self.published.write() = keys;
        Ok(())
    }

    /// Checks `token` and returns who it names.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let (header_alg, kid) = peek_header(token)?;
        let Some(algorithm) = algorithm_named(&header_alg) else {
            return Err(AuthError::Invalid(format!(
                "algorithm {header_alg:?} is not accepted"
            )));
        };
        let mut outcome = self.verify_with_known_keys(token, algorithm, kid.as_deref());
        if matches!(outcome, Err(AuthError::UnknownKey)) && self.settings.jwks_url.is_some() {
            self.refresh(false).await?;
            outcome = self.verify_with_known_keys(token, algorithm, kid.as_deref());
        }
        let claims = outcome?;
        self.principal(&claims)
    }

    fn verify_with_known_keys(
        &self,
        token: &str,
        algorithm: Algorithm,
        kid: Option<&str>,
    ) -> Result<Value, AuthError> {
        let published = self.published.read();
        let candidates: Vec<&VerifyingKey> = self
            .configured
            .iter()
            .chain(published.iter())
            .filter(|key| match kid {
                Some(kid) => key.kid.as_deref() == Some(kid),
                None => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey);
        }
        let matching: Vec<&&VerifyingKey> = candidates
            .iter()
            .filter(|key| key.algorithm == algorithm)
            .collect();
        if matching.is_empty() {
            // The key exists but verifies another algorithm: algorithm confusion.
            return Err(AuthError::Invalid(format!(
                "the token's algorithm {algorithm:?} does not match its key's"
            )));
        }
        let mut last = AuthError::Invalid("signature does not verify".into());
        for key in matching {
            match jsonwebtoken::decode::<Value>(token, &key.key, &self.validation(algorithm)) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => continue,
                        ErrorKind::ExpiredSignature => AuthError::Invalid("token expired".into()),
                        ErrorKind::ImmatureSignature => {
                            AuthError::Invalid("token not valid yet (nbf)".into())
                        }
                        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
                        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
                        ErrorKind::MissingRequiredClaim(claim) => {
                            AuthError::Invalid(format!("missing claim {claim}"))
                        }
                        _ => AuthError::Invalid("invalid token".into()),
                    };
                    return Err(last);
                }
            }
        }
        Err(last)
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.settings.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    fn principal(&self, claims: &Value) -> Result<Principal, AuthError> {
        let id = claims
            .get(&self.settings.principal_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "the token has no {} claim",
                    self.settings.principal_claim
                ))
            })?
            .to_string();
        let roles = match claims.get(&self.settings.roles_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(text)) => text.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let kind = claims
            .get("principal_kind")
            .and_then(Value::as_str)
            .filter(|k| ["user", "agent", "service"].contains(k))
            .unwrap_or("user")
            .to_string();
        Ok(Principal {
            chain: delegation_chain(&id, claims),
            id,
            kind,
            roles,
            method: "jwt".into(),
        })
    }
}

/// `sub` acting through the actors of the RFC 8693 `act` claim: the outermost `act` is the
/// party acting now, nested ones acted before it. The chain runs from the origin to the
/// current actor.
fn delegation_chain(subject: &str, claims: &Value) -> Vec<String> {
    let mut actors = Vec::new();
    let mut act = claims.get("act");
    while let Some(actor) = act {
        if let Some(sub) = actor.get("sub").and_then(Value::as_str) {
            actors.push(sub.to_string());
        }
        act = actor.get("act");
        if actors.len() > 16 {
            break;
        }
    }
    let mut chain = vec![subject.to_string()];
    chain.extend(actors.into_iter().rev());
    chain
}

/// The header's `alg` and `kid`, read without trusting anything else in the token (the
/// signature check that follows is what makes them count).
fn peek_header(token: &str) -> Result<(String, Option<String>), AuthError> {
    let malformed = || AuthError::Invalid("malformed token".into());
    let header = token.split('.').next().ok_or_else(malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| malformed())?;
    let header: Value = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(malformed)?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((alg, kid))
}
