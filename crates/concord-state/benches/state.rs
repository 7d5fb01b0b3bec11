//! Shared-state commit benchmark: read-modify-write increments by 1, 8 and 64 concurrent
//! writers, on one hot key and on disjoint keys, through Concord's state service on SQLite and
//! on PostgreSQL; beside, in the same run, the same workload with Redis optimistic transactions
//! (WATCH/MULTI/EXEC) and with a bare SQL compare-and-set UPDATE (the floor: what the database
//! itself costs, without history, sequence or idempotency).
//!
//! Every writer loops: read (value, version), write value+1 based on that version, retry on a
//! lost race. Reported: successful commits per second (goodput), and p50/p99 latency of a
//! successful commit (the write call that succeeded; retries show up as lower goodput).
//! Closed loop, so latencies do not include coordinated-omission queueing.
//!
//! Run: `./scripts/bench.sh state` (or `cargo bench -p concord-state --bench state`);
//! `BENCH_SECONDS` sets the time per point (default 3); `BENCH_ONLY=SQLite` (any part of a
//! row's store label) runs only the matching rows. Needs PostgreSQL
//! (CONCORD_TEST_POSTGRES) and Redis (CONCORD_BENCH_REDIS, default redis://127.0.0.1:6379).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use concord_state::{Author, Change, Op, StateError, StateOptions, StateService};
use concord_store::{AdminConnection, Store};
use serde_json::{Value, json};

#[derive(Clone, Copy)]
enum Workload {
    HotKey,
    Disjoint,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::HotKey => "one hot key",
            Workload::Disjoint => "disjoint keys",
        }
    }

    /// Each point has its own namespace (`bench{point}`), so points never share keys.
    fn key(self, writer: usize, point: usize) -> String {
        match self {
            Workload::HotKey => format!("bench{point}/hot"),
            Workload::Disjoint => format!("bench{point}/k{writer}"),
        }
    }
}

#[derive(Clone)]
enum Target {
    Concord(Arc<StateService>),
    Floor(Store),
    Redis(redis::aio::MultiplexedConnection, String),
}

