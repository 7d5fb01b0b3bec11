//! JWT bearer tokens: HS256, RS256, ES256 and EdDSA, with issuer, audience, expiry and
//! not-before checks (a small clock-skew allowance), keys from the config and/or a JWKS URL.
//!
//! Every key verifies exactly one algorithm, and a token whose header names another algorithm
//! is refused before any signature check: that closes algorithm confusion (an HS256 token
//! "signed" with an RSA public key as the HMAC secret). `alg: none` has no key and is refused.
//! A token without a `kid` is verified only when exactly one known key verifies its algorithm;
//! with several it is refused (the token must say which).
//!
//! Time claims follow RFC 7519 with `leeway` on both sides: a token is accepted from
//! `nbf - leeway` (inclusive) until `exp + leeway` (exclusive).
//!
//! The JWKS is fetched at start, refreshed on a schedule — every [`JwksOptions::refresh_interval`]
//! (5 minutes), sooner when the response's `Cache-Control: max-age` says so, but never sooner
//! than [`JwksOptions::min_refresh_interval`] (30 s) — and refetched on an unknown `kid` (at most
//! once a second), so a rotation at the identity provider needs no restart and a key withdrawn
//! from the set stops verifying at the next refresh. The refresh runs on the path of the request
//! that finds the set due. A failed refresh (unreachable, non-2xx, not JSON, not a key set,
//! larger than [`JwksOptions::max_body_bytes`]) is logged and retried at the floor interval; the
//! last good set stays in use until [`JwksOptions::stale_grace`] past its refresh time, after
//! which tokens are refused until a refresh succeeds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine;
use concord_config::{AuthSettings, StaticKey};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use parking_lot::RwLock;
use reqwest::header::{ACCEPT, AGE, CACHE_CONTROL, HeaderMap};
use serde_json::Value;
use tracing::Instrument;

use crate::AuthError;
use crate::clock::{Clock, SystemClock};
use crate::identity::Principal;

/// How the JWKS is fetched and kept fresh.
#[derive(Debug, Clone, PartialEq)]
pub struct JwksOptions {
    /// The scheduled refresh period, and the cap on a response's `max-age` (a longer one is
    /// cut to this, so a withdrawn key is never trusted longer).
    pub refresh_interval: Duration,
    /// The floor: a shorter `max-age` (or `no-cache`/`no-store`) is raised to this, and a failed
    /// refresh is retried this often.
    pub min_refresh_interval: Duration,
    /// An unknown `kid` refetches the set at most this often.
    pub unknown_kid_interval: Duration,
    /// While refreshes fail, the last good set stays in use this long past its refresh time.
    pub stale_grace: Duration,
    /// The largest JWKS response accepted.
    pub max_body_bytes: usize,
    /// Timeout of one fetch (connection, request and body).
    pub timeout: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(30),
            unknown_kid_interval: Duration::from_secs(1),
            stale_grace: Duration::from_secs(3600),
            max_body_bytes: 1024 * 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a JWKS fetch failed. The messages never name the URL: they reach callers in 401 answers.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS endpoint is unreachable: {0}")]
    Unreachable(String),
    #[error("the JWKS endpoint answered HTTP {0}")]
    Status(u16),
    #[error("the JWKS is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the JWKS endpoint did not answer JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("the JWKS endpoint answered JSON that is not a key set: {0}")]
    NotJwks(#[source] serde_json::Error),
}

impl JwksError {
    fn unreachable(error: reqwest::Error) -> Self {
        let error = error.without_url();
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Unreachable(reason)
    }
}

struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The key set last fetched from the JWKS URL, and the state of its schedule.
#[derive(Default)]
struct Published {
    keys: Vec<VerifyingKey>,
    /// When `keys` were fetched (None: never).
    fetched_at: Option<Instant>,
    /// How long after `fetched_at` they are due for a refresh.
    fresh_for: Duration,
    /// When the last fetch started, and why it failed if it did.
    attempted_at: Option<Instant>,
    last_error: Option<String>,
}

fn since(now: Instant, then: Instant) -> Duration {
    now.saturating_duration_since(then)
}

impl Published {
    fn due(&self, now: Instant, options: &JwksOptions) -> bool {
        match (self.attempted_at, &self.last_error) {
            (None, _) => true,
            (Some(at), Some(_)) => since(now, at) >= options.min_refresh_interval,
            (Some(_), None) => self
                .fetched_at
                .is_none_or(|at| since(now, at) >= self.fresh_for),
        }
    }

