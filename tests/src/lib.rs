//! Test harness: runs the real agent in-process against temporary folders, with a small HTTP
//! client for its API, and helpers to find the connector binaries the workspace builds.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

pub mod fake_cloud;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use lumos_agent::app::{Control, RunningAgent, Stopped};
use lumos_agent::config::{self, Overrides};
use serde_json::Value;
use tokio::sync::mpsc;

/// Polls `cond` until it holds or `timeout` passes; panics with `what` otherwise. Use instead
/// of sleeps: it waits only as long as needed, and a slow machine just waits longer.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for a condition that must be awaited (an API request, a call): runs `probe`
/// until it returns `Ok`, and returns that value; panics after `timeout` with `what` and the
/// last `Err` the probe returned (what it saw instead), which is what the failure is about.
pub async fn eventually_ok<T, E, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for: {what}; last seen: {last:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agent's own runtime ([`lumos_agent::daemon::runtime_builder`]) with two workers, like
/// the tests' `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`, for a test or
/// bench that must own its runtime (to shut it down without waiting for a stuck thread, or to
/// run blocking code between its parts).
pub fn two_worker_runtime() -> tokio::runtime::Runtime {
    lumos_agent::daemon::runtime_builder()
        .worker_threads(2)
        .build()
        .expect("cannot build a tokio runtime")
}

/// Captures the agent's log lines (this test binary's tracing output) so tests can assert what
/// an admin would read, and that no secret is ever logged: the agent's own crates at TRACE,
/// everything else at INFO. Installed once per test binary; returns everything logged so far.
pub fn captured_logs() -> String {
    use std::sync::{Mutex, OnceLock};
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    let logs = LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let writer = move || LogWriter(logs);
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("info,lumos_agent=trace,lumos_agent_integration=trace")
            .with_writer(writer)
            .try_init();
        logs
    });
    String::from_utf8_lossy(&logs.lock().unwrap()).into_owned()
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The folder where cargo put this workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/<test> → target/debug
    let deps = exe.parent().unwrap();
    if deps.ends_with("deps") {
        deps.parent().unwrap().to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// A binary built by this workspace; panics with what to run when it is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --workspace` (or `cargo build --workspace`) first",
        path.display()
    );
    path
}

/// A cdylib of this workspace: as a dependency it lands in `deps/`, as a member build one up.
pub fn native_lib(file_name: &str) -> PathBuf {
    let dir = bin_dir();
    [dir.join("deps").join(file_name), dir.join(file_name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{file_name} is missing: run `cargo test --workspace`"))
}

/// The example connector executable (connectors/example-exe).
pub fn example_connector() -> PathBuf {
    workspace_bin("lumos-example-connector")
}

/// The misbehaving test connector (tests/src/bin/lumos-test-connector.rs).
pub fn test_connector() -> PathBuf {
    workspace_bin("lumos-test-connector")
}

/// Copies `from` into `dir` as `name` (copy then rename, as admins are told to), executable.
pub fn install_plugin(dir: &Path, from: &Path, name: &str) -> PathBuf {
    let tmp = dir.join(format!(".{name}.copying"));
    std::fs::copy(from, &tmp).unwrap();
    let to = dir.join(name);
    std::fs::rename(&tmp, &to).unwrap();
    to
}

/// The misbehaving test library (`tests/cdylib-misbehave`, app_id `misbehave`) installed in
/// the plugins folder `dir`.
pub fn install_misbehave(dir: &Path) -> PathBuf {
    install_plugin(
        dir,
        &native_lib("liblumos_test_cdylib.so"),
        "libmisbehave.so",
    )
}

/// Where interop peers are built and cached: `$LUMOS_INTEROP_CACHE`, or
/// `~/.cache/lumos-agent-interop` (`.ci/run` fills it up front).
pub fn interop_cache() -> PathBuf {
    std::env::var_os("LUMOS_INTEROP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/lumos-agent-interop")
        })
}

