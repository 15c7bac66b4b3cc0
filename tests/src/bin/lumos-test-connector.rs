//! A connector that misbehaves on request, for the agent's tests. Never ship it.
//!
//! Its app_id is its file name (so one binary can be installed under several names), with an
//! optional `@version` suffix: `flaky@2.0.0` is app_id `flaky`, version `2.0.0`.
//!
//! Capabilities (parameters from `request`):
//! - `echo`: answers `{"response": <the whole input envelope>}`.
//! - `env_dump`: answers its environment, command line and working folder.
//! - `sleep`: writes `{"pid", "pgid"}` to `request.pid_file` if given, sleeps `request.secs`
//!   (default 3600), then answers.
//! - `ignore_term`: like `sleep`, but the process (a shell) ignores SIGTERM.
//! - `crash`: prints a traceback on stderr and exits 3.
//! - `abort`: dies by SIGABRT.
//! - `flood`: prints `request.mb` MiB (default 200) of non-JSON.
//! - `garbage`: prints text that is not JSON.
//! - `json_with_logs`: prints log lines, then the JSON answer.
//! - `nonzero_json`: prints an error document and exits 1.
//! - `grandchild`: starts `sleep 3600` holding stdout, records its pid in `request.pid_file`,
//!   answers and exits.
//! - `close_stdout`: closes stdout without printing and exits 0.
//! - `big`: answers `{"response": "aaa…", "n": <request.bytes>}` with `request.bytes` bytes of
//!   `a` (default 1 MiB), written in pieces; the answer is valid JSON of any size.
//! - `leak`: prints its whole input (secrets included) on stderr and exits 1, as a careless
//!   connector might.
//!
//! Every capability first appends a line to `request.count_file` when given: tests count how
//! many times a call really ran.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, ExitCode};
use std::time::Duration;

use serde_json::{json, Value};

const CAPABILITIES: &[&str] = &[
    "echo",
    "refresh_access_token",
    "authorized",
    "env_dump",
    "sleep",
    "ignore_term",
    "crash",
    "abort",
    "flood",
    "garbage",
    "json_with_logs",
    "nonzero_json",
    "grandchild",
    "close_stdout",
    "leak",
    "big",
];

fn identity() -> (String, String) {
    let argv0 = std::env::args().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.split_once('@') {
        Some((app, version)) => (app.to_string(), version.to_string()),
        None => (name, "1.0.0".to_string()),
    }
}

fn print(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, value);
    let _ = writeln!(out);
    let _ = out.flush();
}