/// One successful read-modify-write; returns how many attempts it took.
async fn increment(target: &mut Target, key: &str, round: usize) -> usize {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match target {
            Target::Concord(state) => {
                let read = state.get(key).await.expect("get");
                let n = read.value.as_ref().and_then(Value::as_i64).unwrap_or(0);
                let change = Change {
                    key: key.to_string(),
                    base_version: read.version,
                    ops: vec![Op::Set {
                        value: json!(n + 1),
                    }],
                    lease_token: None,
                };
                let author = Author {
                    principal: format!("bench-{round}"),
                    trace_id: None,
                };
                match state.put(vec![change], None, &author).await {
                    Ok(_) => return attempts,
                    Err(StateError::Conflict(_)) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
            Target::Floor(store) => {
                let (version, value) = store.floor_read(key).await.expect("read");
                if store.floor_cas(key, version, value + 1).await.expect("cas") {
                    return attempts;
                }
            }
            Target::Redis(conn, prefix) => {
                let full = format!("{prefix}{key}");
                let _: () = redis::cmd("WATCH")
                    .arg(&full)
                    .query_async(conn)
                    .await
                    .expect("watch");
                let n: Option<i64> = redis::cmd("GET")
                    .arg(&full)
                    .query_async(conn)
                    .await
                    .expect("get");
                let result: Option<Vec<redis::Value>> = redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(&full)
                    .arg(n.unwrap_or(0) + 1)
                    .query_async(conn)
                    .await
                    .expect("exec");
                if result.is_some() {
                    return attempts;
                }
            }
        }
    }
}

struct Point {
    commits: usize,
    attempts: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn run(
    target_for: impl Fn() -> Target,
    workload: Workload,
    writers: usize,
    duration: Duration,
    point: usize,
) -> Point {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let mut target = target_for();
        let stop = stop.clone();
        let key = workload.key(writer, point);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut attempts = 0;
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                attempts += increment(&mut target, &key, round).await;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                round += 1;
            }
            (latencies, attempts)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut attempts = 0;
    for task in tasks {
        let (latencies, a) = task.await.unwrap();
        all.extend(latencies);
        attempts += a;
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |q: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * q).round() as usize]
        }
    };
    Point {
        commits: all.len(),
        attempts,
        seconds,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
    }
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let duration = Duration::from_secs(seconds);
    let admin_url = std::env::var("CONCORD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let redis_url = std::env::var("CONCORD_BENCH_REDIS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());

    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open_sqlite(&dir.path().join("bench.db"))
        .await
        .unwrap();
    sqlite.floor_setup().await.unwrap();
    let database = format!("concord_bench_{}", std::process::id());
    let admin = AdminConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL");
    admin
        .execute(&format!("DROP DATABASE IF EXISTS {database}"))
        .await
        .unwrap();
    admin
        .execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    let pg_url = format!(
        "{}/{database}",
        admin_url
            .split('?')
            .next()
            .unwrap()
            .rsplit_once('/')
            .unwrap()
            .0
    );
    let postgres = Store::open_postgres(&pg_url).await.unwrap();
    postgres.floor_setup().await.unwrap();
    let redis_client = redis::Client::open(redis_url.as_str()).expect("redis url");

    let mut report = format!(
        "read-modify-write increments, closed loop, {seconds} s per point; goodput = successful commits/s\n\n\
         | workload | writers | store | commits/s | attempts per commit | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|\n"
    );
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let mut run_id = 0;
    for workload in [Workload::HotKey, Workload::Disjoint] {
        for writers in [1usize, 8, 64] {
            for label in [
                "Concord on SQLite",
                "bare CAS on SQLite",
                "Concord on PostgreSQL",
                "bare CAS on PostgreSQL",
                "Redis WATCH/MULTI/EXEC",
            ] {
                if !label.contains(only.as_str()) {
                    continue;
                }
                run_id += 1;
                let point = match label {
                    "Concord on SQLite" | "Concord on PostgreSQL" => {
                        let store = if label.ends_with("SQLite") {
                            sqlite.clone()
                        } else {
                            postgres.clone()
                        };
                        let state =
                            Arc::new(StateService::new(store, StateOptions::default()).unwrap());
                        run(
                            move || Target::Concord(state.clone()),
                            workload,
                            writers,
                            duration,
                            run_id,
                        )
                        .await
                    }
                    "bare CAS on SQLite" | "bare CAS on PostgreSQL" => {
                        let store = if label.ends_with("SQLite") {
                            sqlite.clone()
                        } else {
                            postgres.clone()
                        };
                        run(
                            move || Target::Floor(store.clone()),
                            workload,
                            writers,
                            duration,
                            run_id,
                        )
                        .await
                    }
                    _ => {
                        let mut conns = Vec::new();
                        for _ in 0..writers {
                            conns.push(
                                redis_client
                                    .get_multiplexed_async_connection()
                                    .await
                                    .expect("redis"),
                            );
                        }
                        let conns = Arc::new(parking_lot::Mutex::new(conns));
                        let prefix = format!("concord-bench:{}:{run_id}:", std::process::id());
                        run(
                            move || {
                                Target::Redis(
                                    conns.lock().pop().expect("a connection per writer"),
                                    prefix.clone(),
                                )
                            },
                            workload,
                            writers,
                            duration,
                            run_id,
                        )
                        .await
                    }
                };
                let line = format!(
                    "| {} | {writers} | {label} | {:.0} | {:.2} | {:.3} | {:.3} |\n",
                    workload.label(),
                    point.commits as f64 / point.seconds,
                    point.attempts as f64 / point.commits.max(1) as f64,
                    point.p50_ms,
                    point.p99_ms,
                );
                eprint!("{line}");
                report.push_str(&line);
            }
        }
    }
    postgres.close().await;
    admin
        .execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await
        .unwrap();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("state.md"), &report).unwrap();
    println!("{report}");
}
