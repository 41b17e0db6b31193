//! The API checked against its own OpenAPI document: Schemathesis (a
//! property-based tester, from PyPI) runs every operation of
//! `/openapi.json` against a real gateway process, in all its phases
//! (examples, coverage, fuzzing, stateful) with all its checks, and the test
//! fails on anything it finds: a 5xx, a response later than the bound, a
//! status the document does not list, a response or event that does not
//! match its schema, a request the document allows that is refused, or one
//! it forbids that is accepted.
//!
//! CI runs a short fixed run; `SCHEMATHESIS_EXAMPLES` (examples per
//! operation and phase, default 40) and `SCHEMATHESIS_SEED` (a number, or
//! `random`; default 1) make a longer or another one. Its settings and hooks
//! are in `tests/schemathesis/` (`schemathesis.toml`, `hooks.py`: what
//! must not be sent to a single gateway, and why).
//!
//! It needs the `st` command (`pip install schemathesis`; `.ci/run` installs
//! it), or `SCHEMATHESIS` naming it; without it the test fails, saying so.

#[path = "support/ports.rs"]
mod ports;
#[path = "support/process.rs"]
mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use process::Proc;
use serde_json::Value;

/// The write timeout of the gateway under test: short, so that a read
/// waiting for an `Entente-Min-Index` the group never issues ends soon.
const WRITE_TIMEOUT_MS: u64 = 2_000;

fn examples() -> u32 {
    match std::env::var("SCHEMATHESIS_EXAMPLES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("SCHEMATHESIS_EXAMPLES={v:?} is not a number")),
        Err(_) => 40,
    }
}

fn seed() -> u64 {
    match std::env::var("SCHEMATHESIS_SEED").as_deref() {
        Ok("random") => {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b).expect("random seed");
            u64::from(u32::from_le_bytes(b))
        }
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("SCHEMATHESIS_SEED={v:?} is not a number or `random`")),
        Err(_) => 1,
    }
}

/// The Schemathesis command: `$SCHEMATHESIS`, else `st` on the `PATH`.
fn schemathesis() -> PathBuf {
    let candidate = std::env::var_os("SCHEMATHESIS").map_or_else(|| "st".into(), PathBuf::from);
    let found = Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "the Schemathesis command {} is missing: install it with `pip install schemathesis` \
         (in a virtual environment, or with --break-system-packages), put its `st` on the PATH \
         or name it in SCHEMATHESIS; .ci/run installs it",
        candidate.display()
    );
    candidate
}

