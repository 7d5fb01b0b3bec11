//! The mesh registry's model: entities (MCP servers, agents, LLM providers) with a name, a semver
//! version, capabilities, tags, an endpoint and a namespace; their health from heartbeats; and
//! resolution — a selector (capability, required / preferred / excluded tags, a version
//! requirement, a namespace) turned into an ordered candidate list with the score and the
//! reasons for every candidate, and the reasons every other entity was rejected. Pure: storage
//! and transport are the node's.

use std::collections::{BTreeMap, HashMap};

use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod net;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MeshError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A part of the registration is larger than the registry keeps.
    #[error("{field}: {size} bytes serialized, at most {limit}")]
    TooLarge {
        field: String,
        size: usize,
        limit: usize,
    },
}

impl MeshError {
    /// The field the error is about.
    pub fn field(&self) -> &str {
        match self {
            MeshError::Invalid { field, .. } | MeshError::TooLarge { field, .. } => field,
        }
    }
}

/// The most a registration's `metadata` may take, serialized as JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// The most capabilities, tags, dependencies (and tags of one dependency) a registration has.
pub const MAX_LIST_ITEMS: usize = 64;
/// The most words of a `command` endpoint, and the longest word.
const MAX_COMMAND_WORDS: usize = 64;
const MAX_COMMAND_WORD_LEN: usize = 4096;

fn invalid(field: &str, message: impl Into<String>) -> MeshError {
    MeshError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Server,
    Agent,
    Llm,
}

/// Where an entity is reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

impl Endpoint {
    /// What may be published of the endpoint: a URL without user information, query string
    /// or fragment, and of a command only the program's name (no directory, no arguments).
    pub fn public(&self) -> Endpoint {
        Endpoint {
            url: self.url.as_deref().map(net::public_url),
            command: self
                .command
                .first()
                .map(|program| vec![net::program_name(program)])
                .unwrap_or_default(),
        }
    }
}

/// What an entity reports about itself in a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    #[default]
    Healthy,
    Degraded,
    Unhealthy,
}

/// A registration as sent to `/api/v1/registry` (or written in config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub endpoint: Endpoint,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Seconds without a heartbeat after which the entity expires.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u64,
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
    /// Other entities this one needs, as selectors.
    #[serde(default)]
    pub dependencies: BTreeMap<String, Selector>,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_ttl() -> u64 {
    30
}

fn valid_word(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 128
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
}

impl Registration {
    /// Checks every field; the first problem is the error.
    pub fn validate(&self) -> Result<Version, MeshError> {
        // The name becomes the tool prefix (`NAME__tool`) when the entity is routed.
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !self.name.contains("__")
            && !self.name.starts_with('_')
            && !self.name.ends_with('_')
            && self.name != "concord";
        if !name_ok {
            return Err(invalid(
                "name",
                "1 to 64 letters, digits, '-' or '_' (no \"__\", not starting or ending with '_', not \"concord\"): it prefixes the entity's tools",
            ));
        }
        let version = Version::parse(&self.version).map_err(|e| {
            invalid(
                "version",
                format!(
                    "{:?} is not a semantic version (like 1.4.2): {e}",
                    self.version
                ),
            )
        })?;
        if self.capabilities.is_empty() {
            return Err(invalid("capabilities", "at least one capability"));
        }
        for (field, count) in [
            ("capabilities", self.capabilities.len()),
            ("tags", self.tags.len()),
            ("dependencies", self.dependencies.len()),
        ] {
            if count > MAX_LIST_ITEMS {
                return Err(invalid(
                    field,
                    format!("at most {MAX_LIST_ITEMS}, got {count}"),
                ));
            }
        }
        for (index, capability) in self.capabilities.iter().enumerate() {
            if !valid_word(capability) {
                return Err(invalid(
                    "capabilities",
                    format!("{capability:?} is not a valid name"),
                ));
            }
            // The catalog indexes an entity once per capability it lists: twice would count
            // it twice.
            if self.capabilities[..index].contains(capability) {
                return Err(invalid(
                    "capabilities",
                    format!("{capability:?} is listed twice"),
                ));
            }
        }
        for tag in &self.tags {
            if !valid_word(tag) || tag.starts_with(['+', '-']) {
                return Err(invalid("tags", format!("{tag:?} is not a valid tag")));
            }
        }
        if !valid_word(&self.namespace) {
            return Err(invalid(
                "namespace",
                "1 to 128 letters, digits, '-', '_', '.'",
            ));
        }
        match (&self.endpoint.url, self.endpoint.command.is_empty()) {
            (Some(url), true) => {
                if let Err(why) = net::HttpUrl::parse(url) {
                    return Err(invalid(
                        "endpoint.url",
                        format!("{why}, got {:?}", net::public_url(url)),
                    ));
                }
            }
            (None, false) => {
                if self.endpoint.command.len() > MAX_COMMAND_WORDS
                    || self
                        .endpoint
                        .command
                        .iter()
                        .any(|w| w.len() > MAX_COMMAND_WORD_LEN)
                {
                    return Err(invalid(
                        "endpoint.command",
                        format!(
                            "at most {MAX_COMMAND_WORDS} words of at most {MAX_COMMAND_WORD_LEN} characters"
                        ),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "endpoint",
                    "give exactly one of `url` and `command`",
                ));
            }
        }
        if self.ttl_seconds == 0 || self.ttl_seconds > 86_400 {
            return Err(invalid("ttl_seconds", "between 1 and 86400"));
        }
        for (name, selector) in &self.dependencies {
            let field = format!("dependencies.{name}");
            if !valid_word(name) {
                return Err(invalid(&field, "not a valid dependency name"));
            }
            if !valid_word(&selector.capability) {
                return Err(invalid(
                    &format!("{field}.capability"),
                    format!("{:?} is not a valid name", selector.capability),
                ));
            }
            if selector.tags.len() > MAX_LIST_ITEMS
                || selector.tags.iter().any(|t| t.len() > 129)
                || selector.version.as_ref().is_some_and(|v| v.len() > 256)
                || selector.namespace.as_ref().is_some_and(|n| !valid_word(n))
            {
                return Err(invalid(
                    &field,
                    format!(
                        "at most {MAX_LIST_ITEMS} tags of at most 128 characters, a version requirement of at most 256, a valid namespace"
                    ),
                ));
            }
        }
        let metadata = serde_json::to_string(&self.metadata)
            .map(|s| s.len())
            .unwrap_or(usize::MAX);
        if metadata > MAX_METADATA_BYTES {
            return Err(MeshError::TooLarge {
                field: "metadata".into(),
                size: metadata,
                limit: MAX_METADATA_BYTES,
            });
        }
        Ok(version)
    }
}

/// A registered entity as the registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    pub id: String,
    pub registration: Registration,
    pub health: Health,
    pub registered_at_ms: u64,
    pub last_heartbeat_ms: u64,
}

