//! A fake Lumos cloud for connector developers: start it, point an agent at it, type calls,
//! see the results.
//!
//! ```text
//! cargo run -p lumos-agent-integration --bin lumos-fake-cloud -- --listen 127.0.0.1:50051
//! ```
//!
//! It prints the `[cloud]` section to give the agent, writes the agent token file, then reads
//! commands on stdin:
//!
//! - `call <app_id> <capability> [tenant_id] [json envelope]` — sends a call; its result is
//!   printed (and acknowledged) when it arrives, and more commands may be typed meanwhile;
//!   `""` or `-` as the tenant is none;
//! - `cancel <call_id>` — stops a call still waiting for its result;
//! - `inventory` — prints the agent's last inventory;
//! - `quit`.
//!
//! A result whose chunks break the protocol (out of order, or a status that changes between
//! chunks) is reported as a protocol violation and dropped without an acknowledgement, so the
//! agent sends it again on its next stream.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lumos_agent_integration::fake_cloud::{FakeCloud, FakeCloudOptions};
use lumos_agent_proto::v1::{agent_message, ConnectorStatus};
use tokio::io::AsyncBufReadExt;

/// A line to stdout. When whoever reads it has gone (`lumos-fake-cloud | head`), the fake
/// cloud ends quietly, as the agent's CLI does; `println!` would panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// A line to stderr; a closed stderr loses it and nothing else.
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

const USAGE: &str = "usage: lumos-fake-cloud [--listen ADDR] [--token-file PATH] [--heartbeat-ms N] [--chunk-bytes N]";