/// Starts the gateway binary on free loopback ports; returns it, its REST
/// address and its admin token.
async fn gateway(dir: &Path) -> (Proc, String, String) {
    let [http, raft, mqtt, mqtt5] = ports::reserve_ports(4)[..] else {
        unreachable!("four ports")
    };
    let data = dir.join("data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(["--node-id", "1"])
        .arg("--peers")
        .arg(format!("1={raft}"))
        .arg("--raft-listen")
        .arg(raft.to_string())
        .arg("--http-listen")
        .arg(http.to_string())
        .arg("--mqtt-listen")
        .arg(mqtt.to_string())
        .arg("--mqtt5-listen")
        .arg(mqtt5.to_string())
        .arg("--data-dir")
        .arg(&data)
        .arg("--write-timeout-ms")
        .arg(WRITE_TIMEOUT_MS.to_string())
        .env("RUST_LOG", "warn,gateway=info")
        .env_remove("ENTENTE_CONFIG");
    let gw = Proc::start(cmd);
    gw.wait_line(&["admin token:"], Duration::from_secs(60))
        .await;
    let token = std::fs::read_to_string(data.join("admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    (gw, format!("http://{http}"), token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_does_what_its_openapi_document_says() {
    let st = schemathesis();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gw, base, token) = gateway(dir.path()).await;
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let (examples, seed) = (examples(), seed());

    let mut cmd = Command::new(&st);
    cmd.current_dir(dir.path())
        .env("SCHEMATHESIS_HOOKS", here.join("hooks.py"))
        .arg("--config-file")
        .arg(here.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--checks", "all"])
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        .arg("--max-examples")
        .arg(examples.to_string())
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--generation-database")
        .arg("none")
        // Every answer within twice the write timeout plus 1 s (a read's
        // whole barrier, a write's bound), with room for a loaded machine.
        .arg("--max-response-time")
        .arg(((2 * WRITE_TIMEOUT_MS + 2_000) / 1000).to_string())
        .args(["--request-timeout", "20"])
        .args(["--workers", "1", "--no-color"])
        .arg("--report")
        .arg("ndjson")
        .arg("--report-ndjson-path")
        .arg(dir.path().join("events.ndjson"))
        // The authorization check runs here too (an admin token may use
        // every route), and the run's own token is kept.
        .env("ENTENTE_ROLE", "admin")
        .env("ENTENTE_ROUTE_ROLES", route_roles())
        .env("ENTENTE_PROTECT_TOKEN", "bootstrap");
    println!("schemathesis: seed {seed}, {examples} examples per operation and phase");
    let mut run = Proc::start(cmd);
    // Bounded: the run's own budget is about a second per example and
    // operation at most; a stuck run is stopped and reported.
    let limit = Duration::from_secs(600 + 40 * u64::from(examples));
    let status = run.exits_within(limit).await;
    let report = run.output();
    println!("{report}");
    let status = status.unwrap_or_else(|| panic!("schemathesis did not finish within {limit:?}"));
    assert!(
        status.success(),
        "schemathesis found problems (seed {seed}; rerun with SCHEMATHESIS_SEED={seed}):\n{report}\n\
         gateway log:\n{}",
        gw.output()
    );
    // What it covered, from its event log: every operation of the
    // document, and test cases in every phase.
    let covered = coverage(&dir.path().join("events.ndjson"));
    println!("{covered}");
    // (Schemathesis leaves out the operation that serves the document it
    // loaded.)
    for r in gateway::api::routes()
        .iter()
        .filter(|r| r.path != "/openapi.json")
    {
        let label = format!("{} {}", r.method, r.path);
        assert!(
            covered.operations.contains(&label),
            "{label} was not tested:\n{covered}"
        );
    }
    for phase in ["examples", "coverage", "fuzzing", "stateful"] {
        assert!(
            covered.cases.get(phase).is_some_and(|&n| n > 0),
            "no test cases in phase {phase}:\n{covered}"
        );
    }

    // And the gateway is still whole: it answers, and still leads itself.
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "{}", gw.output());
    assert!(
        gw.exits_within(Duration::ZERO).await.is_none(),
        "{}",
        gw.output()
    );
}

/// The route table as the hooks' `role_is_respected` check reads it:
/// `METHOD /path` → the least role (`null`: public).
fn route_roles() -> String {
    let map: BTreeMap<String, Option<&str>> = gateway::api::routes()
        .iter()
        .map(|r| {
            (
                format!("{} {}", r.method, r.path),
                r.role.map(|role| role.as_str()),
            )
        })
        .collect();
    serde_json::to_string(&map).expect("json")
}

/// Examples per operation and phase of each authorization run
/// (`SCHEMATHESIS_ROLE_EXAMPLES`, default 5).
fn role_examples() -> u32 {
    match std::env::var("SCHEMATHESIS_ROLE_EXAMPLES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("SCHEMATHESIS_ROLE_EXAMPLES={v:?} is not a number")),
        Err(_) => 5,
    }
}

/// A request with the admin token; the status and the JSON body.
async fn admin_call(
    base: &str,
    admin: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(admin);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Authorization, property-tested: Schemathesis runs every operation of the
/// document with a viewer, an operator, a revoked and an expired token (the
/// admin token is the main run's), and the hooks' `role_is_respected` check
/// fails the run on any answer but a refusal to what the token may not do
/// — a viewer reads only, an operator administers no tokens or members,
/// a revoked or expired token gets 401 everywhere but the public routes.
/// A few examples per operation and phase (`SCHEMATHESIS_ROLE_EXAMPLES`),
/// no stateful phase: the roles' refusals come before any state is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_does_more_than_its_role_allows() {
    use reqwest::Method;
    let st = schemathesis();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gw, base, admin) = gateway(dir.path()).await;
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let (examples, seed) = (role_examples(), seed());

    let make = async |name: &str, role: &str, extra: Value| {
        let mut body = serde_json::json!({"name": name, "role": role});
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        let (s, t) = admin_call(&base, &admin, Method::POST, "/v1/tokens", Some(body)).await;
        assert_eq!(s, 201, "{t}");
        (
            t["id"].as_str().expect("id").to_string(),
            t["token"].as_str().expect("token").to_string(),
        )
    };
    let (_, viewer) = make("viewer", "viewer", Value::Null).await;
    let (_, operator) = make("operator", "operator", Value::Null).await;
    let (revoked_id, revoked) = make("revoked", "admin", Value::Null).await;
    let (_, expired) = make("expired", "admin", serde_json::json!({"expires_in": 1})).await;
    let (s, _) = admin_call(
        &base,
        &admin,
        Method::DELETE,
        &format!("/v1/tokens/{revoked_id}"),
        None,
    )
    .await;
    assert_eq!(s, 204);
    // The expired token: refused once the gateway's clock passed its
    // expiry (a second from its creation; polled, bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _) = admin_call(&base, &expired, Method::GET, "/v1/cluster", None).await;
        if s == 401 {
            break;
        }
        assert_eq!(s, 200);
        assert!(
            std::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut report = String::new();
    for (role, token) in [
        ("viewer", &viewer),
        ("operator", &operator),
        ("revoked", &revoked),
        ("expired", &expired),
    ] {
        let events = dir.path().join(format!("events-{role}.ndjson"));
        let mut cmd = Command::new(&st);
        cmd.current_dir(dir.path())
            .env("SCHEMATHESIS_HOOKS", here.join("hooks.py"))
            .env("ENTENTE_ROLE", role)
            .env("ENTENTE_ROUTE_ROLES", route_roles())
            .arg("--config-file")
            .arg(here.join("schemathesis.toml"))
            .arg("run")
            .arg(format!("{base}/openapi.json"))
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--checks", "not_a_server_error,role_is_respected"])
            .arg("--header")
            .arg(format!("Authorization: Bearer {token}"))
            .arg("--max-examples")
            .arg(examples.to_string())
            .arg("--seed")
            .arg(seed.to_string())
            .args(["--generation-database", "none"])
            .args(["--request-timeout", "20"])
            .args(["--workers", "1", "--no-color"])
            .args(["--report", "ndjson", "--report-ndjson-path"])
            .arg(&events);
        let mut run = Proc::start(cmd);
        let limit = Duration::from_secs(300 + 20 * u64::from(examples));
        let status = run.exits_within(limit).await;
        let out = run.output();
        let status = status
            .unwrap_or_else(|| panic!("the {role} run did not finish within {limit:?}:\n{out}"));
        assert!(
            status.success(),
            "the {role} token did what its role may not (seed {seed}):\n{out}\ngateway log:\n{}",
            gw.output()
        );
        let covered = coverage(&events);
        for r in gateway::api::routes()
            .iter()
            .filter(|r| r.path != "/openapi.json")
        {
            let label = format!("{} {}", r.method, r.path);
            assert!(
                covered.operations.contains(&label),
                "{label} was not tested with the {role} token:\n{covered}"
            );
        }
        assert!(covered.checks.contains("role_is_respected"), "{covered}");
        let cases: usize = covered.cases.values().sum();
        report.push_str(&format!(
            "{role}: {} operations, {cases} test cases ({:?})\n",
            covered.operations.len(),
            covered.cases
        ));
    }
    println!(
        "authorization runs (seed {seed}, {examples} examples per operation and phase):\n{report}"
    );
    assert!(
        gw.exits_within(Duration::ZERO).await.is_none(),
        "{}",
        gw.output()
    );
}

/// What a run covered, from Schemathesis' NDJSON event log.
#[derive(Debug, Default)]
struct Covered {
    /// `METHOD /path` of every operation tested.
    operations: BTreeSet<String>,
    /// Test cases (requests) per phase.
    cases: BTreeMap<String, usize>,
    /// Scenarios (one operation, or one stateful sequence) per phase.
    scenarios: BTreeMap<String, usize>,
    /// The checks that ran.
    checks: BTreeSet<String>,
}

impl fmt::Display for Covered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "operations tested ({}):", self.operations.len())?;
        for o in &self.operations {
            writeln!(f, "  {o}")?;
        }
        for (phase, n) in &self.cases {
            let scenarios = self.scenarios.get(phase).copied().unwrap_or(0);
            writeln!(f, "phase {phase}: {n} test cases in {scenarios} scenarios")?;
        }
        write!(
            f,
            "checks: {}",
            self.checks.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

fn coverage(ndjson: &Path) -> Covered {
    let text = std::fs::read_to_string(ndjson).expect("schemathesis event log");
    let mut c = Covered::default();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(done) = event.get("ScenarioFinished") else {
            continue;
        };
        let phase = done["phase"].as_str().unwrap_or("?").to_string();
        *c.scenarios.entry(phase.clone()).or_default() += 1;
        let recorder = &done["recorder"];
        let cases = recorder["cases"].as_object();
        if phase != "stateful"
            && let Some(label) = recorder["label"].as_str()
        {
            c.operations.insert(label.to_string());
        }
        *c.cases.entry(phase).or_default() += cases.map_or(0, |m| m.len());
        for checks in recorder["checks"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            for check in checks.as_array().into_iter().flatten() {
                if let Some(name) = check["name"].as_str() {
                    c.checks.insert(name.to_string());
                }
            }
        }
    }
    c
}