/// An entity's state now: its reported health, or `expired` when its heartbeats stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Healthy,
    Degraded,
    Unhealthy,
    Expired,
}

impl Entity {
    pub fn status(&self, now_ms: u64) -> Status {
        let ttl_ms = self.registration.ttl_seconds * 1000;
        if now_ms > self.last_heartbeat_ms + ttl_ms {
            return Status::Expired;
        }
        match self.health {
            Health::Healthy => Status::Healthy,
            Health::Degraded => Status::Degraded,
            Health::Unhealthy => Status::Unhealthy,
        }
    }
}

/// What a caller needs: a capability, tags (`t` required, `+t` preferred, `-t` excluded), a
/// version requirement and a namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub capability: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

struct ParsedSelector {
    required: Vec<String>,
    preferred: Vec<String>,
    excluded: Vec<String>,
    version: Option<VersionReq>,
}

impl Selector {
    fn parse(&self) -> Result<ParsedSelector, MeshError> {
        let mut parsed = ParsedSelector {
            required: Vec::new(),
            preferred: Vec::new(),
            excluded: Vec::new(),
            version: None,
        };
        for tag in &self.tags {
            let tag = tag.trim();
            if let Some(t) = tag.strip_prefix('+') {
                parsed.preferred.push(t.to_string());
            } else if let Some(t) = tag.strip_prefix('-') {
                parsed.excluded.push(t.to_string());
            } else if !tag.is_empty() {
                parsed.required.push(tag.to_string());
            }
        }
        if let Some(text) = &self.version {
            parsed.version = Some(VersionReq::parse(text).map_err(|e| {
                invalid(
                    "version",
                    format!("{text:?} is not a version requirement (like ^1.4 or >=2,<3): {e}"),
                )
            })?);
        }
        Ok(parsed)
    }
}

/// An entity that satisfies the selector, with why it ranks where it does.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    pub version: String,
    pub status: Status,
    pub score: i64,
    pub reasons: Vec<String>,
}

/// An entity that offers the capability in the namespace but does not satisfy the rest of the
/// selector, with why not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejected {
    pub id: String,
    pub name: String,
    pub version: String,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolution {
    pub candidates: Vec<Candidate>,
    pub rejected: Vec<Rejected>,
    /// The entities that were not considered at all, counted by reason (like "9960 entities
    /// lack capability search"), so a registry of any size is explained in a few lines.
    pub not_considered: Vec<String>,
}

/// The capability every server offers (MCP itself), so a selector may pick servers by tags
/// alone: `{ capability = "mcp", tags = ["sandbox"] }`.
pub const ANY_SERVER_CAPABILITY: &str = "mcp";

const PREFERRED_TAG: i64 = 10;
const DEGRADED: i64 = -30;

/// Entities indexed for resolution: by (namespace, capability), versions parsed once. Build it
/// when the registry changes, resolve against it many times.
pub struct Catalog {
    entities: Vec<Entity>,
    versions: Vec<Version>,
    by_offer: HashMap<(String, String), Vec<usize>>,
    per_namespace: HashMap<String, usize>,
}