fn parse_args() -> Result<(SocketAddr, PathBuf, FakeCloudOptions), String> {
    let mut listen: SocketAddr = "127.0.0.1:50051".parse().map_err(|_| "bad default")?;
    let mut token_file = PathBuf::from("fake-cloud-token");
    let mut options = FakeCloudOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--token-file" => token_file = PathBuf::from(value()?),
            "--heartbeat-ms" => {
                options.heartbeat_interval_ms = value()?
                    .parse()
                    .map_err(|e| format!("--heartbeat-ms: {e}"))?;
            }
            "--chunk-bytes" => {
                options.max_chunk_size = value()?
                    .parse()
                    .map_err(|e| format!("--chunk-bytes: {e}"))?;
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok((listen, token_file, options))
}

fn write_token(path: &PathBuf, token: &str) -> std::io::Result<PathBuf> {
    use lumos_agent::platform::OpenOptionsExt;
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{token}")?;
    std::path::absolute(path)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let (listen, token_file, options) = match parse_args() {
        Ok(parsed) => parsed,
        Err(message) => {
            tell!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    let token_path = match write_token(&token_file, &options.token) {
        Ok(path) => path,
        Err(e) => {
            tell!("cannot write the token file {}: {e}", token_file.display());
            return std::process::ExitCode::from(1);
        }
    };
    let cloud = match FakeCloud::bind(options, listen).await {
        Ok(cloud) => cloud,
        Err(e) => {
            tell!("cannot listen on {listen}: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    say!("fake Lumos cloud listening on {}", cloud.endpoint());
    say!("give the agent this (e.g. append it to its agent.toml):\n");
    say!(
        "[cloud]\nendpoint = \"{}\"\nallow_insecure = true\ntoken_file = {:?}\n",
        cloud.endpoint(),
        token_path.display().to_string()
    );
    say!("commands: call <app_id> <capability> [tenant_id] [json envelope] | cancel <call_id> | inventory | quit");
    say!("waiting for the agent…");

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut session = None;
    let mut next_call = 1u64;
    // Calls sent and not answered yet (a result may come on a later session).
    let mut pending = std::collections::BTreeSet::new();
    loop {
        if session.is_none() {
            tokio::select! {
                mut s = cloud.next_session(Duration::from_secs(3600)) => {
                    say!("agent {} ({} {}/{}) connected, session {}", s.hello.agent_id, s.hello.hostname, s.hello.os, s.hello.arch, s.id);
                    // An agent under development may get the protocol wrong; say so, do not crash.
                    s.tolerate_violations();
                    session = Some(s);
                }
                line = lines.next_line() => match line {
                    Ok(Some(l)) if l.trim() == "quit" => break,
                    Ok(None) => break,
                    _ => say!("no agent connected yet"),
                },
            }
            continue;
        }
        let Some(s) = session.as_mut() else { continue };
        tokio::select! {
            line = lines.next_line() => {
                let line = match line {
                    Ok(Some(l)) => l,
                    _ => break,
                };
                let words: Vec<&str> = line.splitn(5, ' ').collect();
                match words.as_slice() {
                    ["quit"] => break,
                    ["inventory"] => {
                        match s.inventory_where(Duration::from_millis(200), |_| true).await {
                            Some(inv) => {
                                say!("inventory revision {}:", inv.revision);
                                for c in inv.connectors {
                                    let status = ConnectorStatus::try_from(c.status).map_or_else(
                                        |_| format!("status {}", c.status),
                                        |s| s.as_str_name().trim_start_matches("CONNECTOR_STATUS_").to_lowercase(),
                                    );
                                    let row = format!("  {:<30} {:<28} {:<8} {status:<10} {}", c.file_name, c.app_id, c.version, c.reason);
                                    say!("{}", row.trim_end());
                                }
                            }
                            None => say!("no inventory received yet"),
                        }
                    }
                    ["cancel", call_id] => {
                        if pending.contains(*call_id) {
                            s.cancel(call_id);
                            say!("cancel sent for {call_id}; its result follows");
                        } else {
                            say!("no call {call_id} is waiting for its result");
                        }
                    }
                    ["call", app_id, capability, rest @ ..] => {
                        // `""` (as the README types it) or `-` is no tenant.
                        let tenant = match rest.first().copied() {
                            None | Some("\"\"" | "-") => "",
                            Some(tenant) => tenant,
                        };
                        let envelope = rest.get(1).copied().unwrap_or("{}");
                        let payload: serde_json::Value = match serde_json::from_str(envelope) {
                            Ok(v) => v,
                            Err(e) => { say!("the envelope is not JSON: {e}"); continue; }
                        };
                        let call_id = format!("cli-{next_call}");
                        next_call += 1;
                        say!("sending {call_id}… (`cancel {call_id}` stops it)");
                        s.call(&call_id, app_id, capability, tenant, &payload);
                        pending.insert(call_id);
                    }
                    _ => say!("commands: call <app_id> <capability> [tenant_id] [json envelope] | cancel <call_id> | inventory | quit"),
                }
            }
            msg = s.recv(Duration::from_secs(3600)) => match msg {
                None => {
                    say!("the agent's stream ended; waiting for it to reconnect");
                    if !pending.is_empty() {
                        // The agent keeps results until they are acknowledged and sends them
                        // on its next stream, where they are printed as they come.
                        let ids: Vec<&str> = pending.iter().map(String::as_str).collect();
                        say!("no result yet for {}; the agent sends it on its next stream", ids.join(", "));
                    }
                    session = None;
                }
                Some(m) => {
                    if let Some(agent_message::Message::Draining(d)) = &m.message {
                        say!("the agent is draining ({} call(s) in flight, grace {} ms)", d.in_flight, d.grace_ms);
                    }
                    for violation in s.take_violations() {
                        say!("protocol violation: {violation}");
                    }
                    for (call_id, result) in s.take_results() {
                        s.ack(&call_id);
                        pending.remove(&call_id);
                        let kind = if result.status == 1 { "connector answered" } else { "agent error" };
                        say!("{call_id}: {kind}, {} bytes in {} chunk(s):", result.data.len(), result.chunks);
                        // Without the connector's own line end: one blank line is not output.
                        say!("{}", String::from_utf8_lossy(&result.data).trim_end());
                    }
                }
            },
        }
    }
    cloud.stop();
    std::process::ExitCode::SUCCESS
}
