//! Logging: tracing to stderr (journald picks it up), human or JSON lines. The filter can be
//! changed while running (SIGHUP with a new `log.level`).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the installed subscriber's filter; set by [`init`].
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level` (for debugging a
/// running install without editing its config).
pub fn init(log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_filter_reloading();
    let handle = builder.reload_handle();
    let installed = match log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => {
            // The JSON builder is another type; it gets its own reload handle.
            let builder = tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .json()
                .flatten_event(true)
                .with_filter_reloading();
            let json_handle = builder.reload_handle();
            let result = builder.try_init();
            if result.is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| {
                    json_handle.reload(f).map_err(|e| e.to_string())
                }));
            }
            return;
        }
    };
    // A second init (tests) is harmless: the first subscriber stays.
    if installed.is_ok() {
        let _ = SET_FILTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
    }
}

/// Changes the log filter of the running agent.
pub fn set_filter(level: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("{level:?} is not a log filter: {e}"))?;
    match SET_FILTER.get() {
        Some(set) => set(filter),
        None => Err("logging was not initialised by the agent".into()),
    }
}
