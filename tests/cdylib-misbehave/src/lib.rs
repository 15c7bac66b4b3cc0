//! A native connector (Rust SDK) that misbehaves on request. app_id `misbehave`.
//!
//! - `echo`: answers `{"response": <input>}`.
//! - `panic`: panics inside `call`.
//! - `panic_in_thread`: panics on another thread while holding the completion.
//! - `abort`: aborts the process.
//! - `hang`: never answers unless cancelled; `hanging` answers how many calls hang now;
//!   `cancelled` how many cancels arrived.
//! - `leak`: logs its `auth` and `credentials` (secrets included) through the host's log
//!   callback, and on stderr too when `request.stderr` is true; then answers.
//! - `block`: sleeps `request.ms` milliseconds inside `start_call` (against the ABI's rule that
//!   it returns at once), then answers; `most_blocking` answers how many `block` calls were
//!   ever inside `start_call` at the same time.
// deny, not forbid: `export_connector!` generates the entry symbol.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use lumos_connector_abi::sdk::{CallRequest, Completion, Connector, Host};

/// Holds hanging calls until they are cancelled.
#[derive(Debug)]
pub struct Misbehave {
    host: Host,
    hanging: Mutex<HashMap<u64, Completion>>,
    cancels: Mutex<u64>,
    /// `block` calls inside `start_call` now, and the most there ever were.
    blocking: AtomicUsize,
    most_blocking: AtomicUsize,
}

impl Connector for Misbehave {
    fn new(host: Host) -> Self {
        Self {
            host,
            hanging: Mutex::default(),
            cancels: Mutex::default(),
            blocking: AtomicUsize::new(0),
            most_blocking: AtomicUsize::new(0),
        }
    }

    fn info(&self) -> String {
        serde_json::json!({
            "app_id": "misbehave",
            "version": "1.0.0",
            "capabilities": ["echo", "panic", "panic_in_thread", "abort", "hang", "hanging", "cancelled", "leak", "block", "most_blocking"],
        })
        .to_string()
    }

    fn call(&self, call: CallRequest, done: Completion) {
        match call.capability.as_str() {
            "echo" => {
                let input: serde_json::Value =
                    serde_json::from_slice(&call.input).unwrap_or_default();
                done.ok(serde_json::json!({"response": input})
                    .to_string()
                    .as_bytes());
            }
            "leak" => {
                let input: serde_json::Value =
                    serde_json::from_slice(&call.input).unwrap_or_default();
                let line = format!(
                    "leak: my auth is {} and my credentials are {}",
                    input["auth"], input["credentials"]
                );
                self.host
                    .log(lumos_connector_abi::ffi::log_level::INFO, &line);
                if input["request"]["stderr"] == true {
                    eprintln!("{line}");
                }
                done.ok(br#"{"response": {"leaked": true}}"#);
            }
            "block" => {
                let input: serde_json::Value =
                    serde_json::from_slice(&call.input).unwrap_or_default();
                let ms = input["request"]["ms"].as_u64().unwrap_or(0);
                let now = self.blocking.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_blocking.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                self.blocking.fetch_sub(1, Ordering::SeqCst);
                done.ok(serde_json::json!({"response": {"blocked_ms": ms}})
                    .to_string()
                    .as_bytes());
            }
            "most_blocking" => {
                let n = self.most_blocking.load(Ordering::SeqCst);
                done.ok(serde_json::json!({"response": {"most_blocking": n}})
                    .to_string()
                    .as_bytes());
            }
            "panic" => panic!("misbehave: asked to panic"),
            "panic_in_thread" => {
                std::thread::spawn(move || {
                    let _done = done;
                    panic!("misbehave: asked to panic on another thread");
                });
            }
            "abort" => std::process::abort(),
            "hang" => {
                self.hanging
                    .lock()
                    .expect("lock")
                    .insert(call.call_id, done);
            }
            "hanging" => {
                let n = self.hanging.lock().expect("lock").len();
                done.ok(serde_json::json!({"response": {"hanging": n}})
                    .to_string()
                    .as_bytes());
            }
            "cancelled" => {
                let n = *self.cancels.lock().expect("lock");
                done.ok(serde_json::json!({"response": {"cancelled": n}})
                    .to_string()
                    .as_bytes());
            }
            other => done.error(&lumos_connector_abi::sdk::error_json(&format!(
                "no capability {other}"
            ))),
        }
    }

    fn cancel(&self, call_id: u64) {
        *self.cancels.lock().expect("lock") += 1;
        if let Some(done) = self.hanging.lock().expect("lock").remove(&call_id) {
            done.cancelled();
        }
    }
}

lumos_connector_abi::export_connector!(Misbehave, id = "misbehave", version = "1.0.0");