    /// Whether `keys` may still verify tokens: until `stale_grace` past their refresh time.
    fn usable(&self, now: Instant, options: &JwksOptions) -> bool {
        self.fetched_at
            .is_some_and(|at| since(now, at) < self.fresh_for.saturating_add(options.stale_grace))
    }
}

pub struct JwtVerifier {
    settings: AuthSettings,
    options: JwksOptions,
    clock: Arc<dyn Clock>,
    configured: Vec<VerifyingKey>,
    published: RwLock<Published>,
    /// Held while a JWKS fetch is under way: one at a time.
    fetching: tokio::sync::Mutex<()>,
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
fn published_keys(jwks: &[Jwk]) -> Vec<VerifyingKey> {
    let mut keys = Vec::new();
    for jwk in jwks {
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

/// A JWKS document. Each key is read on its own, so one key of a type this library does not
/// know does not make the whole set unreadable.
fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, JwksError> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let value: Value = serde_json::from_slice(body).map_err(JwksError::NotJson)?;
    let set: RawSet = serde_json::from_value(value).map_err(JwksError::NotJwks)?;
    let total = set.keys.len();
    let keys: Vec<Jwk> = set
        .keys
        .into_iter()
        .filter_map(|key| serde_json::from_value(key).ok())
        .collect();
    if keys.len() < total {
        tracing::debug!(
            skipped = total - keys.len(),
            "JWKS keys of an unknown type skipped"
        );
    }
    Ok(keys)
}

/// What the response's cache headers allow: `max-age` less `Age`, zero for `no-cache` or
/// `no-store`, None when they say nothing (or nothing readable).
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut max_age = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',') {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Some(Duration::ZERO);
            }
            if name.eq_ignore_ascii_case("max-age")
                && let Some(seconds) = argument.and_then(|a| a.parse::<u64>().ok())
            {
                max_age = Some(seconds);
            }
        }
    }
    let age = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    max_age.map(|seconds: u64| Duration::from_secs(seconds.saturating_sub(age)))
}

/// How long a fetched set is fresh: its `max-age` within [floor, interval], else the interval.
fn fresh_for(max_age: Option<Duration>, options: &JwksOptions) -> Duration {
    max_age
        .map_or(options.refresh_interval, |age| {
            age.min(options.refresh_interval)
        })
        .max(options.min_refresh_interval)
}

/// The URL without user info, query or fragment, for logs.
fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

fn kids(keys: &[VerifyingKey]) -> BTreeSet<String> {
    keys.iter()
        .map(|key| key.kid.clone().unwrap_or_else(|| "(no kid)".into()))
        .collect()
}

/// A time claim as seconds since the epoch; None when absent.
fn time_claim(claims: &Value, name: &str) -> Result<Option<f64>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_f64()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(Some)
            .ok_or_else(|| AuthError::Invalid(format!("the {name} claim is not a time"))),
    }
}

