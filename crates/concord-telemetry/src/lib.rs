//! Telemetry shared by every request path: `tracing` subscriber set-up and the Prometheus
//! metrics registry rendered at `/metrics`. No MCP or HTTP types live here, so every crate can
//! record into it without pulling in a transport.

mod metrics;

pub use metrics::{Metrics, Outcome};

/// Installs the global `tracing` subscriber: human-readable lines on stderr, filtered by
/// `CONCORD_LOG` (or `RUST_LOG`), defaulting to `info`. Calling it twice is harmless.
pub fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = std::env::var("CONCORD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,rmcp=warn".to_string());
    let _ = fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
