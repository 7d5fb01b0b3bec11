//! The gateway's upstreams from the registry: every live registered replica of a name in the
//! routed namespace becomes an upstream of its pool; only changed bodies are read each tick.

use super::*;

/// How often the gateway's upstreams are reconciled with the registry: a registration, an
/// expiry or a deregistration reaches connected clients as `list_changed` within this (plus the
/// time to connect).
pub(super) const SYNC_EVERY: Duration = Duration::from_millis(250);

/// The upstream name of one replica: the entity's name and the hash that ends its id.
pub(super) fn replica_name(entity: &Entity) -> String {
    let suffix = entity.id.rsplit('.').next().unwrap_or_default();
    format!("{}@{suffix}", entity.registration.name)
}

/// Versions that may stand in for each other: the same major version (for 0.x, the same minor),
/// as a caret requirement would accept.
pub(super) fn compatibility_line(version: &semver::Version) -> (u64, u64) {
    if version.major > 0 {
        (version.major, 0)
    } else {
        (0, version.minor)
    }
}

/// One registry row as the sync keeps it between ticks.
pub(super) struct Cached {
    pub(super) etag: i64,
    pub(super) owner: String,
    /// None when the body does not parse (kept, so it is not read again every tick).
    pub(super) entity: Option<Entity>,
}

/// The registry as the sync last read it: every tick it reads each row's id, owner, body hash,
/// health and last heartbeat, and the bodies only of rows that are new or changed.
#[derive(Default)]
pub(super) struct Mirror {
    pub(super) rows: HashMap<String, Cached>,
    /// How many bodies were read so far.
    pub(super) bodies_read: usize,
}

impl Mirror {
    pub(super) async fn refresh(&mut self, store: &Store) -> Result<(), concord_store::StoreError> {
        let heads = store.registry_heads().await?;
        let changed: Vec<String> = heads
            .iter()
            .filter(|h| self.rows.get(&h.id).is_none_or(|c| c.etag != h.etag))
            .map(|h| h.id.clone())
            .collect();
        let mut bodies: HashMap<String, RegistryRow> = HashMap::new();
        for ids in changed.chunks(500) {
            for row in store.registry_rows(ids).await? {
                self.bodies_read += 1;
                bodies.insert(row.id.clone(), row);
            }
        }
        let present: HashSet<&str> = heads.iter().map(|h| h.id.as_str()).collect();
        self.rows.retain(|id, _| present.contains(id.as_str()));
        for head in &heads {
            if let Some(row) = bodies.remove(&head.id) {
                self.rows.insert(
                    head.id.clone(),
                    Cached {
                        etag: head.etag,
                        owner: head.owner.clone(),
                        entity: entity_of(&row),
                    },
                );
            }
            if let Some(cached) = self.rows.get_mut(&head.id) {
                cached.owner.clone_from(&head.owner);
                if let Some(entity) = &mut cached.entity {
                    entity.health = health_of(&head.health);
                    entity.last_heartbeat_ms = head.last_heartbeat_ms;
                }
            }
        }
        Ok(())
    }
}

