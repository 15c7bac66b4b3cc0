//! The local API: authentication, routes, tenants without secrets, errors in the Lumos shape.
#![allow(clippy::unwrap_used, reason = "tests")]

use hyper::{Method, StatusCode};
use lumos_agent::app::Control;
use lumos_agent_integration::*;
use serde_json::json;

const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_route_needs_the_bearer_token() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;

    // Health is open (for load balancers and systemd); nothing else is.
    let (status, _) = agent
        .request_with(Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let routes = [
        (Method::GET, "/v1/connectors"),
        (Method::GET, "/v1/connectors/lumos_example"),
        (Method::POST, "/v1/connectors/lumos_example/list_accounts"),
        (Method::GET, "/v1/tenants"),
        (Method::PUT, "/v1/tenants/t"),
        (Method::DELETE, "/v1/tenants/t"),
    ];
    let wrong_same_length = "0".repeat(agent.token.len());
    for (method, path) in routes {
        for token in [
            None,
            Some("wrong"),
            Some(wrong_same_length.as_str()),
            Some(""),
        ] {
            let (status, body) = agent
                .request_with(method.clone(), path, Some(json!({"app_id": "x"})), token)
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    // Nothing was created by the refused PUT.
    let (_, tenants) = agent.request(Method::GET, "/v1/tenants", None).await;
    assert_eq!(tenants, json!([]));
    // Without [api.users] or [api.ldap] a login says what to configure.
    let (status, body) = agent
        .request_with(
            Method::POST,
            "/v1/auth/token",
            Some(json!({"username": "ann", "password": "pw"})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        String::from_utf8_lossy(&body).contains("this agent has no users to log in as"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    agent.shutdown().await;
}

/// Roles over HTTP: the login's answer, what each role may do per route, a reload that takes a
/// user's role away, and logins that are not JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_role_decides_each_route_and_a_reload_ends_a_demoted_users_session() {
    let dirs = TestDirs::new();
    let hash = |pw: &str| lumos_agent::auth::hash_password(pw.as_bytes()).unwrap();
    let (admin_hash, viewer_hash) = (hash("ann-pw"), hash("vic-pw"));
    let users = |ann_role: &str| {
        format!(
            "[api]\ntoken_ttl_secs = 120\n\
             [api.users.ann]\npassword_hash = \"{admin_hash}\"\nrole = \"{ann_role}\"\n\
             [api.users.vic]\npassword_hash = \"{viewer_hash}\"\nrole = \"viewer\"\n"
        )
    };
    let agent = TestAgent::start(&dirs, &users("admin")).await;
    let login = |user: &str, password: &str| {
        agent.request_with(
            Method::POST,
            "/v1/auth/token",
            Some(json!({"username": user, "password": password})),
            None,
        )
    };
    let json_of = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap();

    let (status, body) = login("ann", "ann-pw").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer = json_of(&body);
    assert_eq!(answer["role"], "admin");
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 120);
    let ann = answer["token"].as_str().unwrap().to_string();
    let (_, body) = login("vic", "vic-pw").await;
    let vic = json_of(&body)["token"].as_str().unwrap().to_string();

    let (status, body) = agent
        .request_with(Method::GET, "/v1/auth/whoami", None, Some(&vic))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&body)["role"], "viewer");
    let tenant = json!({"app_id": "x", "settings": {}});
    for (token, method, path, body, expected) in [
        (&vic, Method::GET, "/v1/tenants", None, StatusCode::OK),
        (&vic, Method::GET, "/v1/status", None, StatusCode::OK),
        (
            &vic,
            Method::PUT,
            "/v1/tenants/t",
            Some(tenant.clone()),
            StatusCode::FORBIDDEN,
        ),
        (
            &vic,
            Method::DELETE,
            "/v1/tenants/t",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            &vic,
            Method::POST,
            "/v1/connectors/x/y",
            Some(json!({})),
            StatusCode::FORBIDDEN,
        ),
        (
            &ann,
            Method::PUT,
            "/v1/tenants/t",
            Some(tenant.clone()),
            StatusCode::OK,
        ),
        (&ann, Method::DELETE, "/v1/tenants/t", None, StatusCode::OK),
    ] {
        let (status, answer) = agent
            .request_with(method.clone(), path, body, Some(token))
            .await;
        assert_eq!(
            status,
            expected,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer)
        );
        if status == StatusCode::FORBIDDEN {
            assert_eq!(json_of(&answer)["error"]["error_code"], "agent.forbidden");
        }
    }

    // Logins that are not the expected JSON are refused as such, and say nothing of users.
    for body in [
        json!("ann"),
        json!({"username": "ann"}),
        json!({"username": "ann", "password": "ann-pw", "otp": 1}),
        // Names are remembered per failure (the throttle): never a long one.
        json!({"username": "a".repeat(257), "password": "ann-pw"}),
    ] {
        let (status, answer) = agent
            .request_with(Method::POST, "/v1/auth/token", Some(body.clone()), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(!String::from_utf8_lossy(&answer).contains("ann-pw"));
    }
    let huge = json!({"username": "ann", "password": "p".repeat(65 << 10)});
    let (status, _) = agent
        .request_with(Method::POST, "/v1/auth/token", Some(huge), None)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, answer) = login("ann", "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        json_of(&answer)["error"]["error_code"],
        "agent.unauthenticated"
    );
    // A guesser is slowed down: after 5 failures the name waits before a login is tried.
    // (Each failure doubles the wait; should this machine take longer than one wait between
    // two requests, the next guess fails and the wait after it is longer: so loop.)
    for _ in 0..5 {
        assert_eq!(login("vic", "guess").await.0, StatusCode::UNAUTHORIZED);
    }
    let mut throttled = None;
    for _ in 0..8 {
        let (status, answer) = login("vic", "guess").await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            throttled = Some(json_of(&answer));
            break;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let answer = throttled.expect("a sixth guess in a row is shut out");
    assert!(
        answer["error"]["error_metadata"]["retry_after_seconds"].as_u64() >= Some(1),
        "{answer}"
    );
    let metrics = agent.metrics_text().await;
    let count = |outcome: &str| -> u64 {
        let prefix = format!("lumos_agent_api_logins_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing from:\n{metrics}"))
    };
    assert_eq!(count("ok"), 2);
    assert!(count("wrong_credentials") >= 6);
    assert_eq!(count("throttled"), 1);

    // Ann becomes a viewer: her admin session ends at the reload, not at its expiry.
    TestAgent::write_config(&dirs, &dirs.plugins(), &users("viewer"));
    agent
        .control
        .send(lumos_agent::app::Control::Reload)
        .await
        .unwrap();
    let answer = eventually_ok(
        std::time::Duration::from_secs(30),
        "the reload to end ann's session",
        || async {
            match agent
                .request_with(Method::GET, "/v1/status", None, Some(&ann))
                .await
            {
                (StatusCode::UNAUTHORIZED, answer) => Ok(answer),
                (status, _) => Err(status),
            }
        },
    )
    .await;
    assert!(String::from_utf8_lossy(&answer).contains("unknown bearer token"));
    let (_, body) = login("ann", "ann-pw").await;
    assert_eq!(json_of(&body)["role"], "viewer");
    // Vic's session outlives the reload: nothing about him changed.
    let (status, _) = agent
        .request_with(Method::GET, "/v1/status", None, Some(&vic))
        .await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

/// `api.max_connections`: connections beyond it wait, unserved, until one closes; so a client
/// that opens connections without end cannot use up the agent's file descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    captured_logs();
    let dirs = TestDirs::new();
    let agent = TestAgent::start(&dirs, "[api]\nmax_connections = 2\n").await;
    // Two connections that never send a request hold both places.
    let idle: Vec<tokio::net::TcpStream> = futures_util::future::join_all(
        (0..2).map(|_| tokio::net::TcpStream::connect(agent.api_addr)),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    // Both places taken is no reason for a warning while no connection waits.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !captured_logs().contains("connections open (api.max_connections)"),
        "a warning with no connection waiting"
    );
    let waiting = tokio::spawn({
        let base = agent.base.clone();
        async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let uri: hyper::Uri = format!("{base}/healthz").parse().unwrap();
            client.get(uri).await.unwrap().status()
        }
    });
    // Not served while both places are taken (however long this takes, it cannot be served
    // early unless the limit is broken).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a third connection was served");
    eventually(WAIT, "the limit to be logged", || {
        captured_logs().contains(
            "the local API has 2 connections open (api.max_connections); new ones wait until one closes",
        )
    })
    .await;
    drop(idle);
    let status = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("served once a place was free")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

