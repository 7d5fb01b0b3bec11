//! Resolution latency over a registry of 10,000 entities: p50 / p99 of `resolve` for a typical
//! selector (capability, a required, a preferred and an excluded tag, a semver requirement).
//! Pure CPU: no store, no HTTP. Run: `cargo bench -p concord-mesh --bench resolve`.

use std::time::Instant;

use concord_mesh::{Catalog, Endpoint, Entity, Health, Kind, Registration, Selector};

fn main() {
    const ENTITIES: usize = 10_000;
    const CAPABILITIES: usize = 50;
    let entities: Vec<Entity> = (0..ENTITIES)
        .map(|i| Entity {
            id: format!("default.e{i}"),
            registration: Registration {
                name: format!("e{i}"),
                version: format!("{}.{}.{}", 1 + i % 3, i % 10, i % 7),
                kind: Kind::Server,
                capabilities: vec![format!("cap{}", i % CAPABILITIES)],
                tags: ["prod", "gpu", "eu", "staging"]
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| (i >> k) & 1 == 1)
                    .map(|(_, t)| t.to_string())
                    .collect(),
                endpoint: Endpoint {
                    url: Some(format!("http://10.0.{}.{}:9000/mcp", i / 250, i % 250)),
                    command: vec![],
                },
                namespace: if i % 10 == 0 { "tenant-b" } else { "default" }.into(),
                ttl_seconds: 30,
                metadata: Default::default(),
                dependencies: Default::default(),
            },
            health: if i % 17 == 0 {
                Health::Degraded
            } else {
                Health::Healthy
            },
            registered_at_ms: 0,
            last_heartbeat_ms: 1_000_000,
        })
        .collect();
    let selector = Selector {
        capability: "cap7".into(),
        tags: vec!["prod".into(), "+gpu".into(), "-staging".into()],
        version: Some("^1.2".into()),
        namespace: None,
    };
    let built = Instant::now();
    let catalog = Catalog::new(entities);
    let build_time = built.elapsed();
    let mut samples = Vec::with_capacity(2000);
    let mut candidates = 0;
    for _ in 0..2000 {
        let started = Instant::now();
        let resolution = catalog.resolve(&selector, 1_001_000).unwrap();
        samples.push(started.elapsed());
        candidates = resolution.candidates.len();
    }
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "resolve over {ENTITIES} entities ({candidates} candidates): p50 {:?}, p99 {:?} (index built in {build_time:?})",
        pick(0.5),
        pick(0.99)
    );
}
