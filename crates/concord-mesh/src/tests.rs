use super::*;

const NOW: u64 = 1_000_000;

fn entity(id: &str, version: &str, tags: &[&str], namespace: &str, health: Health) -> Entity {
    Entity {
        id: id.into(),
        registration: Registration {
            name: id.split('@').next().unwrap().into(),
            version: version.into(),
            kind: Kind::Server,
            capabilities: vec!["search".into()],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            endpoint: Endpoint {
                url: Some(format!("http://127.0.0.1:1/{id}")),
                command: vec![],
            },
            namespace: namespace.into(),
            ttl_seconds: 10,
            metadata: Default::default(),
            dependencies: Default::default(),
        },
        health,
        registered_at_ms: 0,
        last_heartbeat_ms: NOW - 1000,
    }
}

fn fleet() -> Vec<Entity> {
    let mut expired = entity(
        "stale@1",
        "1.9.0",
        &["prod", "gpu"],
        "default",
        Health::Healthy,
    );
    expired.last_heartbeat_ms = NOW - 60_000;
    let mut other_capability = entity("cache@1", "1.5.0", &["prod"], "default", Health::Healthy);
    other_capability.registration.capabilities = vec!["kv".into()];
    vec![
        entity("alpha@1", "1.4.2", &["prod"], "default", Health::Healthy),
        entity(
            "beta@1",
            "1.6.0",
            &["prod", "gpu"],
            "default",
            Health::Healthy,
        ),
        entity(
            "gamma@2",
            "2.1.0",
            &["prod", "gpu"],
            "default",
            Health::Healthy,
        ),
        entity(
            "delta@1",
            "1.5.0",
            &["prod", "gpu", "eu"],
            "default",
            Health::Degraded,
        ),
        entity("eps@1", "1.7.0", &["staging"], "default", Health::Healthy),
        entity("zeta@1", "1.8.0", &["prod"], "tenant-b", Health::Healthy),
        entity("sick@1", "1.8.0", &["prod"], "default", Health::Unhealthy),
        expired,
        other_capability,
    ]
}

fn selector(tags: &[&str], version: Option<&str>, namespace: Option<&str>) -> Selector {
    Selector {
        capability: "search".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        version: version.map(str::to_string),
        namespace: namespace.map(str::to_string),
    }
}

fn ranked(resolution: &Resolution) -> Vec<&str> {
    resolution
        .candidates
        .iter()
        .map(|c| c.id.as_str())
        .collect()
}

fn rejection<'a>(resolution: &'a Resolution, id: &str) -> &'a [String] {
    &resolution
        .rejected
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("{id} was not rejected"))
        .reasons
}

#[test]
fn selector_cases_rank_and_explain() {
    struct Case {
        tags: &'static [&'static str],
        version: Option<&'static str>,
        namespace: Option<&'static str>,
        expected: &'static [&'static str],
    }
    let cases = [
        // Required tag only: every healthy or degraded prod entity; the degraded one last,
        // ties by newest version.
        Case {
            tags: &["prod"],
            version: None,
            namespace: None,
            expected: &["gamma@2", "beta@1", "alpha@1", "delta@1"],
        },
        // A preferred tag lifts those that have it.
        Case {
            tags: &["prod", "+gpu"],
            version: None,
            namespace: None,
            expected: &["gamma@2", "beta@1", "alpha@1", "delta@1"],
        },
        // Two preferred tags bring the degraded delta to 90 (100 + 10 + 10 - 30): still below
        // a healthy entity without them (100).
        Case {
            tags: &["prod", "+gpu", "+eu"],
            version: None,
            namespace: None,
            expected: &["gamma@2", "beta@1", "alpha@1", "delta@1"],
        },
        // Without the degradation penalty mattering: eu alone over gpu alone.
        Case {
            tags: &["+eu"],
            version: Some(">=1.5, <1.7"),
            namespace: None,
            expected: &["beta@1", "delta@1"],
        },
        // Excluded tag.
        Case {
            tags: &["prod", "-gpu"],
            version: None,
            namespace: None,
            expected: &["alpha@1"],
        },
        // Semver caret and ranges.
        Case {
            tags: &["prod"],
            version: Some("^1.4"),
            namespace: None,
            expected: &["beta@1", "alpha@1", "delta@1"],
        },
        Case {
            tags: &[],
            version: Some(">=2, <3"),
            namespace: None,
            expected: &["gamma@2"],
        },
        Case {
            tags: &[],
            version: Some(">=1.5, <1.7"),
            namespace: None,
            expected: &["beta@1", "delta@1"],
        },
        // Namespaces are tenants: only that one's entities.
        Case {
            tags: &["prod"],
            version: None,
            namespace: Some("tenant-b"),
            expected: &["zeta@1"],
        },
    ];
    for (index, case) in cases.iter().enumerate() {
        let resolution = resolve(
            &selector(case.tags, case.version, case.namespace),
            &fleet(),
            NOW,
        )
        .unwrap_or_else(|e| panic!("case {index}: {e}"));
        assert_eq!(ranked(&resolution), case.expected, "case {index}");
        // Every entity is accounted for: a candidate, a rejection, or counted as not considered.
        let counted: usize = resolution
            .not_considered
            .iter()
            .map(|line| line.split(' ').next().unwrap().parse::<usize>().unwrap())
            .sum();
        assert_eq!(
            resolution.candidates.len() + resolution.rejected.len() + counted,
            fleet().len(),
            "case {index}: {resolution:?}"
        );
    }
}