/// `api.admin_token = false`: the admin token's file is removed and the token refused, at a
/// start or a reload, while users log in as before; turned on again, a new token is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_can_be_turned_off_and_on_again() {
    let dirs = TestDirs::new();
    let hash = lumos_agent::auth::hash_password(b"ann-pw").unwrap();
    let config = |admin_token: bool| {
        format!(
            "[api]\nadmin_token = {admin_token}\n\
             [api.users.ann]\npassword_hash = \"{hash}\"\nrole = \"admin\"\n"
        )
    };
    let token_file = dirs.state().join("admin.token");
    let agent = TestAgent::start(&dirs, &config(true)).await;
    let first = agent.token.clone();
    assert!(!first.is_empty());
    let status_with = |token: String| {
        let agent = &agent;
        async move {
            agent
                .request_with(Method::GET, "/v1/status", None, Some(&token))
                .await
                .0
        }
    };
    assert_eq!(status_with(first.clone()).await, StatusCode::OK);

    TestAgent::write_config(&dirs, &dirs.plugins(), &config(false));
    agent.control.send(Control::Reload).await.unwrap();
    eventually_ok(
        std::time::Duration::from_secs(30),
        "the reload to refuse the admin token",
        || async {
            match status_with(first.clone()).await {
                StatusCode::UNAUTHORIZED => Ok(()),
                status => Err(status),
            }
        },
    )
    .await;
    assert!(!token_file.exists(), "the refused token's file is removed");
    let ann = agent.login("ann", "ann-pw").await;
    assert_eq!(status_with(ann.clone()).await, StatusCode::OK);

    // On again: a new token, in a new file; the old one stays refused.
    TestAgent::write_config(&dirs, &dirs.plugins(), &config(true));
    agent.control.send(Control::Reload).await.unwrap();
    let second = eventually_ok(
        std::time::Duration::from_secs(30),
        "the reload to write a new admin token",
        || async {
            let token = std::fs::read_to_string(&token_file).map_err(|e| e.to_string())?;
            match status_with(token.trim().to_string()).await {
                StatusCode::OK => Ok(token.trim().to_string()),
                status => Err(status.to_string()),
            }
        },
    )
    .await;
    assert_ne!(second, first);
    assert_eq!(status_with(first.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(ann).await, StatusCode::OK);
    agent.shutdown().await;

    // Off from the start: a file left from before is removed, its token refused.
    let agent = TestAgent::start(&dirs, &config(false)).await;
    assert!(agent.token.is_empty());
    assert!(!token_file.exists());
    let (status, _) = agent
        .request_with(Method::GET, "/v1/status", None, Some(&second))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_list_and_detail() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;

    let (status, bytes) = agent
        .request_with(
            Method::GET,
            "/v1/connectors",
            None,
            Some(&agent.token.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let list: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let entry = &list[0];
    for key in [
        "app_id",
        "version",
        "kind",
        "status",
        "reason",
        "path",
        "sha256",
        "capabilities",
    ] {
        assert!(entry.get(key).is_some(), "{key} missing from {entry}");
    }
    assert_eq!(entry["kind"], "executable");
    assert_eq!(
        entry["capabilities"],
        json!(["list_accounts", "validate_credentials"])
    );
    assert!(entry.get("info").is_none(), "the list stays small: no info");

    let (status, detail) = agent
        .request(Method::GET, "/v1/connectors/lumos_example", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        detail["info"]["user_friendly_name"],
        "Lumos example connector"
    );

    let (status, body) = agent
        .request(Method::GET, "/v1/connectors/nope", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["error_code"], "agent.unknown_connector");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_stored_listed_without_secrets_and_deleted() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;
    let secret = "SECRET-ACCESS-TOKEN-9f8e";
    let put = agent
        .put_tenant(
            "acme",
            json!({"app_id": "lumos_example", "settings": {"account_id": "a1"},
                   "credentials": [{"id": "oauth", "oauth": {"access_token": secret, "refresh_token": "RT-SECRET"}}]}),
        )
        .await;

    for path in ["/v1/tenants", "/v1/tenants/acme"] {
        let (status, body) = agent.request(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK);
        let text = body.to_string();
        assert!(
            !text.contains(secret) && !text.contains("RT-SECRET"),
            "{path} leaked a secret: {text}"
        );
        assert!(text.contains("account_id"), "{text}");
    }
    let (_, one) = agent.request(Method::GET, "/v1/tenants/acme", None).await;
    assert_eq!(one["credentials"], json!(["oauth"]));
    // The PUT answered what a GET shows, `credential_status` and `notes` included.
    assert_eq!(put, one);
    assert_eq!(one["credential_status"], json!({}), "{one}");
    assert_eq!(one["notes"], json!([]), "{one}");

    // The stored credentials are what the connector receives.
    let (status, body) = agent
        .call(
            "lumos_example",
            "validate_credentials",
            json!({"tenant_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"]["unique_tenant_id"], token_hash(secret));

    // The store on disk is private.
    let meta = std::fs::metadata(dirs.state().join("tenants.enc")).unwrap();
    if let Some(mode) = lumos_agent::platform::mode_of(&meta) {
        assert_eq!(mode & 0o777, 0o600);
    }

    let (status, _) = agent
        .request(Method::DELETE, "/v1/tenants/acme", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = agent.request(Method::GET, "/v1/tenants/acme", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["error_code"], "agent.unknown_tenant");
    let (status, _) = agent
        .request(Method::DELETE, "/v1/tenants/acme", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;
    let token = agent.token.clone();

    // Not JSON.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = hyper::Request::post(format!(
        "{}/v1/connectors/lumos_example/list_accounts",
        agent.base
    ))
    .header("authorization", format!("Bearer {token}"))
    .body(http_body_util::Full::new(bytes::Bytes::from_static(
        b"{not json",
    )))
    .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Unknown fields are refused rather than silently dropped.
    let (status, body) = agent
        .call("lumos_example", "list_accounts", json!({"tenant": "typo"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant"),
        "{body}"
    );

    // A capability the connector does not offer, or that could be read as an option.
    for capability in ["delete_everything", "--json"] {
        let (status, body) = agent.call("lumos_example", capability, json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{capability}: {body}");
        assert_eq!(body["error"]["error_code"], "agent.unsupported_capability");
    }

    // Tenants: bad ids and bodies.
    let (status, _) = agent
        .request(
            Method::PUT,
            "/v1/tenants/bad%20id",
            Some(json!({"app_id": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = agent
        .request(Method::PUT, "/v1/tenants/ok", Some(json!({"settings": {}})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = agent
        .request(
            Method::PUT,
            "/v1/tenants/ok",
            Some(json!({"app_id": "x", "surprise": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Auth and credentials in shapes no connector reads are refused when stored, naming the
    // shape; a token_broker block out of place (its secrets would reach the connector) too.
    let broker = json!({"token_url": "https://idp.example/token", "client_id": "c",
                        "client_secret": "CANARY-CLIENT-SECRET", "refresh_token": "CANARY-RT"});
    for (tenant, needle) in [
        (
            json!({"app_id": "x", "credentials": {"credentials": [{"id": "c1", "oauth": {}}]}}),
            "\"credentials\" must be a list of credential objects, like [{\"id\": …, \
             \"oauth\": {\"access_token\": …}}], not an object that holds one",
        ),
        (
            json!({"app_id": "x", "credentials": ["c1"]}),
            "\"credentials\" must be a list of credential objects",
        ),
        (
            json!({"app_id": "x", "auth": [{"oauth": {"access_token": "t"}}]}),
            "\"auth\" must be one credential object",
        ),
        (
            json!({"app_id": "x", "credentials": [
                {"id": "c1", "oauth": {"access_token": "t", "token_broker": broker}}]}),
            "credentials[0].oauth.token_broker: a token_broker block belongs beside a \
             credential's token object",
        ),
    ] {
        let (status, body) = agent
            .request(Method::PUT, "/v1/tenants/shapes", Some(tenant.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{tenant}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{tenant}: {message}");
        assert!(!message.contains("CANARY"), "{message}");
    }
    let (status, _) = agent.request(Method::GET, "/v1/tenants/shapes", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");
    // The same sent with a call: refused before the connector runs (it would answer 200 with
    // the token it was given).
    let (status, body) = agent
        .call(
            "lumos_example",
            "validate_credentials",
            json!({"credentials": [{"id": "c1", "oauth": {"access_token": "t", "token_broker": broker}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["error_code"], "agent.bad_request", "{body}");
    assert!(!body.to_string().contains("CANARY"), "{body}");

    // A tenant that is not stored, named by a call that brings no credentials of its own (a
    // typo, most likely): refused before the connector runs without credentials.
    let (status, body) = agent
        .call(
            "lumos_example",
            "validate_credentials",
            json!({"tenant_id": "acme-typo"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        body["error"]["error_code"], "agent.unknown_tenant",
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no tenant \"acme-typo\" is stored here"),
        "{body}"
    );
    // With its own credentials, as the cloud sends them, the tenant need not be stored.
    let (status, body) = agent
        .call(
            "lumos_example",
            "validate_credentials",
            json!({"tenant_id": "acme-typo", "auth": {"oauth": {"access_token": "AT"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"]["unique_tenant_id"], token_hash("AT"));

    let (status, _) = agent.request(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Names in a path are percent-decoded segment by segment (the CLI encodes each name as
    // one segment): `%2F` is a slash in a name, not another route.
    let (status, body) = agent
        .request(Method::GET, "/v1/connectors/lumos%5Fexample", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["app_id"], "lumos_example", "{body}");
    let (status, body) = agent
        .request(Method::DELETE, "/v1/tenants/a%2Fb", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["message"], "no tenant \"a/b\"", "{body}");
    let (status, body) = agent
        .request(
            Method::PUT,
            "/v1/tenants/a%20b",
            Some(json!({"app_id": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tenant id \"a b\" must be"),
        "{body}"
    );
    let (status, body) = agent.request(Method::GET, "/v1/tenants/%FF", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["error_code"], "agent.bad_request", "{body}");
    // A route served with other methods: 405 naming them (`Allow` too), not a missing page;
    // nothing is changed by it.
    for (method, path, allow) in [
        (Method::PATCH, "/v1/tenants/acme", "GET, HEAD, PUT, DELETE"),
        (
            Method::GET,
            "/v1/connectors/lumos_example/list_accounts",
            "POST",
        ),
        (Method::POST, "/healthz", "GET, HEAD"),
    ] {
        let req = hyper::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", agent.base))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
        assert_eq!(body["error"]["error_code"], "agent.bad_request", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .ends_with(&format!("does not take {method}; it takes {allow}")),
            "{body}"
        );
    }
    let (status, _) = agent.request(Method::GET, "/v1/tenants/acme", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the PATCH stored nothing");
    // HEAD is answered as GET, without the body.
    for (path, expected) in [
        ("/healthz", StatusCode::OK),
        ("/v1/status", StatusCode::OK),
        ("/v1/tenants/acme", StatusCode::NOT_FOUND),
    ] {
        let req = hyper::Request::head(format!("{}{path}", agent.base))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), expected, "HEAD {path}");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert!(body.to_bytes().is_empty(), "HEAD {path}");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_calls_are_made() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    std::fs::write(dirs.plugins().join("junk"), b"not a connector").unwrap();
    let agent = TestAgent::start(&dirs, "").await;
    let scrape = |bytes: bytes::Bytes| {
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    };
    let value = |scrape: &prometheus_parse::Scrape,
                 name: &str,
                 labels: &[(&str, &str)]|
     -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                _ => f64::NAN,
            })
    };

    let (status, before) = agent
        .request_with(Method::GET, "/metrics", None, None)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "metrics need no token, like the health checks"
    );
    let before = scrape(before);
    assert_eq!(
        value(&before, "lumos_agent_connectors", &[("status", "ready")]),
        Some(1.0)
    );
    assert_eq!(
        value(&before, "lumos_agent_connectors", &[("status", "rejected")]),
        Some(1.0)
    );
    let answered = [
        ("app_id", "lumos_example"),
        ("capability", "list_accounts"),
        ("outcome", "answered"),
    ];
    assert_eq!(value(&before, "lumos_agent_calls_total", &answered), None);

    for _ in 0..2 {
        let (status, _) = agent
            .call("lumos_example", "list_accounts", json!({}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    agent
        .call("lumos_example", "typed_by_a_caller", json!({}))
        .await;
    agent
        .call("ghost_app_typed_by_a_caller", "whatever", json!({}))
        .await;

    let (_, after) = agent
        .request_with(Method::GET, "/metrics", None, None)
        .await;
    let after = scrape(after);
    assert_eq!(
        value(&after, "lumos_agent_calls_total", &answered),
        Some(2.0)
    );
    let unsupported = [
        ("app_id", "lumos_example"),
        ("capability", "(unknown)"),
        ("outcome", "unsupported_capability"),
    ];
    assert_eq!(
        value(&after, "lumos_agent_calls_total", &unsupported),
        Some(1.0)
    );
    let unknown = [
        ("app_id", "(unknown)"),
        ("capability", "(unknown)"),
        ("outcome", "unknown_connector"),
    ];
    assert_eq!(
        value(&after, "lumos_agent_calls_total", &unknown),
        Some(1.0)
    );
    assert_eq!(value(&after, "lumos_agent_calls_in_flight", &[]), Some(0.0));
    let latency = [("app_id", "lumos_example"), ("capability", "list_accounts")];
    assert_eq!(
        value(&after, "lumos_agent_call_duration_seconds", &latency),
        Some(2.0),
        "two observations"
    );
    // Nothing a caller typed became a label.
    for sample in &after.samples {
        for (_, v) in sample.labels.iter() {
            assert!(!v.contains("typed_by_a_caller"), "{sample:?}");
        }
    }
    agent.shutdown().await;
}

/// A storm of failing calls (a connector gone, a caller retrying) gets its errors every time,
/// but the log takes ten lines a minute of an error code, not a line per call: a line per call
/// would cost CPU when the agent has least to spare, and run into journald's rate limit, which
/// then drops the agent's other warnings too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_failing_calls_is_logged_ten_lines_a_minute() {
    captured_logs();
    let dirs = TestDirs::new();
    let agent = TestAgent::start(&dirs, "").await;
    for _ in 0..30 {
        let (status, body) = agent.call("storm_app", "anything", json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["error_code"], "agent.unknown_connector");
    }
    let logs = captured_logs();
    let logged = logs
        .lines()
        .filter(|line| line.contains("call failed") && line.contains("app_id=storm_app"))
        .count();
    assert_eq!(logged, 10, "{logs}");
    agent.shutdown().await;
}
