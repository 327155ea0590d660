//! The runner's logs: `tracing` events on stderr, filtered by `RUST_LOG`.
//! stdout stays for command results (and, in a pod, the report as the last line).

use tracing_subscriber::EnvFilter;

/// Installs the subscriber. `default_level` applies when `RUST_LOG` is unset:
/// `info` in pods (their logs are what `kubectl logs` shows), `warn` for the
/// interactive commands, whose progress bars and results are their output.
pub fn init(default_level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(EnvFilter::new)
        .unwrap_or_else(|| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a person at a terminal, never in pod logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