#[test]
fn every_candidate_and_rejection_says_why() {
    let resolution = resolve(
        &selector(&["prod", "+gpu", "-staging"], Some("^1.4"), None),
        &fleet(),
        NOW,
    )
    .unwrap();
    let beta = &resolution.candidates[0];
    assert_eq!(beta.id, "beta@1");
    assert_eq!(beta.score, 110);
    assert!(beta.reasons.contains(&"has capability search".to_string()));
    assert!(beta.reasons.contains(&"has required tag prod".to_string()));
    assert!(
        beta.reasons
            .contains(&"has preferred tag gpu (+10)".to_string())
    );
    assert!(
        beta.reasons
            .contains(&"version 1.6.0 satisfies ^1.4".to_string())
    );
    let delta = resolution
        .candidates
        .iter()
        .find(|c| c.id == "delta@1")
        .unwrap();
    assert_eq!(delta.score, 80);
    assert!(delta.reasons.contains(&"degraded (-30)".to_string()));

    assert!(
        rejection(&resolution, "gamma@2")
            .contains(&"version 2.1.0 does not satisfy ^1.4".to_string())
    );
    let eps = rejection(&resolution, "eps@1");
    assert!(eps.contains(&"lacks required tag prod".to_string()));
    assert!(eps.contains(&"has excluded tag staging".to_string()));
    assert!(rejection(&resolution, "sick@1").contains(&"reports itself unhealthy".to_string()));
    assert!(
        rejection(&resolution, "stale@1")
            .contains(&"expired: no heartbeat for more than 10 s".to_string())
    );
    // Entities that do not offer the capability here are counted, not listed one by one.
    assert_eq!(
        resolution.not_considered,
        vec![
            "1 entities in namespace default lack capability search".to_string(),
            "1 entities are in other namespaces".to_string()
        ]
    );
}

#[test]
fn bad_registrations_and_selectors_are_named() {
    let mut registration = entity("x@1", "1.0.0", &[], "default", Health::Healthy).registration;
    assert_eq!(registration.validate(), Ok(Version::new(1, 0, 0)));
    registration.version = "one".into();
    let err = registration.validate().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("version: \"one\" is not a semantic version"),
        "{err}"
    );
    registration.version = "1.0.0".into();
    registration.endpoint = Endpoint {
        url: Some("ftp://x".into()),
        command: vec![],
    };
    assert!(
        registration
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("endpoint.url")
    );
    registration.endpoint = Endpoint {
        url: Some("http://x".into()),
        command: vec!["x".into()],
    };
    assert!(
        registration
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("endpoint:")
    );
    let unknown: Result<Registration, _> = serde_json::from_str(
        r#"{"name":"a","version":"1.0.0","kind":"server","capabilities":["c"],"endpoint":{"url":"http://x"},"colour":"red"}"#,
    );
    assert!(
        unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `colour`")
    );
    let err = resolve(&selector(&[], Some("about two"), None), &fleet(), NOW).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("version: \"about two\" is not a version requirement")
    );
}

#[test]
fn every_server_offers_mcp_so_tags_alone_pick_servers() {
    let mut entities = fleet();
    let mut provider = entity("llm@1", "1.0.0", &["prod"], "default", Health::Healthy);
    provider.registration.kind = Kind::Llm;
    provider.registration.capabilities = vec!["llm".into()];
    entities.push(provider);
    let by_tags = Selector {
        capability: ANY_SERVER_CAPABILITY.into(),
        tags: vec!["prod".into(), "-gpu".into()],
        ..Selector::default()
    };
    let resolution = resolve(&by_tags, &entities, NOW).unwrap();
    // Servers of any capability ("search", "kv") qualify; an LLM provider never does.
    assert_eq!(ranked(&resolution), vec!["cache@1", "alpha@1"]);
    assert!(
        resolution.candidates[0]
            .reasons
            .contains(&"has capability mcp".to_string())
    );
    assert_eq!(rejection(&resolution, "beta@1"), ["has excluded tag gpu"]);
}

#[test]
fn registrations_are_bounded() {
    let base = entity("x@1", "1.0.0", &[], "default", Health::Healthy).registration;
    let mut big = base.clone();
    big.metadata
        .insert("blob".into(), Value::String("a".repeat(MAX_METADATA_BYTES)));
    match big.validate().unwrap_err() {
        MeshError::TooLarge { field, size, limit } => {
            assert_eq!(field, "metadata");
            assert!(size > limit && limit == MAX_METADATA_BYTES);
        }
        other => panic!("{other}"),
    }
    let mut fits = base.clone();
    fits.metadata.insert(
        "blob".into(),
        Value::String("a".repeat(MAX_METADATA_BYTES - 100)),
    );
    assert!(fits.validate().is_ok());
    let mut tags = base.clone();
    tags.tags = (0..=MAX_LIST_ITEMS).map(|i| format!("t{i}")).collect();
    assert_eq!(tags.validate().unwrap_err().field(), "tags");
    let mut deps = base.clone();
    deps.dependencies.insert(
        "db".into(),
        Selector {
            capability: "sql".into(),
            tags: vec!["x".repeat(500)],
            ..Selector::default()
        },
    );
    assert_eq!(deps.validate().unwrap_err().field(), "dependencies.db");
    let mut command = base;
    command.endpoint = Endpoint {
        url: None,
        command: vec!["x".repeat(5000)],
    };
    assert_eq!(command.validate().unwrap_err().field(), "endpoint.command");
}

#[test]
fn the_public_endpoint_keeps_no_secret() {
    let url = Endpoint {
        url: Some("https://svc:hunter2@db.internal:5432/mcp?token=abc#x".into()),
        command: vec![],
    };
    assert_eq!(
        url.public().url.as_deref(),
        Some("https://db.internal:5432/mcp")
    );
    let command = Endpoint {
        url: None,
        command: vec![
            "/opt/tools/bin/server".into(),
            "--password".into(),
            "hunter2".into(),
        ],
    };
    assert_eq!(command.public().command, vec!["server".to_string()]);
}