impl Catalog {
    pub fn new(entities: Vec<Entity>) -> Self {
        let mut by_offer: HashMap<(String, String), Vec<usize>> = HashMap::new();
        let mut per_namespace: HashMap<String, usize> = HashMap::new();
        let mut versions = Vec::with_capacity(entities.len());
        for (index, entity) in entities.iter().enumerate() {
            let registration = &entity.registration;
            versions.push(Version::parse(&registration.version).unwrap_or(Version::new(0, 0, 0)));
            *per_namespace
                .entry(registration.namespace.clone())
                .or_default() += 1;
            let implied = (registration.kind == Kind::Server
                && !registration
                    .capabilities
                    .iter()
                    .any(|c| c == ANY_SERVER_CAPABILITY))
            .then_some(ANY_SERVER_CAPABILITY);
            for capability in registration
                .capabilities
                .iter()
                .map(String::as_str)
                .chain(implied)
            {
                by_offer
                    .entry((registration.namespace.clone(), capability.to_string()))
                    .or_default()
                    .push(index);
            }
        }
        Self {
            entities,
            versions,
            by_offer,
            per_namespace,
        }
    }

    pub fn entities(&self) -> &[Entity] {
        &self.entities
    }

    /// Ranks the entities for `selector`: candidates by score (then newest version, then name),
    /// each with its reasons; entities that offer the capability but fail the rest, with
    /// theirs; the others counted.
    pub fn resolve(&self, selector: &Selector, now_ms: u64) -> Result<Resolution, MeshError> {
        let wanted = selector.parse()?;
        let namespace = selector.namespace.as_deref().unwrap_or("default");
        let offering: &[usize] = self
            .by_offer
            .get(&(namespace.to_string(), selector.capability.clone()))
            .map_or(&[], Vec::as_slice);
        let mut candidates: Vec<(Candidate, &Version)> = Vec::new();
        let mut rejected = Vec::new();
        for &index in offering {
            let entity = &self.entities[index];
            let version = &self.versions[index];
            let registration = &entity.registration;
            let mut reasons = vec![format!("has capability {}", selector.capability)];
            let mut refusals = Vec::new();
            for tag in &wanted.required {
                if registration.tags.contains(tag) {
                    reasons.push(format!("has required tag {tag}"));
                } else {
                    refusals.push(format!("lacks required tag {tag}"));
                }
            }
            for tag in &wanted.excluded {
                if registration.tags.contains(tag) {
                    refusals.push(format!("has excluded tag {tag}"));
                }
            }
            if let Some(requirement) = &wanted.version {
                if requirement.matches(version) {
                    reasons.push(format!("version {version} satisfies {requirement}"));
                } else {
                    refusals.push(format!("version {version} does not satisfy {requirement}"));
                }
            }
            let status = entity.status(now_ms);
            match status {
                Status::Expired => refusals.push(format!(
                    "expired: no heartbeat for more than {} s",
                    registration.ttl_seconds
                )),
                Status::Unhealthy => refusals.push("reports itself unhealthy".into()),
                Status::Degraded | Status::Healthy => {}
            }
            if !refusals.is_empty() {
                rejected.push(Rejected {
                    id: entity.id.clone(),
                    name: registration.name.clone(),
                    version: registration.version.clone(),
                    reasons: refusals,
                });
                continue;
            }
            let mut score = 100;
            for tag in &wanted.preferred {
                if registration.tags.contains(tag) {
                    score += PREFERRED_TAG;
                    reasons.push(format!("has preferred tag {tag} (+{PREFERRED_TAG})"));
                } else {
                    reasons.push(format!("lacks preferred tag {tag}"));
                }
            }
            if status == Status::Degraded {
                score += DEGRADED;
                reasons.push(format!("degraded ({DEGRADED})"));
            }
            candidates.push((
                Candidate {
                    id: entity.id.clone(),
                    name: registration.name.clone(),
                    version: registration.version.clone(),
                    status,
                    score,
                    reasons,
                },
                version,
            ));
        }
        candidates.sort_by(|(a, av), (b, bv)| {
            b.score
                .cmp(&a.score)
                .then_with(|| bv.cmp(av))
                .then_with(|| a.name.cmp(&b.name))
                .then_with(|| a.id.cmp(&b.id))
        });
        let in_namespace = self.per_namespace.get(namespace).copied().unwrap_or(0);
        let elsewhere = self.entities.len() - in_namespace;
        let lacking = in_namespace - offering.len();
        let mut not_considered = Vec::new();
        if lacking > 0 {
            not_considered.push(format!(
                "{lacking} entities in namespace {namespace} lack capability {}",
                selector.capability
            ));
        }
        if elsewhere > 0 {
            not_considered.push(format!("{elsewhere} entities are in other namespaces"));
        }
        Ok(Resolution {
            candidates: candidates.into_iter().map(|(c, _)| c).collect(),
            rejected,
            not_considered,
        })
    }
}

/// Resolves against `entities` once (build a [`Catalog`] to resolve many times).
pub fn resolve(
    selector: &Selector,
    entities: &[Entity],
    now_ms: u64,
) -> Result<Resolution, MeshError> {
    Catalog::new(entities.to_vec()).resolve(selector, now_ms)
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