/// One connector-py build at a time: the builds share a venv.
static CONNECTOR_PY_BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds a REAL connector-py connector with the shared script
/// (`shared/interop/lumos-connector.sh`, which reuses what is already built) into
/// `<interop cache>/<subdir>` and returns the path it prints: the executable (`mode` = `exe`)
/// or the `compile-on-prem` bundle (`bundle`). `app_base_url` points its API client at a local
/// app; it is baked in at build time, so each value needs its own `subdir`.
pub fn connector_py_build(mode: &str, subdir: &str, app_base_url: Option<&str>) -> PathBuf {
    let _guard = CONNECTOR_PY_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/interop/lumos-connector.sh");
    assert!(
        script.is_file(),
        "{} is missing: the interop tests need shared/ beside the repository",
        script.display()
    );
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script).arg(mode).arg(interop_cache().join(subdir));
    match app_base_url {
        Some(url) => cmd.env("APP_BASE_URL", url),
        None => cmd.env_remove("APP_BASE_URL"),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "building the connector-py {mode} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(
        path.is_file(),
        "the build script printed {}",
        path.display()
    );
    path
}

/// Installs a connector-py executable as the plugin `demo-connector` (a one-line wrapper
/// script, so the build's venv stays where it is).
pub fn install_connector_py(plugins: &Path, exe: &Path) -> PathBuf {
    write_script(
        plugins,
        "demo-connector",
        &format!("#!/bin/sh\nexec '{}' \"$@\"\n", exe.display()),
    )
}

/// A folder with npm `packages` installed (`<interop cache>/<name>`), made on first use from
/// the npm registry (`.ci/run` does it up front). Node resolves a script's imports from the
/// script's own folder, so a peer script is copied in here before it runs.
pub fn interop_node(name: &str, packages: &[&str]) -> PathBuf {
    let dir = interop_cache().join(name);
    let ready = packages.iter().all(|p| {
        let bare = p.rsplit_once('@').map_or(*p, |(n, _)| n);
        dir.join("node_modules")
            .join(bare)
            .join("package.json")
            .is_file()
    });
    if !ready {
        std::fs::create_dir_all(&dir).unwrap();
        let npm = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .args(packages)
            .status()
            .unwrap();
        assert!(npm.success(), "npm install {packages:?} failed");
    }
    dir
}

/// A Python with `packages` installed, for the interop tests' real peers: the venv
/// `~/.cache/lumos-agent-interop/<venv>` (or `$LUMOS_INTEROP_CACHE/<venv>`), made and filled
/// from PyPI on first use (`.ci/run` does it up front). `imports` is the import check.
pub fn interop_python(venv: &str, imports: &str, packages: &[&str]) -> PathBuf {
    let venv = interop_cache().join(venv);
    let python = venv.join("bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", &format!("import {imports}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv {} failed", venv.display());
        let pip = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(packages)
            .status()
            .unwrap();
        assert!(pip.success(), "pip install {packages:?} failed");
    }
    python
}

/// A peer process (a Python or Node server) that prints `PORT <n>` once it listens, then lines the test reads.
/// Killed when dropped.
#[derive(Debug)]
pub struct PeerProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its stdout, line by line (after the `PORT` line).
    pub lines: std::sync::mpsc::Receiver<String>,
    /// The port it printed.
    pub port: u16,
}

impl PeerProcess {
    /// Starts `command` (stdout piped, stderr inherited so a traceback shows) and waits up to
    /// two minutes for its `PORT` line.
    pub fn start(mut command: std::process::Command) -> Self {
        use std::io::BufRead as _;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("the peer's PORT line");
        let port = first
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("expected `PORT <n>`, got {first:?}"));
        Self { child, lines, port }
    }

    /// The next `n` lines, each waited for up to a minute.
    pub fn next_lines(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                self.lines
                    .recv_timeout(Duration::from_secs(60))
                    .expect("a line from the peer")
            })
            .collect()
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[path = "../../agent/tests/support/killed_on_drop.rs"]
mod killed_on_drop;
pub use killed_on_drop::KilledOnDrop;

/// Writes `text` to a file only its owner may read (0600), as token files must be.
pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    lumos_agent::platform::set_mode(path, 0o600).unwrap();
}