/// Keeps the gateway's upstreams in step with the registry: every live server or agent of the
/// default namespace with a URL endpoint is a replica of the logical server named after it (its
/// tools as `NAME__tool`); replicas with one name and compatible versions (of several lines, the
/// newest) share the calls, balanced by load. One that expires, reports itself unhealthy or is
/// deregistered leaves. Names taken by configured servers stay theirs. Before a replica is
/// added its endpoint is checked again (this node's own address never; registrations made over
/// the API only where the address policy allows) and, over plain HTTP, pinned to the checked
/// address. Expired rows are pruned every minute, an hour after they expired.
pub async fn sync_upstreams(
    registry: RegistryState,
    gateway: concord_mcp::Gateway,
    agents: std::sync::Arc<crate::agents::Agents>,
    configured_entities: Vec<(String, Liveness)>,
    configured: Vec<String>,
    request_timeout: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    // replica upstream name → (pool, url as registered)
    let mut routed: BTreeMap<String, (String, String)> = Default::default();
    // replica upstream name → (url, when) of a replica that could not be routed
    let mut held_back: HashMap<String, (String, Instant)> = HashMap::new();
    let mut mirror = Mirror::default();
    let mut last_prune: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SYNC_EVERY) => {}
        }
        // Entities declared in the config live as long as the node does, with the health the
        // node sees of them.
        {
            let now = now_ms();
            let upstreams = gateway.status();
            let upstream_health =
                |name: &str| match upstreams.iter().find(|u| u.name == name).map(|u| u.state) {
                    Some("healthy") => Health::Healthy,
                    Some("starting") => Health::Degraded,
                    _ => Health::Unhealthy,
                };
            let mut pending = registry.beats.pending.lock();
            for (id, liveness) in &configured_entities {
                let health = match liveness {
                    Liveness::Declared => Health::Healthy,
                    Liveness::Upstream(name) => upstream_health(name),
                    Liveness::Provider(name) => match agents.provider_available(name) {
                        Some(false) => Health::Degraded,
                        _ => Health::Healthy,
                    },
                };
                pending.insert(id.clone(), (health, now));
            }
        }
        if let Err(e) = registry.beats.flush(&registry.store).await {
            tracing::warn!(error = %e, "writing heartbeats failed");
        }
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            match registry
                .store
                .prune_registry(now_ms(), PRUNE_GRACE.as_millis() as u64)
                .await
            {
                Ok((0, 0)) => {}
                Ok((rows, names)) => {
                    tracing::info!(rows, names, "pruned expired registrations and free names")
                }
                Err(e) => tracing::warn!(error = %e, "pruning the registry failed"),
            }
        }
        if let Err(e) = mirror.refresh(&registry.store).await {
            tracing::warn!(error = %e, "reading the registry failed");
            continue;
        }
        *registry.beats.known.lock() = mirror
            .rows
            .iter()
            .map(|(id, cached)| (id.clone(), cached.owner.clone()))
            .collect();
        let now = now_ms();
        // name → the newest compatibility line seen, and its live replicas
        type Line = ((u64, u64), Vec<(String, String, bool)>);
        let mut lines: BTreeMap<String, Line> = Default::default();
        for cached in mirror.rows.values() {
            let Some(entity) = &cached.entity else {
                continue;
            };
            let registration = &entity.registration;
            let live = matches!(
                entity.status(now),
                concord_mesh::Status::Healthy | concord_mesh::Status::Degraded
            );
            let Some(url) = &registration.endpoint.url else {
                continue;
            };
            if !live
                || registration.kind == Kind::Llm
                || registration.namespace != ROUTED_NAMESPACE
                || configured.contains(&registration.name)
            {
                continue;
            }
            let Ok(version) = semver::Version::parse(&registration.version) else {
                continue;
            };
            let line = compatibility_line(&version);
            let replica = (
                replica_name(entity),
                url.clone(),
                cached.owner == CONFIG_OWNER,
            );
            match lines.get_mut(&registration.name) {
                Some((current, replicas)) if *current == line => replicas.push(replica),
                Some((current, _)) if *current > line => {}
                _ => {
                    lines.insert(registration.name.clone(), (line, vec![replica]));
                }
            }
        }
        let desired: BTreeMap<String, (String, String, bool)> = lines
            .into_iter()
            .flat_map(|(pool, (_, replicas))| {
                replicas
                    .into_iter()
                    .map(move |(replica, url, declared)| (replica, (pool.clone(), url, declared)))
            })
            .collect();
        let stale: Vec<String> = routed
            .iter()
            .filter(|(name, (pool, url))| {
                desired
                    .get(*name)
                    .is_none_or(|(p, u, _)| p != pool || u != url)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            gateway.remove_upstream(&name);
            routed.remove(&name);
        }
        held_back.retain(|name, (url, at)| {
            desired.get(name).is_some_and(|(_, u, _)| u == url) && at.elapsed() < RETRY_HELD_BACK
        });
        for (name, (pool, url, declared)) in desired {
            if routed.contains_key(&name) || held_back.contains_key(&name) {
                continue;
            }
            let local = registry.policy.local_addr.get().copied();
            let addresses = (!declared).then_some(&registry.policy.addresses);
            let connect_url = match check_endpoint(&url, local, addresses).await {
                Ok(checked) if declared => checked.url.to_string(),
                Ok(checked) => checked.connect_url().await,
                Err(refusal) => {
                    tracing::warn!(replica = %name, endpoint = %concord_mesh::net::public_url(&url), %refusal, "a registered server is not routed");
                    held_back.insert(name, (url, Instant::now()));
                    continue;
                }
            };
            let spec = concord_config::ServerSpec::new(
                name.clone(),
                concord_config::TransportSpec::StreamableHttp {
                    url: connect_url,
                    headers: Default::default(),
                },
                request_timeout,
            );
            match gateway.add_replica(spec, Some(&pool)) {
                Ok(()) => {
                    routed.insert(name, (pool, url));
                }
                Err(e) => {
                    tracing::warn!(replica = %name, error = %e, "a registered server cannot be routed")
                }
            }
        }
    }
}