fn write_pid_file(input: &Value, extra: Value) {
    if let Some(path) = input.pointer("/request/pid_file").and_then(Value::as_str) {
        let pid = std::process::id();
        #[cfg(unix)]
        let pgid = nix::unistd::getpgrp().as_raw();
        // Windows has no process groups; the job object is invisible from inside.
        #[cfg(windows)]
        let pgid = 0;
        let mut doc = json!({"pid": pid, "pgid": pgid});
        if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, doc.to_string()).expect("pid file");
        std::fs::rename(&tmp, path).expect("pid file");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (app_id, version) = identity();
    let Some(command) = args.get(1) else {
        return ExitCode::from(2);
    };
    if command == "info" {
        print(
            &json!({"response": {"app_id": app_id, "version": version, "capabilities": CAPABILITIES}}),
        );
        return ExitCode::SUCCESS;
    }
    let input: Value = match (args.get(2).map(String::as_str), args.get(3)) {
        (Some("--json-file"), Some(path)) => {
            serde_json::from_str(&std::fs::read_to_string(path).expect("input file"))
                .expect("input JSON")
        }
        (Some("--json"), Some(text)) => serde_json::from_str(text).expect("input JSON"),
        _ => return ExitCode::from(2),
    };
    let secs = input
        .pointer("/request/secs")
        .and_then(Value::as_u64)
        .unwrap_or(3600);
    if let Some(path) = input.pointer("/request/count_file").and_then(Value::as_str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("count file");
        writeln!(file, "{command}").expect("count file");
    }
    match command.as_str() {
        "echo" => print(&json!({"response": input})),
        // As connector-py's: trades `RT-n` for `AT-(n+1)` and `RT-(n+1)`; `revoked` is refused.
        "refresh_access_token" => {
            let token = input
                .pointer("/request/refresh_token")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match token
                .strip_prefix("RT-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(n)
                    if input.pointer("/request/client_secret") == Some(&json!("app-secret")) =>
                {
                    print(&json!({"response": {
                        "access_token": format!("AT-{}", n + 1),
                        "refresh_token": format!("RT-{}", n + 1),
                        "token_type": "bearer",
                    }}))
                }
                _ => print(&json!({"is_error": true, "error": {
                    "message": "the app answered invalid_grant",
                    "error_code": "unauthorized",
                    "error_metadata": {"refreshable": false},
                }})),
            }
        }
        // As a connector-py connector whose app answers 401: `refreshable` unless the first
        // credential's access token is `request.valid_token`.
        "authorized" => {
            let presented = input.pointer("/credentials/0/oauth/access_token");
            if presented.is_some() && presented == input.pointer("/request/valid_token") {
                print(&json!({"response": {"ok": true}}));
            } else {
                print(&json!({"is_error": true, "error": {
                    "message": "the app answered 401",
                    "error_code": "unauthorized",
                    "error_metadata": {"refreshable": true},
                }}));
            }
        }
        "big" => {
            let bytes = input
                .pointer("/request/bytes")
                .and_then(Value::as_u64)
                .unwrap_or(1 << 20);
            let piece = vec![b'a'; 64 << 10];
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut left = bytes;
            let mut ok = out.write_all(b"{\"response\": \"").is_ok();
            while ok && left > 0 {
                let n = left.min(piece.len() as u64);
                ok = out.write_all(&piece[..n as usize]).is_ok();
                left -= n;
            }
            ok = ok && writeln!(out, "\", \"n\": {bytes}}}").is_ok() && out.flush().is_ok();
            if !ok {
                return ExitCode::from(1);
            }
        }
        "env_dump" => {
            let env: serde_json::Map<String, Value> = std::env::vars()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let cwd = std::env::current_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            print(&json!({"response": {"env": env, "argv": args, "cwd": cwd}}));
        }
        "sleep" => {
            write_pid_file(&input, json!({}));
            std::thread::sleep(Duration::from_secs(secs));
            print(&json!({"response": {"slept": secs}}));
        }
        "ignore_term" => {
            write_pid_file(&input, json!({}));
            #[cfg(unix)]
            {
                use std::os::unix::process::CommandExt;
                let err = Command::new("/bin/sh")
                    .args(["-c", "trap '' TERM; sleep 3600 & wait"])
                    .exec();
                eprintln!("exec failed: {err}");
            }
            #[cfg(windows)]
            eprintln!("ignore_term needs a Unix shell");
            return ExitCode::from(1);
        }
        "crash" => {
            eprintln!("Traceback (most recent call last):\n  File \"main.py\", line 1\nRuntimeError: boom");
            return ExitCode::from(3);
        }
        "abort" => std::process::abort(),
        "flood" => {
            let mb = input
                .pointer("/request/mb")
                .and_then(Value::as_u64)
                .unwrap_or(200);
            let chunk = vec![b'x'; 1 << 20];
            let mut out = std::io::stdout().lock();
            for _ in 0..mb {
                if out.write_all(&chunk).is_err() {
                    return ExitCode::from(1);
                }
            }
        }
        "garbage" => println!("this is not JSON <html>"),
        "json_with_logs" => {
            println!("INFO starting up");
            println!("DEBUG more noise");
            print(&json!({"response": {"ok": true}}));
        }
        "nonzero_json" => {
            print(
                &json!({"is_error": true, "error": {"message": "app said no", "error_code": "x.denied"}}),
            );
            return ExitCode::from(1);
        }
        "grandchild" => {
            #[allow(
                clippy::zombie_processes,
                reason = "the point: a grandchild left holding the pipe"
            )]
            let child = Command::new("sleep")
                .arg("3600")
                .spawn()
                .expect("spawn sleep");
            write_pid_file(&input, json!({"grandchild": child.id()}));
            print(&json!({"response": {"grandchild": child.id()}}));
        }
        "leak" => {
            eprintln!("debug dump of my input: {input}");
            // `request.pad`: the tenant's token alone, then that many bytes, so a test can put
            // the cut of the agent's stderr tail inside the token.
            if let Some(pad) = input.pointer("/request/pad").and_then(Value::as_u64) {
                let token = input
                    .pointer("/auth/oauth/access_token")
                    .or_else(|| input.pointer("/credentials/0/oauth/access_token"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                eprint!("{token}{}", "-".repeat(pad as usize));
            }
            return ExitCode::from(1);
        }
        "close_stdout" => {
            #[cfg(unix)]
            let _ = nix::unistd::close(1);
        }
        other => {
            print(
                &json!({"is_error": true, "error": {"message": format!("unknown capability {other}"), "error_code": "test.unknown"}}),
            );
        }
    }
    ExitCode::SUCCESS
}