/// Writes an executable script into `dir`.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let tmp = dir.join(format!(".{name}.writing"));
    std::fs::write(&tmp, body).unwrap();
    lumos_agent::platform::set_mode(&tmp, 0o755).unwrap();
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Sets a file's modification time (a copy that kept its times, `tar x` or `cp -p`).
pub fn set_mtime(path: &Path, time: std::time::SystemTime) {
    std::fs::File::open(path)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

/// Writes a connector script into `dir` as `file_name` (copy, then rename) that runs the test
/// connector as `app_id` `version` (its app_id and version come from its `argv[0]`).
pub fn versioned_connector(dir: &Path, file_name: &str, app_id: &str, version: &str) -> PathBuf {
    let body = format!(
        "#!/bin/bash\nexec -a '{app_id}@{version}' '{}' \"$@\"\n",
        test_connector().display()
    );
    write_script(dir, file_name, &body)
}

/// `sha256(token)[:16]`, the `unique_tenant_id` the example and interop connectors report.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))[..16].to_string()
}

/// Whether a process is alive (zombies count as dead).
pub fn process_alive(pid: i32) -> bool {
    lumos_agent::exec::is_process_alive(pid)
}

/// The processes whose parent is `parent` and whose command line contains `needle` (Linux).
#[cfg(target_os = "linux")]
pub fn children_of(parent: u32, needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The name in parentheses may hold spaces and `)`: the fields after its last `)`.
        let ppid = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// The agent's folders, created before it starts so a test can fill the plugins folder.
#[derive(Debug)]
pub struct TestDirs {
    /// Holds everything; removed on drop.
    pub root: tempfile::TempDir,
}

impl TestDirs {
    /// Fresh, empty folders.
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("plugins")).unwrap();
        Self { root }
    }

    /// The plugins folder.
    pub fn plugins(&self) -> PathBuf {
        self.root.path().join("plugins")
    }

    /// The state folder.
    pub fn state(&self) -> PathBuf {
        self.root.path().join("state")
    }
}

impl Default for TestDirs {
    fn default() -> Self {
        Self::new()
    }
}

/// The real agent, running in this process on an ephemeral loopback port.
#[derive(Debug)]
pub struct TestAgent {
    /// API base URL.
    pub base: String,
    /// Admin bearer token.
    pub token: String,
    /// Send Reload / Shutdown / Quit.
    pub control: mpsc::Sender<Control>,
    /// The agent's connector registry (inventory snapshots and events).
    pub registry: std::sync::Arc<lumos_agent::plugins::PluginRegistry>,
    /// Where the local API listens.
    pub api_addr: std::net::SocketAddr,
    /// Resolves when the agent stops.
    pub stopped: tokio::task::JoinHandle<Result<Stopped, lumos_agent::app::TaskFailed>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl TestAgent {
    /// Starts the agent on `dirs` with extra TOML config (e.g. `[calls]\ntimeout_secs = 2`).
    pub async fn start(dirs: &TestDirs, extra_toml: &str) -> Self {
        Self::write_config(dirs, &dirs.plugins(), extra_toml);
        let overrides = Overrides {
            config_file: Some(dirs.root.path().join("agent.toml")),
            dev: false,
            plugins_dir: None,
            state_dir: None,
            listen: Some("127.0.0.1:0".into()),
        };
        // Native connectors run in workers and the group reaper beside the agent: the agent
        // re-executes itself for both, and in-process that would be this test binary, so point
        // it at this package's build of the same helpers (`lumos-plugin-host`).
        // agent/tests/cli.rs covers the real binary's `plugin-host` and `group-reaper`.
        let env = [(
            "LUMOS_AGENT_PLUGINS__WORKER_PROGRAM".to_string(),
            workspace_bin("lumos-plugin-host").display().to_string(),
        )];
        let config = config::load_with_env(&overrides, &env).unwrap();
        let mut agent = RunningAgent::start(config).await.unwrap();
        // Control::Reload re-reads the same file, as SIGHUP does in the binary.
        agent.set_config_source(Box::new(move || config::load_with_env(&overrides, &env)));
        let api_addr = agent.api_addr;
        let base = format!("http://{api_addr}");
        // None with `api.admin_token = false`.
        let token = std::fs::read_to_string(&agent.admin_token_path)
            .unwrap_or_default()
            .trim()
            .to_string();
        let registry = agent.registry.clone();
        let (control, rx) = mpsc::channel(4);
        let stopped = tokio::spawn(agent.run(rx));
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            api_addr,
            base,
            token,
            control,
            registry,
            stopped,
            client,
        }
    }

