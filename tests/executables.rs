//! Executable connectors through the real agent: misbehaviour, secrets, environment, envelope
//! and concurrency limits.
// Unix semantics under test (modes, symlinks, process groups, shell-script connectors): the
// Windows build is type-checked in CI, these scenarios run on Linux.
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use lumos_agent_integration::*;
use serde_json::{json, Value};

const CONFIG: &str = "[calls]\ntimeout_secs = 60\nkill_grace_secs = 1\n";

fn read_pids(path: &Path) -> Vec<i32> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    ["pid", "grandchild"]
        .iter()
        .filter_map(|k| doc[*k].as_i64())
        .map(|p| p as i32)
        .collect()
}

async fn pid_file_written(path: &Path) {
    let p = path.to_path_buf();
    eventually(
        Duration::from_secs(30),
        "the connector to write its pid file",
        move || p.exists(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_misbehaviour_gets_its_typed_error_and_leaves_no_process() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "bad");
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let config = format!("{CONFIG}[connectors.bad]\nmax_concurrency = 16\n");
    let agent = std::sync::Arc::new(TestAgent::start(&dirs, &config).await);
    let pid_dir = tempfile::tempdir().unwrap();

    // (capability, request, expected HTTP status, expected error code or None for a 200)
    let cases: Vec<(&str, Value, StatusCode, Option<&str>)> = vec![
        (
            "crash",
            json!({}),
            StatusCode::BAD_GATEWAY,
            Some("agent.connector_crashed"),
        ),
        (
            "abort",
            json!({}),
            StatusCode::BAD_GATEWAY,
            Some("agent.connector_crashed"),
        ),
        (
            "garbage",
            json!({}),
            StatusCode::BAD_GATEWAY,
            Some("agent.bad_output"),
        ),
        (
            "close_stdout",
            json!({}),
            StatusCode::BAD_GATEWAY,
            Some("agent.bad_output"),
        ),
        (
            "flood",
            json!({"mb": 200}),
            StatusCode::BAD_GATEWAY,
            Some("agent.bad_output"),
        ),
        (
            "flood",
            json!({"mb": 300}),
            StatusCode::BAD_GATEWAY,
            Some("agent.output_too_large"),
        ),
        (
            "sleep",
            json!({"pid_file": pid_dir.path().join("sleep").to_str().unwrap()}),
            StatusCode::GATEWAY_TIMEOUT,
            Some("agent.timeout"),
        ),
        (
            "ignore_term",
            json!({"pid_file": pid_dir.path().join("term").to_str().unwrap()}),
            StatusCode::GATEWAY_TIMEOUT,
            Some("agent.timeout"),
        ),
        (
            "grandchild",
            json!({"pid_file": pid_dir.path().join("grandchild").to_str().unwrap()}),
            StatusCode::OK,
            None,
        ),
        ("json_with_logs", json!({}), StatusCode::OK, None),
        ("nonzero_json", json!({}), StatusCode::OK, None),
    ];

    // The good connector keeps answering while the bad one misbehaves.
    let good = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            for i in 0..20 {
                let (status, body) = agent
                    .call(
                        "lumos_example",
                        "list_accounts",
                        json!({"request": {"count": i}}),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                assert_eq!(body["response"].as_array().unwrap().len(), i);
                answered += 1;
            }
            answered
        })
    };

    let mut tasks = Vec::new();
    for (capability, request, status, code) in cases {
        let agent = agent.clone();
        // 3 s makes the hanging cases quick; a flood must be given time to reach its verdict
        // (200-300 MB through a pipe, a spool file and the JSON check), or a busy machine
        // turns it into a timeout.
        let timeout_secs = if capability == "flood" { 60 } else { 3 };
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let (got_status, body) = agent
                .call(
                    "bad",
                    capability,
                    json!({"request": request, "timeout_secs": timeout_secs}),
                )
                .await;
            assert_eq!(got_status, status, "{capability}: {body}");
            match code {
                Some(code) => {
                    assert_eq!(body["is_error"], true, "{capability}: {body}");
                    assert_eq!(body["error"]["error_code"], code, "{capability}: {body}");
                }
                None => assert!(
                    body.get("response").is_some() || body.get("is_error").is_some(),
                    "{capability}: {body}"
                ),
            }
            // Liveness, not speed: a deadline must not turn into minutes.
            assert!(
                started.elapsed() < Duration::from_secs(timeout_secs + 60),
                "{capability} took {:?}",
                started.elapsed()
            );
            (capability, body)
        }));
    }
    let mut answers = std::collections::HashMap::new();
    for task in tasks {
        let (capability, body) = task.await.unwrap();
        answers.insert(capability, body);
    }
    assert_eq!(good.await.unwrap(), 20);

    // Answers passed through verbatim.
    assert_eq!(answers["json_with_logs"], json!({"response": {"ok": true}}));
    assert_eq!(answers["nonzero_json"]["error"]["error_code"], "x.denied");
    assert!(
        answers["abort"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SIGABRT"),
        "{}",
        answers["abort"]
    );

    // No process of any call survives: the sleeper, the SIGTERM-ignorer, the grandchild.
    for name in ["sleep", "term", "grandchild"] {
        let pids = read_pids(&pid_dir.path().join(name));
        assert!(!pids.is_empty());
        for pid in pids {
            eventually(
                Duration::from_secs(20),
                &format!("{name} process {pid} to be gone"),
                || !process_alive(pid),
            )
            .await;
        }
    }
    let agent = std::sync::Arc::try_unwrap(agent).unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_a_command_line_or_an_environment() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "holder");
    let agent = TestAgent::start(&dirs, CONFIG).await;
    let canary = format!("CANARY-{}", std::process::id());
    agent
        .put_tenant("t1", json!({"app_id": "holder", "settings": {"region": "eu"}, "auth": {"oauth": {"access_token": canary}}}))
        .await;

    let pid_dir = tempfile::tempdir().unwrap();
    let pid_file = pid_dir.path().join("pid");
    let call = {
        let body = json!({"tenant_id": "t1", "request": {"secs": 2, "pid_file": pid_file.to_str().unwrap()}});
        let base = agent.base.clone();
        let token = agent.token.clone();
        tokio::spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            let req = hyper::Request::post(format!("{base}/v1/connectors/holder/sleep"))
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_string(),
                )))
                .unwrap();
            client.request(req).await.unwrap().status()
        })
    };
    pid_file_written(&pid_file).await;

    // While the call runs: the input file exists, private, and holds the secret (the positive
    // control: the secret did travel, by file) ...
    let calls_dir = dirs.state().join("calls");
    assert_eq!(
        std::fs::metadata(&calls_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let inputs: Vec<_> = std::fs::read_dir(&calls_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert_eq!(
        std::fs::metadata(&inputs[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&inputs[0])
        .unwrap()
        .contains(&canary));

    // ... and no process on the machine has it on its command line or in its environment.
    let mut scanned = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        for file in ["cmdline", "environ"] {
            if let Ok(bytes) = std::fs::read(entry.path().join(file)) {
                scanned += 1;
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(&canary),
                    "the secret is in /proc/{}/{file}",
                    entry.file_name().to_string_lossy()
                );
            }
        }
    }
    assert!(scanned > 2, "could not read /proc");
    let connector_pid = read_pids(&pid_file)[0];
    assert!(
        std::fs::read(format!("/proc/{connector_pid}/cmdline")).is_ok(),
        "the connector was not among the scanned processes"
    );

    assert_eq!(call.await.unwrap(), StatusCode::OK);
    // After the call, the input file is gone.
    assert_eq!(std::fs::read_dir(&calls_dir).unwrap().count(), 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_environment_is_scrubbed_and_private() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "envy");
    let agent = TestAgent::start(&dirs, CONFIG).await;
    let (status, body) = agent.call("envy", "env_dump", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let env = body["response"]["env"].as_object().unwrap();
    let allowed: BTreeSet<&str> = [
        "PATH",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HOME",
        "TMPDIR",
    ]
    .into();
    for key in env.keys() {
        assert!(
            allowed.contains(key.as_str()) || key.starts_with("LUMOS_LOG_"),
            "{key} leaked into the connector's environment"
        );
    }
    // The test process itself has CARGO_* variables; none reached the connector.
    assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
    assert_eq!(env["LUMOS_LOG_TO_STDOUT"], "false");
    let state = std::fs::canonicalize(dirs.state()).unwrap();
    let log_dir = Path::new(env["LUMOS_LOG_DIRECTORY"].as_str().unwrap());
    assert!(log_dir.starts_with(&state), "{}", log_dir.display());
    let cwd = Path::new(body["response"]["cwd"].as_str().unwrap());
    assert!(
        cwd.starts_with(&state),
        "connector runs in {}",
        cwd.display()
    );
    assert_eq!(env["HOME"].as_str().unwrap(), cwd.to_str().unwrap());
    // JSON travels by file: argv is exactly [program, capability, --json-file, path].
    let argv: Vec<&str> = body["response"]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(argv[1..3], ["env_dump", "--json-file"]);
    assert_eq!(argv.len(), 4);
    agent.shutdown().await;
}

/// connector-py writes a log file per app and day into `LUMOS_LOG_DIRECTORY` and never removes
/// one: the agent removes those nothing has written to for `log.connector_log_days`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_log_files_past_their_days_are_removed() {
    captured_logs();
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "envy");
    let logs = dirs.state().join("logs").join("connectors");
    std::fs::create_dir_all(&logs).unwrap();
    let day = Duration::from_secs(24 * 3600);
    let written = |name: &str, age: Duration| {
        let path = logs.join(name);
        std::fs::write(&path, "12:00:00 INFO a line\n").unwrap();
        set_mtime(&path, std::time::SystemTime::now() - age);
        path
    };
    let old = written("envy_2026-11-20.log", 8 * day);
    let kept = written("envy_2026-12-01.log", 6 * day);
    let agent = TestAgent::start(&dirs, "[log]\nconnector_log_days = 7\n").await;
    eventually(
        Duration::from_secs(30),
        "the old connector log file to be removed, and the removal logged",
        // The line is logged after the removal returns: waited for, not raced.
        || {
            !old.exists()
                && captured_logs().contains("removed connector log files not written to for 7 days")
        },
    )
    .await;
    assert!(kept.exists());
    // The folder is the one connectors are told to write to.
    let (status, body) = agent.call("envy", "env_dump", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let told = body["response"]["env"]["LUMOS_LOG_DIRECTORY"]
        .as_str()
        .unwrap();
    assert_eq!(
        std::fs::canonicalize(told).unwrap(),
        std::fs::canonicalize(&logs).unwrap()
    );
    // A reload applies another number of days without a restart.
    TestAgent::write_config(&dirs, &dirs.plugins(), "[log]\nconnector_log_days = 3\n");
    agent
        .control
        .send(lumos_agent::app::Control::Reload)
        .await
        .unwrap();
    let applied = |logs: &str| {
        logs.lines()
            .any(|l| l.contains("configuration reloaded") && l.contains("log.connector_log_days"))
    };
    eventually(
        Duration::from_secs(30),
        "the reload to apply the days",
        || applied(&captured_logs()),
    )
    .await;
    assert!(!captured_logs()
        .lines()
        .any(|l| l.contains("need a restart") && l.contains("connector_log_days")));
    // And at once, not at the next hourly pass: the file of 6 days goes now, one of a day stays.
    let recent = written("envy_2026-12-06.log", day);
    eventually(
        Duration::from_secs(30),
        "the reload's pass to remove the file past the new days, and log it",
        || {
            !kept.exists()
                && captured_logs().contains("removed connector log files not written to for 3 days")
        },
    )
    .await;
    assert!(recent.exists());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_url_the_broker_refreshes_through_the_connectors_refresh_access_token() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "echo_app");
    let agent = TestAgent::start(&dirs, CONFIG).await;
    let expired = json!({"client_id": "app-client", "client_secret": "app-secret",
                         "refresh_token": "RT-1", "expires_at": 1});
    agent
        .put_tenant(
            "acme",
            json!({"app_id": "echo_app", "credentials": [
                {"id": "app_oauth", "oauth": {"access_token": "AT-1"}, "token_broker": expired}]}),
        )
        .await;
    let (status, body) = agent
        .call("echo_app", "echo", json!({"tenant_id": "acme"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["response"]["credentials"],
        json!([{"id": "app_oauth", "oauth": {"access_token": "AT-2"}}]),
        "the connector's own refresh gave the new token; the broker block stays with the agent"
    );
    let (_, view) = agent
        .request(hyper::Method::GET, "/v1/tenants/acme", None)
        .await;
    assert_eq!(view["credential_status"]["app_oauth"], "ok", "{view}");
    agent.shutdown().await;

    // A refresh token the app refuses: re-consent, and later calls fail fast.
    let agent = TestAgent::start(&dirs, CONFIG).await;
    agent
        .put_tenant(
            "revoked",
            json!({"app_id": "echo_app", "credentials": [{"id": "app_oauth", "oauth": {},
                "token_broker": {"client_id": "app-client", "client_secret": "app-secret",
                                 "refresh_token": "revoked", "expires_at": 1}}]}),
        )
        .await;
    for _ in 0..2 {
        let (status, body) = agent
            .call("echo_app", "echo", json!({"tenant_id": "revoked"}))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(
            body["error"]["error_code"], "agent.needs_reconsent",
            "{body}"
        );
    }
    // A connector without refresh_access_token: the credential must name its token URL.
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    eventually(
        Duration::from_secs(30),
        "the example connector is ready",
        || agent.registry.snapshot().resolve("lumos_example").is_ok(),
    )
    .await;
    agent
        .put_tenant(
            "no-url",
            json!({"app_id": "lumos_example", "credentials": [{"id": "app_oauth", "oauth": {},
                "token_broker": {"client_id": "app-client", "refresh_token": "RT-1", "expires_at": 1}}]}),
        )
        .await;
    let (status, body) = agent
        .call(
            "lumos_example",
            "validate_credentials",
            json!({"tenant_id": "no-url"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        body["error"]["error_code"], "agent.credential_misconfigured",
        "{body}"
    );
    assert_eq!(
        body["error"]["error_metadata"]["retryable"], false,
        "retrying cannot fix a missing setting: {body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("token_broker.token_url"), "{message}");
    assert!(!message.contains("RT-1"), "{message}");
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("lumos_agent_token_refreshes_total{outcome=\"invalid_grant\"} 1"),
        "one refresh, then fast failures: {metrics}"
    );
    let (_, view) = agent
        .request(hyper::Method::GET, "/v1/tenants/revoked", None)
        .await;
    assert_eq!(
        view["credential_status"]["app_oauth"], "needs_reconsent",
        "{view}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_injects_the_tenants_settings_and_credentials() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "echo_app");
    install_plugin(&dirs.plugins(), &test_connector(), "other_app");
    let agent = TestAgent::start(&dirs, CONFIG).await;
    agent
        .put_tenant(
            "stored",
            json!({"app_id": "echo_app", "settings": {"a": 1, "b": 2}, "auth": {"oauth": {"access_token": "STORED"}}}),
        )
        .await;
    agent
        .put_tenant(
            "settings_only",
            json!({"app_id": "echo_app", "settings": {"subdomain": "acme"}}),
        )
        .await;

    // Stored settings overlaid by the call's; stored credentials win over the call's.
    let (status, body) = agent
        .call(
            "echo_app",
            "echo",
            json!({"tenant_id": "stored", "request": {"q": [1, 2]}, "settings": {"b": 3, "c": 4},
                   "auth": {"oauth": {"access_token": "FROM_CALL"}}, "page": {"size": 5}, "include_raw_data": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let envelope = &body["response"];
    assert_eq!(envelope["settings"], json!({"a": 1, "b": 3, "c": 4}));
    assert_eq!(envelope["auth"]["oauth"]["access_token"], "STORED");
    assert_eq!(envelope["request"], json!({"q": [1, 2]}));
    assert_eq!(envelope["page"], json!({"size": 5}));
    assert_eq!(envelope["include_raw_data"], true);

    // A tenant without stored secrets: the call's credentials are used (cloud-held mode).
    let (_, body) = agent
        .call("echo_app", "echo", json!({"tenant_id": "settings_only", "credentials": [{"id": "oauth", "oauth": {"access_token": "FROM_CALL"}}]}))
        .await;
    assert_eq!(
        body["response"]["credentials"][0]["oauth"]["access_token"],
        "FROM_CALL"
    );
    assert_eq!(body["response"]["settings"]["subdomain"], "acme");
    assert!(body["response"].get("auth").is_none());

    // A tenant's credentials never go to another connector.
    let (status, body) = agent
        .call("other_app", "echo", json!({"tenant_id": "stored"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["error_code"], "agent.tenant_mismatch");
    assert!(!body.to_string().contains("STORED"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_connector_limit_are_busy_not_queued() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "narrow");
    let agent = TestAgent::start(
        &dirs,
        &format!("{CONFIG}[connectors.narrow]\nmax_concurrency = 1\n"),
    )
    .await;
    let pid_dir = tempfile::tempdir().unwrap();
    let pid_file = pid_dir.path().join("pid");
    let agent = std::sync::Arc::new(agent);
    let first = {
        let agent = agent.clone();
        let body = json!({"request": {"secs": 2, "pid_file": pid_file.to_str().unwrap()}});
        tokio::spawn(async move { agent.call("narrow", "sleep", body).await })
    };
    pid_file_written(&pid_file).await;
    let row = agent.connector_by_file("narrow").await;
    assert_eq!(
        (&row["max_concurrency"], &row["running"]),
        (&json!(1), &json!(1)),
        "{row}"
    );
    let (status, body) = agent.call("narrow", "echo", json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["error_code"], "agent.busy");
    assert_eq!(body["error"]["error_metadata"]["retryable"], true);
    let (status, body) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // The slot is free again.
    let (status, _) = agent.call("narrow", "echo", json!({})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reactive_refresh_through_the_connector_is_not_refused_by_its_own_calls_limit() {
    // With one slot, the call that the app refused holds it while the agent refreshes through
    // the same connector; the refresh must not be answered `busy`.
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "narrow");
    let agent = TestAgent::start(
        &dirs,
        &format!("{CONFIG}[connectors.narrow]\nmax_concurrency = 1\n"),
    )
    .await;
    let far_future = 4_000_000_000u64;
    agent
        .put_tenant(
            "acme",
            json!({"app_id": "narrow", "credentials": [{"id": "app_oauth",
                "oauth": {"access_token": "AT-1"},
                "token_broker": {"client_id": "app-client", "client_secret": "app-secret",
                                 "refresh_token": "RT-1", "expires_at": far_future}}]}),
        )
        .await;
    let (status, body) = agent
        .call(
            "narrow",
            "authorized",
            json!({"tenant_id": "acme", "request": {"valid_token": "AT-2"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"]["ok"], true, "{body}");
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("lumos_agent_token_refreshes_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
    // The limit still holds for callers: the slot is free again and one call fits.
    let (status, body) = agent
        .call(
            "narrow",
            "authorized",
            json!({"tenant_id": "acme", "request": {"valid_token": "AT-2"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_calls() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "slow");
    let agent = std::sync::Arc::new(TestAgent::start(&dirs, CONFIG).await);
    let pid_dir = tempfile::tempdir().unwrap();
    let pid_file = pid_dir.path().join("pid");
    let in_flight = {
        let agent = agent.clone();
        let body = json!({"request": {"secs": 2, "pid_file": pid_file.to_str().unwrap()}});
        tokio::spawn(async move { agent.call("slow", "sleep", body).await })
    };
    pid_file_written(&pid_file).await;
    agent
        .control
        .send(lumos_agent::app::Control::Shutdown)
        .await
        .unwrap();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the in-flight call finished during the drain: {body}"
    );
    let agent = std::sync::Arc::try_unwrap(agent).unwrap();
    assert_eq!(
        agent.stopped.await.unwrap().unwrap(),
        lumos_agent::app::Stopped::Drained
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_printing_its_secrets_on_stderr_does_not_leak_them_into_the_log() {
    captured_logs();
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "careless");
    let agent = TestAgent::start(&dirs, CONFIG).await;
    let canary = format!("CANARY-STDERR-{}", std::process::id());
    agent.put_tenant("t", json!({"app_id": "careless", "credentials": [{"id": "oauth", "oauth": {"access_token": canary, "refresh_token": format!("{canary}-rt")}}]})).await;
    let (status, body) = agent
        .call("careless", "leak", json!({"tenant_id": "t"}))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(!body.to_string().contains(&canary));
    let logs = captured_logs();
    assert!(
        logs.contains("debug dump of my input") && logs.contains("[redacted]"),
        "the stderr tail is logged, redacted"
    );
    assert!(!logs.contains(&canary), "a secret reached the log");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cut_of_a_logged_stderr_tail_leaves_no_piece_of_a_secret() {
    captured_logs();
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "careless");
    // 40 bytes kept: the connector prints its token then 30 dashes, so the tail's cut falls
    // 10 bytes before the token's end.
    let agent = TestAgent::start(&dirs, &format!("{CONFIG}stderr_log_bytes = 40\n")).await;
    let canary = format!("Qz{}xKwVbJqPmZrTyHgF", std::process::id());
    agent.put_tenant("t", json!({"app_id": "careless", "credentials": [{"id": "oauth", "oauth": {"access_token": canary}}]})).await;
    let (status, body) = agent
        .call(
            "careless",
            "leak",
            json!({"tenant_id": "t", "request": {"pad": 30}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let logs = captured_logs();
    let tail_line = logs
        .lines()
        .find(|l| l.contains("stderr tail") && l.contains(&"-".repeat(30)))
        .unwrap_or_else(|| panic!("the stderr tail is logged: {logs}"));
    assert!(
        tail_line.contains("[redacted]"),
        "the token the cut splits is redacted whole: {tail_line}"
    );
    for piece in canary.as_bytes().windows(6) {
        let piece = std::str::from_utf8(piece).unwrap();
        assert!(
            !logs.contains(piece),
            "{piece:?}, a piece of the token, reached the log"
        );
    }
    agent.shutdown().await;
}