impl JwtVerifier {
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        Self::with_options(settings, JwksOptions::default(), Arc::new(SystemClock))
    }

    /// A verifier with its own JWKS schedule and clock (tests drive a `ManualClock`).
    pub fn with_options(
        settings: &AuthSettings,
        options: JwksOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuthError> {
        let configured = settings
            .keys
            .iter()
            .map(configured_key)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            settings: settings.clone(),
            http: reqwest::Client::builder()
                .timeout(options.timeout)
                .build()
                .map_err(|e| AuthError::Config(format!("HTTP client: {e}")))?,
            options,
            clock,
            configured,
            published: RwLock::new(Published::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// True when any JWT key source is configured.
    pub fn has_keys(&self) -> bool {
        !self.configured.is_empty() || self.settings.jwks_url.is_some()
    }

    /// Fetches the JWKS now (at start); a failure is logged, and retried on schedule or when a
    /// token needs it.
    pub async fn prefetch(&self) {
        if self.settings.jwks_url.is_some() {
            let _fetching = self.fetching.lock().await;
            let _ = self.fetch("start").await;
        }
    }

    /// The scheduled refresh, when it is due. Failures are logged, never returned: the last
    /// good set (if still usable) keeps serving.
    async fn refresh_if_due(&self) {
        if self.settings.jwks_url.is_none() {
            return;
        }
        let now = self.clock.now();
        let (due, usable) = {
            let published = self.published.read();
            (
                published.due(now, &self.options),
                published.usable(now, &self.options),
            )
        };
        if !due {
            return;
        }
        // While the current set is usable, a request that finds a fetch under way goes on with
        // it instead of waiting.
        let _fetching = if usable {
            match self.fetching.try_lock() {
                Ok(guard) => guard,
                Err(_) => return,
            }
        } else {
            self.fetching.lock().await
        };
        if self.published.read().due(self.clock.now(), &self.options) {
            let _ = self.fetch("schedule").await;
        }
    }

    /// The refetch for a token naming a key not in the set, rate-limited.
    async fn refresh_for_unknown_key(&self) -> Result<(), AuthError> {
        let _fetching = self.fetching.lock().await;
        let now = self.clock.now();
        let recent = self
            .published
            .read()
            .attempted_at
            .is_some_and(|at| since(now, at) < self.options.unknown_kid_interval);
        if recent {
            return Ok(());
        }
        self.fetch("unknown kid").await
    }

    /// Fetches the JWKS and installs it; on failure keeps the last good set. The caller holds
    /// `fetching`.
    async fn fetch(&self, trigger: &'static str) -> Result<(), AuthError> {
        let Some(url) = &self.settings.jwks_url else {
            return Ok(());
        };
        let span = tracing::info_span!("jwks_refresh", url = %redacted(url), trigger);
        async {
            let started = self.clock.now();
            let outcome = self.download(url).await;
            let mut published = self.published.write();
            published.attempted_at = Some(started);
            match outcome {
                Ok((jwks, max_age)) => {
                    let keys = published_keys(&jwks);
                    let fresh_for = fresh_for(max_age, &self.options);
                    let (before, after) = (kids(&published.keys), kids(&keys));
                    if published.fetched_at.is_none() || before != after {
                        tracing::info!(
                            keys = keys.len(),
                            added = ?after.difference(&before).collect::<Vec<_>>(),
                            removed = ?before.difference(&after).collect::<Vec<_>>(),
                            refresh_in_s = fresh_for.as_secs(),
                            "JWKS loaded"
                        );
                    } else {
                        tracing::debug!(
                            keys = keys.len(),
                            refresh_in_s = fresh_for.as_secs(),
                            "JWKS unchanged"
                        );
                    }
                    if keys.is_empty() {
                        tracing::warn!(
                            published = jwks.len(),
                            "the JWKS has no key this node can use"
                        );
                    }
                    published.keys = keys;
                    published.fetched_at = Some(started);
                    published.fresh_for = fresh_for;
                    published.last_error = None;
                    Ok(())
                }
                Err(error) => {
                    let message = error.to_string();
                    let retry_in_s = self.options.min_refresh_interval.as_secs();
                    match published.fetched_at {
                        Some(at) if published.usable(started, &self.options) => tracing::warn!(
                            %error,
                            age_s = since(started, at).as_secs(),
                            retry_in_s,
                            "JWKS refresh failed; keeping the last good key set"
                        ),
                        Some(at) => tracing::warn!(
                            %error,
                            age_s = since(started, at).as_secs(),
                            retry_in_s,
                            "JWKS refresh failed and the last good key set is too old to use"
                        ),
                        None => tracing::warn!(
                            %error,
                            retry_in_s,
                            "JWKS fetch failed; its tokens are refused until a fetch succeeds"
                        ),
                    }
                    published.last_error = Some(message.clone());
                    Err(AuthError::KeysUnavailable(message))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One GET of the JWKS: a 2xx answer of at most `max_body_bytes` that parses as a key set,
    /// with what its cache headers allow.
    async fn download(&self, url: &str) -> Result<(Vec<Jwk>, Option<Duration>), JwksError> {
        let mut response = self
            .http
            .get(url)
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .send()
            .await
            .map_err(JwksError::unreachable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(JwksError::Status(status.as_u16()));
        }
        let max_age = max_age(response.headers());
        let limit = self.options.max_body_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(JwksError::TooLarge { limit });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(JwksError::unreachable)? {
            if body.len() + chunk.len() > limit {
                return Err(JwksError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((parse_jwks(&body)?, max_age))
    }

    /// Checks `token` and returns who it names.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let (header_alg, kid) = peek_header(token)?;
        let Some(algorithm) = algorithm_named(&header_alg) else {
            return Err(AuthError::Invalid(format!(
                "algorithm {header_alg:?} is not accepted"
            )));
        };
        self.refresh_if_due().await;
        let mut outcome = self.verify_with_known_keys(token, algorithm, kid.as_deref());
        if matches!(outcome, Err(AuthError::UnknownKey)) && self.settings.jwks_url.is_some() {
            self.refresh_for_unknown_key().await?;
            outcome = self.verify_with_known_keys(token, algorithm, kid.as_deref());
        }
        if matches!(outcome, Err(AuthError::UnknownKey)) {
            outcome = Err(self.unknown_key(algorithm, kid.is_some()));
        }
        let claims = outcome?;
        self.check_times(&claims)?;
        self.principal(&claims)
    }

    /// Why no key was found: the JWKS is unavailable, or the token's key is unknown.
    fn unknown_key(&self, algorithm: Algorithm, has_kid: bool) -> AuthError {
        if self.settings.jwks_url.is_some() {
            let published = self.published.read();
            if !published.usable(self.clock.now(), &self.options)
                && let Some(error) = &published.last_error
            {
                return AuthError::KeysUnavailable(error.clone());
            }
        }
        if has_kid {
            AuthError::UnknownKey
        } else {
            AuthError::Invalid(format!(
                "the token names no key (`kid`) and no key verifies {algorithm:?}"
            ))
        }
    }

    fn verify_with_known_keys(
        &self,
        token: &str,
        algorithm: Algorithm,
        kid: Option<&str>,
    ) -> Result<Value, AuthError> {
        let published = self.published.read();
        let published_keys: &[VerifyingKey] = if published.usable(self.clock.now(), &self.options) {
            &published.keys
        } else {
            &[]
        };
        let known = self.configured.iter().chain(published_keys);
        let matching: Vec<&VerifyingKey> = match kid {
            Some(kid) => {
                let named: Vec<&VerifyingKey> = known
                    .filter(|key| key.kid.as_deref() == Some(kid))
                    .collect();
                if named.is_empty() {
                    return Err(AuthError::UnknownKey);
                }
                let matching: Vec<&VerifyingKey> = named
                    .into_iter()
                    .filter(|key| key.algorithm == algorithm)
                    .collect();
                if matching.is_empty() {
                    // The key exists but verifies another algorithm: algorithm confusion.
                    return Err(AuthError::Invalid(format!(
                        "the token's algorithm {algorithm:?} does not match its key's"
                    )));
                }
                matching
            }
            // Without a `kid`, only an unambiguous key will do.
            None => {
                let matching: Vec<&VerifyingKey> =
                    known.filter(|key| key.algorithm == algorithm).collect();
                match matching.len() {
                    0 => return Err(AuthError::UnknownKey),
                    1 => matching,
                    n => {
                        return Err(AuthError::Invalid(format!(
                            "the token names no key (`kid`) and {n} keys verify {algorithm:?}; \
                             it must name one"
                        )));
                    }
                }
            }
        };
        let mut last = AuthError::Invalid("signature does not verify".into());
        for key in matching {
            match jsonwebtoken::decode::<Value>(token, &key.key, &self.validation(algorithm)) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => continue,
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

    /// Signature, issuer, audience and the presence of `exp`; the times are checked by
    /// `check_times`, against this verifier's clock.
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
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

    /// `exp` and `nbf` with the leeway: accepted from `nbf - leeway` until before
    /// `exp + leeway` (RFC 7519 §4.1.4, §4.1.5).
    fn check_times(&self, claims: &Value) -> Result<(), AuthError> {
        let now = self
            .clock
            .wall()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = self.settings.leeway.as_secs_f64();
        let exp = time_claim(claims, "exp")?
            .ok_or_else(|| AuthError::Invalid("missing claim exp".into()))?;
        if now >= exp + leeway {
            return Err(AuthError::Invalid("token expired".into()));
        }
        if let Some(nbf) = time_claim(claims, "nbf")?
            && now + leeway < nbf
        {
            return Err(AuthError::Invalid("token not valid yet (nbf)".into()));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(reqwest::header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn cache_headers_give_the_max_age() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(max_age(&headers(&[])), None);
        assert_eq!(
            max_age(&headers(&[(CACHE_CONTROL, "public, max-age=120")])),
            secs(120)
        );
        assert_eq!(
            max_age(&headers(&[(
                CACHE_CONTROL,
                "Max-Age=\"90\", must-revalidate"
            )])),
            secs(90)
        );
        assert_eq!(
            max_age(&headers(&[(CACHE_CONTROL, "max-age=100"), (AGE, "40")])),
            secs(60)
        );
        assert_eq!(
            max_age(&headers(&[(CACHE_CONTROL, "max-age=100"), (AGE, "400")])),
            secs(0)
        );
        assert_eq!(
            max_age(&headers(&[(CACHE_CONTROL, "max-age=600, no-cache")])),
            secs(0)
        );
        assert_eq!(max_age(&headers(&[(CACHE_CONTROL, "no-store")])), secs(0));
        assert_eq!(max_age(&headers(&[(CACHE_CONTROL, "max-age=soon")])), None);
        assert_eq!(
            max_age(&headers(&[(
                CACHE_CONTROL,
                "max-age=99999999999999999999999"
            )])),
            None
        );
    }

    #[test]
    fn freshness_stays_between_the_floor_and_the_interval() {
        let options = JwksOptions::default();
        let secs = Duration::from_secs;
        assert_eq!(fresh_for(None, &options), secs(300));
        assert_eq!(fresh_for(Some(secs(120)), &options), secs(120));
        assert_eq!(fresh_for(Some(secs(0)), &options), secs(30));
        assert_eq!(fresh_for(Some(secs(29)), &options), secs(30));
        assert_eq!(fresh_for(Some(secs(86_400)), &options), secs(300));
        // A floor above the interval wins, and nothing panics.
        let odd = JwksOptions {
            refresh_interval: secs(10),
            min_refresh_interval: secs(20),
            ..JwksOptions::default()
        };
        assert_eq!(fresh_for(Some(secs(15)), &odd), secs(20));
    }

    #[test]
    fn a_jwks_body_is_read_key_by_key() {
        let body = serde_json::json!({"keys": [
            {"kty": "XYZ", "kid": "future"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed",
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        ]});
        let keys = parse_jwks(body.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(matches!(parse_jwks(b"<html>"), Err(JwksError::NotJson(_))));
        assert!(matches!(
            parse_jwks(br#"{"issuer": "x"}"#),
            Err(JwksError::NotJwks(_))
        ));
        assert!(matches!(
            parse_jwks(br#"{"keys": {}}"#),
            Err(JwksError::NotJwks(_))
        ));
    }

    #[test]
    fn logged_urls_carry_no_credentials() {
        assert_eq!(
            redacted("https://user:pw@idp.test/jwks.json?token=abc#x"),
            "https://idp.test/jwks.json"
        );
        assert_eq!(redacted("not a url"), "(not a URL)");
    }
}
