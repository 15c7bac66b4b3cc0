//! Native (cdylib) connectors through the C ABI: the Rust and C examples in worker processes and
//! in-process, misbehaving plugins, and libraries that must be rejected.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::StatusCode;
use lumos_agent_integration::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn c_test_plugin(file_name: &str) -> PathBuf {
    Path::new(env!("LUMOS_TEST_C_PLUGINS")).join(file_name)
}

fn copy_in(dirs: &TestDirs, from: &Path, name: &str) {
    std::fs::copy(from, dirs.plugins().join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_c_examples_answer_like_the_executable() {
    let dirs = TestDirs::new();
    copy_in(
        &dirs,
        &native_lib("liblumos_example_cdylib.so"),
        "liblumos_example_cdylib.so",
    );
    copy_in(
        &dirs,
        Path::new(lumos_example_c::LIBRARY),
        "liblumos_example_c.so",
    );
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;

    for (app_id, file) in [
        ("lumos_example_cdylib", "liblumos_example_cdylib.so"),
        ("lumos_example_c", "liblumos_example_c.so"),
    ] {
        let entry = agent.connector_by_file(file).await;
        assert_eq!(entry["status"], "ready", "{entry}");
        assert_eq!(entry["kind"], "cdylib");
        assert_eq!(entry["app_id"], app_id);
        assert_eq!(
            entry["capabilities"],
            json!(["list_accounts", "validate_credentials"])
        );

        agent.put_tenant(&format!("t-{app_id}"), json!({"app_id": app_id, "auth": {"oauth": {"access_token": format!("{app_id}-token")}}})).await;
        let (status, body) = agent
            .call(
                app_id,
                "validate_credentials",
                json!({"tenant_id": format!("t-{app_id}")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{app_id}: {body}");
        assert_eq!(
            body["response"]["unique_tenant_id"],
            token_hash(&format!("{app_id}-token")),
            "{app_id}"
        );

        // Paging gives the same accounts as the executable example.
        for page in [
            json!({"size": 2}),
            json!({"size": 2, "token": "offset:2"}),
            json!({"size": 2, "token": "offset:4"}),
        ] {
            let request = json!({"request": {"count": 5}, "page": page});
            let (_, native) = agent.call(app_id, "list_accounts", request.clone()).await;
            let (_, exe) = agent.call("lumos_example", "list_accounts", request).await;
            assert_eq!(native, exe, "{app_id} differs from the executable example");
        }
        let (_, body) = agent.call(app_id, "validate_credentials", json!({})).await;
        assert_eq!(body["is_error"], true, "{body}");
        // An error is namespaced by the app that raised it, not the logic's first author.
        assert_eq!(body["error"]["app_id"], app_id, "{body}");
        assert_eq!(
            body["error"]["error_code"],
            format!("{app_id}.missing_credentials"),
            "{body}"
        );
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_loading_is_an_opt_in_from_a_content_addressed_copy() {
    let dirs = TestDirs::new();
    copy_in(
        &dirs,
        &native_lib("liblumos_example_cdylib.so"),
        "liblumos_example_cdylib.so",
    );
    let agent = TestAgent::start(
        &dirs,
        "[connectors.lumos_example_cdylib]\nin_process = true\n",
    )
    .await;
    let entry = agent.connector_by_file("liblumos_example_cdylib.so").await;
    assert_eq!(entry["status"], "ready", "{entry}");
    let (status, body) = agent
        .call(
            "lumos_example_cdylib",
            "validate_credentials",
            json!({"auth": {"oauth": {"access_token": "inproc"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"]["unique_tenant_id"], token_hash("inproc"));
    // Loaded from the copy named by its content, never from the plugins folder itself: the
    // library is mapped into this (the agent's) process from the store.
    let sha = entry["sha256"].as_str().unwrap();
    let copy = std::fs::canonicalize(
        dirs.state()
            .join("store")
            .join(sha)
            .join("liblumos_example_cdylib.so"),
    )
    .unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        maps.contains(copy.to_str().unwrap()),
        "the store copy is not the loaded library"
    );
    let original =
        std::fs::canonicalize(dirs.plugins().join("liblumos_example_cdylib.so")).unwrap();
    assert!(
        !maps.contains(original.to_str().unwrap()),
        "the plugins folder's file was loaded"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_native_connectors_get_typed_errors_and_their_workers_restart() {
    captured_logs();
    let dirs = TestDirs::new();
    install_misbehave(&dirs.plugins());
    copy_in(
        &dirs,
        &c_test_plugin("libmisbehave_c.so"),
        "libmisbehave_c.so",
    );
    copy_in(
        &dirs,
        Path::new(lumos_example_c::LIBRARY),
        "liblumos_example_c.so",
    );
    let agent = std::sync::Arc::new(TestAgent::start(&dirs, "[calls]\ntimeout_secs = 60\n").await);
    for file in ["libmisbehave.so", "libmisbehave_c.so"] {
        assert_eq!(agent.connector_by_file(file).await["status"], "ready");
    }

    // Another native connector keeps answering while these crash.
    let bystander = {
        let agent = agent.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                let (status, body) = agent
                    .call(
                        "lumos_example_c",
                        "list_accounts",
                        json!({"request": {"count": 1}}),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let expect_crash = |body: &Value, needle: &str| {
        assert_eq!(
            body["error"]["error_code"], "agent.connector_crashed",
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    };
    let echo_works = |app: &'static str| {
        let agent = agent.clone();
        async move {
            let (status, body) = agent.call(app, "echo", json!({"request": {"n": 1}})).await;
            assert_eq!(status, StatusCode::OK, "{app} after a crash: {body}");
        }
    };

    // A panic is caught by the SDK: a typed error, the instance is poisoned and replaced.
    let (status, body) = agent.call("misbehave", "panic", json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    expect_crash(&body, "panicked");
    echo_works("misbehave").await;
    let (_, body) = agent.call("misbehave", "panic_in_thread", json!({})).await;
    expect_crash(&body, "panicked");
    echo_works("misbehave").await;

    // abort and segfault kill the worker: the call gets a typed error, the worker restarts.
    let (status, body) = agent.call("misbehave", "abort", json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    expect_crash(&body, "SIGABRT");
    echo_works("misbehave").await;
    let (_, body) = agent.call("misbehave_c", "segfault", json!({})).await;
    expect_crash(&body, "SIGSEGV");
    echo_works("misbehave_c").await;

    // A hang hits the deadline, and the plugin is told to cancel.
    let (status, body) = agent
        .call("misbehave", "hang", json!({"timeout_secs": 1}))
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["error_code"], "agent.timeout");
    let mut cancelled = 0;
    for _ in 0..1000 {
        let (_, body) = agent.call("misbehave", "cancelled", json!({})).await;
        cancelled = body["response"]["cancelled"].as_u64().unwrap();
        if cancelled >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cancelled, 1, "the cancel reached the plugin");

    // A second completion of the same call is ignored, and logged: the first answer stands.
    let (status, body) = agent.call("misbehave_c", "double", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"], "first");
    eventually(
        Duration::from_secs(10),
        "the repeated completion to be logged",
        || captured_logs().contains("again (or a call it never had); ignored"),
    )
    .await;

    // A worker that dies fails every call in flight on it, not only the one that killed it.
    let hanging = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent
                .call("misbehave", "hang", json!({"timeout_secs": 50}))
                .await
        })
    };
    let mut hanging_now = 0;
    for _ in 0..500 {
        let (_, body) = agent.call("misbehave", "hanging", json!({})).await;
        hanging_now = body["response"]["hanging"].as_u64().unwrap_or(0);
        if hanging_now == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hanging_now, 1, "the hanging call reached the plugin");
    let (_, body) = agent.call("misbehave", "abort", json!({})).await;
    expect_crash(&body, "SIGABRT");
    let (status, body) = hanging.await.unwrap();
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "the in-flight call learns of the crash: {body}"
    );
    expect_crash(&body, "SIGABRT");
    echo_works("misbehave_c").await;

    bystander.await.unwrap();
    // Every restart is counted. Workers restart on the next call: the two panics and the first
    // abort were each followed by one (misbehave: 3), the final abort was not; the segfault was
    // (misbehave_c: 1).
    let (_, metrics) = agent
        .request_with(hyper::Method::GET, "/metrics", None, None)
        .await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    let restarts = |app: &str| -> u64 {
        let prefix = format!("lumos_agent_worker_restarts_total{{app_id=\"{app}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        restarts("misbehave"),
        3,
        "misbehave restarts: {}\n{metrics}",
        restarts("misbehave")
    );
    assert_eq!(restarts("misbehave_c"), 1, "misbehave_c restarts");
    let agent = std::sync::Arc::try_unwrap(agent).unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_native_libraries_are_rejected_with_reasons() {
    let dirs = TestDirs::new();
    copy_in(
        &dirs,
        &c_test_plugin("libwrong_major.so"),
        "libwrong_major.so",
    );
    copy_in(&dirs, &c_test_plugin("libno_entry.so"), "libno_entry.so");
    let good = std::fs::read(lumos_example_c::LIBRARY).unwrap();
    std::fs::write(
        dirs.plugins().join("libtruncated.so"),
        &good[..good.len().min(4096)],
    )
    .unwrap();
    let mut foreign = good.clone();
    let machine: u16 = if cfg!(target_arch = "aarch64") {
        0x3E
    } else {
        0xB7
    };
    foreign[18..20].copy_from_slice(&machine.to_le_bytes());
    std::fs::write(dirs.plugins().join("libforeign.so"), &foreign).unwrap();
    std::fs::write(dirs.plugins().join("libtext.so"), b"not a library at all").unwrap();
    copy_in(
        &dirs,
        Path::new(lumos_example_c::LIBRARY),
        "liblumos_example_c.so",
    );
    let agent = TestAgent::start(&dirs, "").await;

    let expect = [
        ("libwrong_major.so", "ABI major 2, this agent supports 1"),
        ("libno_entry.so", "no `lumos_connector_entry_v1` symbol"),
        (
            "libforeign.so",
            if cfg!(target_arch = "aarch64") {
                "built for x86_64, but this machine is aarch64"
            } else {
                "built for aarch64, but this machine is x86_64"
            },
        ),
        ("libtext.so", "cannot load the library"),
    ];
    for (file, needle) in expect {
        let entry = agent.connector_by_file(file).await;
        assert_eq!(entry["status"], "rejected", "{entry}");
        assert_eq!(entry["kind"], "cdylib");
        let reason = entry["reason"].as_str().unwrap();
        assert!(
            reason.contains(needle),
            "{file}: {reason:?} should mention {needle:?}"
        );
    }
    // A truncated library is named from its headers before a worker maps it (mapped, it
    // would crash the worker with SIGBUS, or fail in the loader, depending on the cut).
    let reason = agent.connector_by_file("libtruncated.so").await["reason"]
        .as_str()
        .unwrap()
        .to_string();
    let describes = format!(
        "cut short: the file is 4096 bytes, but its ELF headers describe at least {} bytes",
        good.len()
    );
    assert!(reason.contains(&describes), "{reason}");
    let (status, _) = agent
        .call("lumos_example_c", "list_accounts", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_panic_poisons_the_connector_not_the_agent() {
    let dirs = TestDirs::new();
    install_misbehave(&dirs.plugins());
    copy_in(
        &dirs,
        Path::new(lumos_example_c::LIBRARY),
        "liblumos_example_c.so",
    );
    let agent = TestAgent::start(&dirs, "[connectors.misbehave]\nin_process = true\n").await;
    let (status, _) = agent.call("misbehave", "echo", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = agent.call("misbehave", "panic", json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("panicked"),
        "{body}"
    );
    // Poisoned: refused from now on, with what to do about it.
    let (_, body) = agent.call("misbehave", "echo", json!({})).await;
    assert_eq!(body["error"]["error_code"], "agent.connector_crashed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("poisoned"),
        "{body}"
    );
    // The agent and its other connectors are fine.
    let (status, _) = agent
        .call("lumos_example_c", "list_accounts", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

/// An in-process library that does its work inside `start_call` (the ABI asks it to return at
/// once) holds up the agent while it runs: the admin is told once which library it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_start_call_that_blocks_is_reported_once() {
    captured_logs();
    let dirs = TestDirs::new();
    install_misbehave(&dirs.plugins());
    let agent = TestAgent::start(&dirs, "[connectors.misbehave]\nin_process = true\n").await;
    let quick = json!({"request": {"ms": 0}});
    let (status, body) = agent.call("misbehave", "block", quick).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reports = || {
        captured_logs()
            .lines()
            // Other tests' in-process `misbehave` may be slow too (a panic's backtrace).
            .filter(|l| l.contains("inside start_call") && l.contains("\"block\""))
            .count()
    };
    assert_eq!(reports(), 0, "a prompt start_call is not reported");
    for _ in 0..2 {
        let slow = json!({"request": {"ms": 150}});
        let (status, body) = agent.call("misbehave", "block", slow).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["response"]["blocked_ms"], 150);
    }
    assert_eq!(reports(), 1, "reported once per loaded library");
    let logs = captured_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("inside start_call") && l.contains("\"block\""))
        .unwrap();
    assert!(line.contains("in_process = false"), "{line}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_connector_logging_its_secrets_does_not_leak_them_into_the_log() {
    captured_logs();
    for (mode, config, stderr) in [
        ("worker", "", true),
        // An in-process plugin's stderr is the agent's own, captured only by the daemon:
        // an_in_process_connector_printing_its_secrets_on_stderr_is_logged_redacted.
        (
            "in-process",
            "[connectors.misbehave]\nin_process = true\n",
            false,
        ),
    ] {
        let dirs = TestDirs::new();
        install_misbehave(&dirs.plugins());
        let agent = TestAgent::start(&dirs, config).await;
        let canary = format!("CANARY-NATIVE-{}-{mode}", std::process::id());
        agent.put_tenant("t", json!({"app_id": "misbehave", "credentials": [{"id": "oauth", "oauth": {"access_token": canary}}]})).await;
        // A secret the caller hands over in the call itself, too.
        let caller_secret = format!("{canary}-from-the-caller");
        for body in [
            json!({"tenant_id": "t", "request": {"stderr": stderr}}),
            json!({"request": {"stderr": stderr}, "auth": {"oauth": {"access_token": caller_secret}}}),
        ] {
            let (status, answer) = agent.call("misbehave", "leak", body).await;
            assert_eq!(status, StatusCode::OK, "{mode}: {answer}");
        }
        let logged = |needle: &'static str| {
            move || {
                let logs = captured_logs();
                logs.lines()
                    .filter(|l| l.contains(needle) && l.contains("[redacted]"))
                    .count()
                    >= 2
            }
        };
        eventually(
            WAIT,
            "the plugin's log lines, redacted",
            logged("plugin: leak: my auth is"),
        )
        .await;
        if stderr {
            eventually(
                WAIT,
                "the worker's stderr lines, redacted",
                logged("worker stderr: leak: my auth is"),
            )
            .await;
        }
        assert!(
            !captured_logs().contains(&canary),
            "{mode}: a secret reached the log"
        );
        agent.shutdown().await;
    }
}

/// Live worker processes of this test process hosting a library under `dir`.
#[cfg(target_os = "linux")]
fn workers_for(dir: &Path) -> Vec<i32> {
    let me = std::process::id();
    let under_dir = children_of(me, &dir.to_string_lossy());
    children_of(me, "plugin-host")
        .into_iter()
        .filter(|pid| under_dir.contains(pid) && process_alive(*pid))
        .collect()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_library_retires_its_worker_without_leaking_it() {
    let dirs = TestDirs::new();
    copy_in(
        &dirs,
        Path::new(lumos_example_c::LIBRARY),
        "liblumos_example_c.so",
    );
    let agent = TestAgent::start(&dirs, "").await;
    // Workers run the private copy under the state folder.
    let store = dirs.state().join("store");
    let before = workers_for(&store);
    assert_eq!(before.len(), 1, "one worker for one library: {before:?}");

    // New content (the same library with trailing bytes, so a new sha256) replaces it.
    let mut bytes = std::fs::read(lumos_example_c::LIBRARY).unwrap();
    bytes.extend_from_slice(b"\0new build");
    let tmp = dirs.plugins().join(".replacement.part");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, dirs.plugins().join("liblumos_example_c.so")).unwrap();
    let plugins = store;
    eventually(
        Duration::from_secs(20),
        "the old worker to exit after the rescan",
        || {
            // Its cmdline empties before it is dead, so check it is dead, not just unlisted.
            let now = workers_for(&plugins);
            now.len() == 1 && !now.contains(&before[0]) && !process_alive(before[0])
        },
    )
    .await;
    let (status, _) = agent
        .call("lumos_example_c", "list_accounts", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

/// The real binary's plugin workers die with it when it is SIGKILLed: nothing of the agent is
/// left to stop them, so they must notice by themselves (their parent-death signal).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_leaves_no_worker_behind() {
    let dirs = TestDirs::new();
    copy_in(
        &dirs,
        Path::new(lumos_example_c::LIBRARY),
        "liblumos_example_c.so",
    );
    // No config file: the binary runs its own `plugin-host` for workers.
    let mut agent = KilledOnDrop::spawn(
        std::process::Command::new(workspace_bin("lumos-agent"))
            .arg("--plugins-dir")
            .arg(dirs.plugins())
            .arg("--state-dir")
            .arg(dirs.state())
            .args(["--listen", "127.0.0.1:0", "run"])
            .env_remove("LUMOS_AGENT_CONFIG")
            .current_dir(dirs.root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let agent_pid = agent.id();
    eventually(WAIT, "the agent to start a plugin worker", move || {
        !children_of(agent_pid, "plugin-host").is_empty()
    })
    .await;
    let workers = children_of(agent_pid, "plugin-host");
    assert!(!workers.is_empty());
    agent.kill().unwrap();
    agent.wait().unwrap();
    for pid in workers {
        eventually(
            WAIT,
            &format!("worker {pid} to die with its agent"),
            move || !process_alive(pid),
        )
        .await;
    }
}

/// The real binary with an in-process connector that prints the secrets it is handed on
/// stderr, which is the agent's own: the agent captures it and logs its lines redacted, and
/// what the binary writes (its log included) holds no secret.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_connector_printing_its_secrets_on_stderr_is_logged_redacted() {
    let dirs = TestDirs::new();
    install_misbehave(&dirs.plugins());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dirs.root.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "plugins_dir = {:?}\nstate_dir = {:?}\n[api]\nlisten = \"127.0.0.1:{port}\"\n\
             [connectors.misbehave]\nin_process = true\n",
            dirs.plugins().display().to_string(),
            dirs.state().display().to_string(),
        ),
    )
    .unwrap();
    let stderr_path = dirs.root.path().join("agent.stderr");
    let mut agent = KilledOnDrop::spawn(
        std::process::Command::new(workspace_bin("lumos-agent"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap()),
    );
    let canary = format!("CANARY-IN-PROCESS-STDERR-{}", std::process::id());
    // Handed over in a file, as the CLI asks of secrets.
    let body = dirs.root.path().join("call.json");
    std::fs::write(
        &body,
        json!({"request": {"stderr": true}, "auth": {"oauth": {"access_token": canary}}})
            .to_string(),
    )
    .unwrap();
    let call = {
        let (config, body) = (config.clone(), body.clone());
        move || {
            std::process::Command::new(workspace_bin("lumos-agent"))
                .arg("--config")
                .arg(&config)
                .args(["call", "misbehave", "leak", "--json-file"])
                .arg(&body)
                .output()
                .unwrap()
        }
    };
    eventually(WAIT, "the in-process connector to answer", {
        let call = call.clone();
        move || call().status.success()
    })
    .await;
    let answered = call();
    assert!(answered.status.success(), "{answered:?}");
    assert!(String::from_utf8_lossy(&answered.stdout).contains("leaked"));

    let written = {
        let path = stderr_path.clone();
        move || std::fs::read_to_string(&path).unwrap()
    };
    eventually(WAIT, "the connector's stderr lines in the log, redacted", {
        let written = written.clone();
        move || {
            written()
                .lines()
                .filter(|l| l.contains("stderr: leak: my auth is") && l.contains("[redacted]"))
                .count()
                >= 2
        }
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", written());
    let written = written();
    assert!(
        written.contains("the agent's stderr is read, redacted and logged"),
        "{written}"
    );
    assert!(
        !written.contains(&canary),
        "a secret reached stderr:\n{written}"
    );
}

/// A library that loads in a worker but whose `init` never returns in the agent is given up on
/// after `plugins.info_timeout_secs`, with what to do, and later scans are not held up by it.
/// (Its thread stays stuck until the process exits, so this test has a runtime of its own that
/// it does not wait for.)
#[cfg(target_os = "linux")]
#[test]
fn an_in_process_load_that_hangs_is_given_up_on() {
    let runtime = two_worker_runtime();
    runtime.block_on(async {
        let dirs = TestDirs::new();
        copy_in(
            &dirs,
            &c_test_plugin("libhang_in_process.so"),
            "libhang_in_process.so",
        );
        let start = TestAgent::start(
            &dirs,
            // Room for the worker's start on a busy machine: it is under the same limit.
            "[plugins]\ninfo_timeout_secs = 10\n[connectors.misbehave_c]\nin_process = true\n",
        );
        let agent = tokio::time::timeout(WAIT, start)
            .await
            .expect("the first scan waited on the hanging load");
        let entry = agent.connector_by_file("libhang_in_process.so").await;
        assert_eq!(entry["status"], "rejected", "{entry}");
        let reason = entry["reason"].as_str().unwrap();
        assert!(
            reason.contains("loading it into the agent took over 10s")
                && reason.contains("remove in_process = true"),
            "{reason}"
        );

        copy_in(
            &dirs,
            Path::new(lumos_example_c::LIBRARY),
            "liblumos_example_c.so",
        );
        eventually_ok(WAIT, "a library dropped in later to load", || async {
            let connectors = agent.connectors().await;
            if connectors.iter().any(|c| c["status"] == "ready") {
                Ok(())
            } else {
                Err(connectors)
            }
        })
        .await;
        let (status, body) = agent
            .call("lumos_example_c", "list_accounts", json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(agent.shutdown().await, lumos_agent::app::Stopped::Drained);
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}