    /// Writes the agent's config file: the folders, then `extra_toml`. Rewrite it and send
    /// `Control::Reload` to test a live reload.
    pub fn write_config(dirs: &TestDirs, plugins_dir: &Path, extra_toml: &str) {
        let text = format!(
            "plugins_dir = {:?}\nstate_dir = {:?}\n{extra_toml}",
            plugins_dir.display().to_string(),
            dirs.state().display().to_string()
        );
        let tmp = dirs.root.path().join(".agent.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dirs.root.path().join("agent.toml")).unwrap();
    }

    /// A raw request with the admin token (or `token`), returning status and body.
    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (StatusCode, Bytes) {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let response = self
            .client
            .request(builder.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        let (status, body) = self.request_with(Method::GET, "/metrics", None, None).await;
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// A request with the admin token; the body parsed as JSON.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, bytes) = self
            .request_with(method, path, body, Some(&self.token.clone()))
            .await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    /// `POST /v1/connectors/{app_id}/{capability}`.
    pub async fn call(&self, app_id: &str, capability: &str, body: Value) -> (StatusCode, Value) {
        self.request(
            Method::POST,
            &format!("/v1/connectors/{app_id}/{capability}"),
            Some(body),
        )
        .await
    }

    /// A call, with the version that answered (`x-lumos-connector-version`).
    pub async fn call_with_version(
        &self,
        app_id: &str,
        capability: &str,
        body: Value,
    ) -> (StatusCode, Value, Option<String>) {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/v1/connectors/{app_id}/{capability}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let version = response
            .headers()
            .get("x-lumos-connector-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            version,
        )
    }

    /// The inventory revision (`x-lumos-inventory-revision` of `GET /v1/connectors`).
    pub async fn revision(&self) -> u64 {
        let request = Request::builder()
            .uri(format!("{}/v1/connectors", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        response.headers()["x-lumos-inventory-revision"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The inventory entries whose file is named `file_name` (a rejected replacement and the old
    /// version it did not displace share a path).
    pub async fn entries_for_file(&self, file_name: &str) -> Vec<Value> {
        self.connectors()
            .await
            .into_iter()
            .filter(|c| {
                c["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with(&format!("/{file_name}")))
            })
            .collect()
    }

    /// Waits until the file `file_name` has `rows` rows in the inventory (two: a rejected
    /// replacement, and the version kept serving beside it).
    pub async fn until_rows(&self, file_name: &str, rows: usize) {
        eventually_ok(
            Duration::from_secs(20),
            &format!("{file_name} to have {rows} row(s)"),
            || async {
                let found = self.entries_for_file(file_name).await;
                if found.len() == rows {
                    Ok(())
                } else {
                    Err(found)
                }
            },
        )
        .await;
    }

    /// `GET /v1/connectors`.
    pub async fn connectors(&self) -> Vec<Value> {
        let (status, value) = self.request(Method::GET, "/v1/connectors", None).await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value.as_array().unwrap().clone()
    }

    /// The inventory entry whose file is named `file_name`.
    pub async fn connector_by_file(&self, file_name: &str) -> Value {
        self.connectors()
            .await
            .into_iter()
            .find(|c| {
                c["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with(&format!("/{file_name}")))
            })
            .unwrap_or_else(|| panic!("{file_name} is not in the inventory"))
    }

    /// `PUT /v1/tenants/{id}`.
    pub async fn put_tenant(&self, tenant_id: &str, body: Value) -> Value {
        let (status, value) = self
            .request(Method::PUT, &format!("/v1/tenants/{tenant_id}"), Some(body))
            .await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value
    }

    /// Logs `user` in over the API (`POST /v1/auth/token`); the session token.
    pub async fn login(&self, user: &str, password: &str) -> String {
        let (status, body) = self
            .request_with(
                Method::POST,
                "/v1/auth/token",
                Some(serde_json::json!({"username": user, "password": password})),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).unwrap();
        answer["token"].as_str().unwrap().to_string()
    }

    /// Drains and waits for the agent to stop.
    pub async fn shutdown(self) -> Stopped {
        self.control.send(Control::Shutdown).await.unwrap();
        self.stopped.await.unwrap().unwrap()
    }
}
