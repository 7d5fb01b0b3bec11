//! Test support shared by Concord's integration and end-to-end tests: locating the workspace's
//! built binaries and the real peers installed by the test command, picking free ports, and
//! throwaway PostgreSQL databases ([`PgTestDatabase`]).
//! A dev-dependency only; nothing here is compiled into the product.

mod postgres;

use std::path::PathBuf;

pub use postgres::{DEFAULT_TEST_POSTGRES, PgTestDatabase};

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .expect("crate lives in crates/NAME")
        .to_path_buf()
}

/// A binary built from this workspace (`cargo build --workspace --bins` puts them beside the
/// test executables' `deps` directory).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .map(|deps| {
            if deps.ends_with("deps") {
                deps.parent().unwrap_or(deps)
            } else {
                deps
            }
        })
        .expect("exe dir")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The `node_modules` of the real MCP peers (installed by `scripts/test.sh` from the lockfile).
pub fn peers_node_modules() -> PathBuf {
    let path = workspace_root().join("tests/peers/node_modules");
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh (it runs `npm ci` in tests/peers)",
        path.display()
    );
    path
}

/// A TCP port that was free a moment ago on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
