//! The operator console, served at `/`: how it is served (without a token,
//! with its Content-Security-Policy, revalidated by ETag), and an operator's
//! session in a real browser — headless Chromium driven over WebDriver
//! (chromedriver) — against a real gateway and devices connected over MQTT.
//!
//! The browser test needs `chromium` and `chromedriver` (Debian:
//! `chromium`, `chromium-driver`). Without them it says so and passes,
//! unless `ENTENTE_TEST_CHROMIUM` is set (as `.ci/run` sets it): then a
//! missing browser is a failure, so CI never skips it silently.
//!
//! The session test also checks every view with axe-core (WCAG 2.0 and 2.1,
//! levels A and AA) in the same browser: no violation of impact `serious`
//! or `critical`. `ENTENTE_TEST_AXE` names axe-core's `axe.min.js` (`.ci/run`
//! fetches it, pinned by its SHA-256); without it the checks are skipped,
//! saying so, unless `ENTENTE_TEST_CHROMIUM` is set: then the test fails.

mod common;

#[path = "support/answer.rs"]
mod answer;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use entente_protocol::{CommandMessage, commands_topic, reported_topic};
use gateway::config::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::time::Instant;

/// How long the test waits for any one thing in the browser.
const WAIT: Duration = Duration::from_secs(20);

/// A single gateway on loopback listeners, and its admin token.
async fn gateway(dir: &Path) -> (gateway::Gateway, String) {
    let mut config = Config::single(
        dir.to_path_buf(),
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    config.tick = Duration::from_millis(5);
    config.report_coalesce = Duration::from_millis(30);
    let gw = gateway::start_with(config, common::loopback_listeners())
        .await
        .expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    let token = std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_string();
    (gw, token)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_without_a_token_under_a_strict_policy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (gw, token) = gateway(tmp.path()).await;
    let base = format!("http://{}", gw.http_addr);
    let http = http();
    for (path, ty) in [
        ("/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/api.js", "text/javascript; charset=utf-8"),
        ("/console/charts.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.expect("get");
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], ty, "{path}");
        let csp = h["content-security-policy"].to_str().expect("csp");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-cache");
        let etag = h["etag"].to_str().expect("etag").to_string();
        assert!(!r.bytes().await.expect("body").is_empty());
        // Unchanged: revalidated without a body.
        let r = http
            .get(format!("{base}{path}"))
            .header("If-None-Match", &etag)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 304, "{path}");
        assert!(r.bytes().await.expect("body").is_empty());
    }
    // Any other file is a 404 problem; the API still needs its token.
    for path in [
        "/console/secrets.txt",
        "/console/%2e%2e%2fopenapi.json",
        "/console/",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.expect("get");
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["content-type"], gateway::api::PROBLEM_JSON);
    }
    let r = http
        .get(format!("{base}/v1/devices"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{base}/v1/devices"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    gw.stop().await;
}

/// A device that reports `{"speed": 1}` once connected and answers every
/// command it gets (accepted, then succeeded with `{"ok": true}`), until
/// dropped.
fn device(id: String, secret: String, addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut opts = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
        opts.set_credentials(&id, &secret);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut ev) = AsyncClient::new(opts, 100);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let c = client.clone();
                    let id = id.clone();
                    tokio::spawn(async move {
                        let _ = c.subscribe(commands_topic(&id), QoS::AtLeastOnce).await;
                        let _ = c
                            .publish(
                                reported_topic(&id),
                                QoS::AtLeastOnce,
                                false,
                                r#"{"speed":1}"#,
                            )
                            .await;
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(cmd) = serde_json::from_slice::<CommandMessage>(&p.payload) else {
                        continue;
                    };
                    answer::answer_succeeded(&client, &id, &cmd.id);
                }
                Ok(_) => {}
                // Reconnects after a pause (bounded by the test's own waits).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}

/// The first of `names` found on the PATH.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

/// chromedriver and the browser; `None` (the test is skipped, saying why)
/// without them, unless `ENTENTE_TEST_CHROMIUM` is set: then it fails.
fn browser_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    match browser_tools() {
        Ok(t) => Some(t),
        Err(why) if std::env::var_os("ENTENTE_TEST_CHROMIUM").is_some() => {
            panic!("ENTENTE_TEST_CHROMIUM is set but the browser test cannot run: {why}")
        }
        Err(why) => {
            eprintln!(
                "skipped the console's browser test {test}: {why} (install chromium and \
                 chromium-driver; set ENTENTE_TEST_CHROMIUM to make this a failure)"
            );
            None
        }
    }
}

/// chromedriver and the browser, or why the browser test cannot run.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let driver = on_path(&["chromedriver"]).ok_or("no chromedriver on the PATH")?;
    let browser = on_path(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or("no chromium on the PATH")?;
    Ok((driver, browser))
}

/// axe-core's script, from the file `ENTENTE_TEST_AXE` names; `None` (the
/// accessibility checks are skipped, saying why) without it, unless
/// `ENTENTE_TEST_CHROMIUM` is set: then it fails, as CI always sets both.
fn axe_or_skip(test: &str) -> Option<String> {
    let Some(path) = std::env::var_os("ENTENTE_TEST_AXE") else {
        if std::env::var_os("ENTENTE_TEST_CHROMIUM").is_some() {
            panic!(
                "ENTENTE_TEST_CHROMIUM is set but ENTENTE_TEST_AXE does not name axe-core's \
                 axe.min.js, so the console's accessibility cannot be checked (.ci/run fetches \
                 it and sets ENTENTE_TEST_AXE)"
            );
        }
        eprintln!(
            "skipped the accessibility checks of {test}: ENTENTE_TEST_AXE does not name \
             axe-core's axe.min.js (.ci/run fetches it; set ENTENTE_TEST_CHROMIUM to make \
             this a failure)"
        );
        return None;
    };
    let script = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "ENTENTE_TEST_AXE names {}, which cannot be read: {e}",
            Path::new(&path).display()
        )
    });
    assert!(
        script.contains("axe"),
        "ENTENTE_TEST_AXE names {}, which is not axe-core",
        Path::new(&path).display()
    );
    Some(script)
}

/// Runs axe-core in the page: the WCAG 2.0 and 2.1 rules of levels A and
/// AA, over the whole document. Every violation is printed (its rule,
/// impact, help and the first elements it names); those of impact
/// `serious` or `critical` are kept, to fail the test once every view has
/// been checked.
struct Audit {
    script: Option<String>,
    serious: Vec<String>,
    views: usize,
}

/// What axe-core reports, as lines: `impact|rule: help (n elements: a, b, c)`.
const AXE_RUN: &str = "const done = arguments[arguments.length - 1]; \
    axe.run(document, {runOnly: {type: 'tag', \
        values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}, resultTypes: ['violations']}) \
      .then(r => done({violations: r.violations.map(v => ({id: v.id, impact: v.impact, \
          help: v.help, nodes: v.nodes.length, \
          targets: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))}), \
        e => done({error: String(e)}));";

impl Audit {
    fn new(script: Option<String>) -> Audit {
        Audit {
            script,
            serious: Vec::new(),
            views: 0,
        }
    }

    /// Checks the page as it is now, named `view` in what is printed.
    async fn check(&mut self, b: &Browser, view: &str) {
        let Some(script) = &self.script else {
            return;
        };
        // Injected once per document (the console changes views without
        // loading a new one).
        let loaded = b
            .js("return typeof window.axe !== 'undefined'", json!([]))
            .await;
        if loaded != json!(true) {
            b.js(script, json!([])).await;
        }
        let r = b
            .cmd(
                reqwest::Method::POST,
                "/execute/async",
                Some(json!({"script": AXE_RUN, "args": []})),
            )
            .await;
        if let Some(e) = r["error"].as_str() {
            panic!("axe-core failed on the {view} view: {e}");
        }
        let violations = r["violations"].as_array().expect("violations");
        println!(
            "accessibility of the {view} view: {} violated rule(s)",
            violations.len()
        );
        for v in violations {
            let impact = v["impact"].as_str().unwrap_or("unknown");
            let targets: Vec<&str> = v["targets"]
                .as_array()
                .map(|t| t.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let line = format!(
                "{view}: {impact} {}: {} ({} element(s): {})",
                v["id"].as_str().unwrap_or("?"),
                v["help"].as_str().unwrap_or(""),
                v["nodes"],
                targets.join(", ")
            );
            println!("  {line}");
            if impact == "serious" || impact == "critical" {
                self.serious.push(line);
            }
        }
        self.views += 1;
    }

    /// Fails unless every view checked was free of serious and critical
    /// violations (and `views` were checked, when axe-core is at hand).
    fn assert_clean(&self, views: usize) {
        assert!(
            self.serious.is_empty(),
            "serious or critical accessibility violations:\n{}",
            self.serious.join("\n")
        );
        if self.script.is_some() {
            assert_eq!(self.views, views, "views checked");
        }
    }
}

/// A chromedriver process on a port it picked (it prints it), in a process
/// group of its own with the browser it starts: the group is killed on drop,
/// so a failed test leaves no browser behind.
struct Driver {
    child: Child,
    base: String,
}

impl Driver {
    fn start(path: &Path) -> Driver {
        use std::os::unix::process::CommandExt as _;
        let mut child = Command::new(path)
            .arg("--port=0")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let _ = tx.send(rest.trim_end_matches('.').to_string());
                }
            }
        });
        let port = rx.recv_timeout(WAIT).expect("chromedriver says its port");
        Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebDriver session (W3C protocol over HTTP).
struct Browser {
    http: reqwest::Client,
    session: String,
    shots: PathBuf,
}

/// WebDriver's key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn open(driver: &Driver, browser: &Path, profile: &Path, shots: PathBuf) -> Browser {
        let http = http();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display())],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let r: Value = http
            .post(format!("{}/session", driver.base))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session");
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"))
            .to_string();
        Browser {
            http,
            session: format!("{}/session/{session}", driver.base),
            shots,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r: Value = req
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("webdriver json");
        if let Some(e) = r["value"]["error"].as_str() {
            panic!("webdriver {path}: {e}: {}", r["value"]["message"]);
        }
        r["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Polls `script` until it returns something other than null or false;
    /// fails after [`WAIT`], with a screenshot and the page's text.
    async fn until(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script, args.clone()).await;
            if !v.is_null() && v != json!(false) {
                return v;
            }
            if Instant::now() > deadline {
                self.shot("failed").await;
                let text = self.js("return document.body.innerText", json!([])).await;
                panic!("{what}: not seen in {WAIT:?}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the first element matching `css`, once it shows some.
    async fn text_of(&self, css: &str) -> String {
        self.until(
            css,
            "const e = document.querySelector(arguments[0]); \
             return e && e.innerText.trim() !== '' && e.innerText",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn element(&self, css: &str) -> String {
        self.until(
            css,
            "return document.querySelector(arguments[0]) !== null",
            json!([css]),
        )
        .await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().expect("element id").to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Replaces what the field `css` holds with `text`, typed.
    async fn type_in(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn select(&self, css: &str, value: &str) {
        self.js(
            "const s = document.querySelector(arguments[0]); s.value = arguments[1]; \
             s.dispatchEvent(new Event('change', {bubbles: true}));",
            json!([css, value]),
        )
        .await;
    }

    /// Saves a screenshot as `<name>.png` and returns its path.
    async fn shot(&self, name: &str) -> PathBuf {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("png");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// The browser's console messages since the last call.
    async fn log(&self) -> Vec<String> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| format!("{} {}", e["level"], e["message"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

/// Whether the element `arguments[0]` (a grid) shows one column (the
/// narrow layout).
const ONE_COLUMN: &str = "const e = document.querySelector(arguments[0]); \
    return e !== null && getComputedStyle(e).gridTemplateColumns.split(' ').length === 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_fleet_from_the_console_in_a_browser() {
    let Some((driver_path, browser_path)) = browser_or_skip("an_operator_runs_the_fleet") else {
        return;
    };
    let mut audit = Audit::new(axe_or_skip("an_operator_runs_the_fleet"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let shots = tempfile::Builder::new()
        .prefix("entente-console-")
        .tempdir()
        .expect("tempdir")
        .keep();
    println!("console screenshots in {}", shots.display());
    let (gw, admin) = gateway(&tmp.path().join("gw")).await;
    let base = format!("http://{}", gw.http_addr);
    let api = http();

    // Three devices, two of them labelled site=north, all connected.
    let mut devices = Vec::new();
    for (id, site) in [
        ("pump-1", "north"),
        ("pump-2", "north"),
        ("valve-1", "south"),
    ] {
        let r: Value = api
            .post(format!("{base}/v1/devices"))
            .bearer_auth(&admin)
            .json(&json!({"id": id, "labels": {"site": site}}))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("registered");
        let secret = r["secret"].as_str().expect("secret").to_string();
        devices.push(device(id.to_string(), secret, gw.mqtt_addr.expect("mqtt")));
    }
    // The operator's token, revoked at the end.
    let created: Value = api
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({"name": "console-operator", "role": "operator"}))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token json");
    let token = created["token"].as_str().expect("token").to_string();
    let token_id = created["id"].as_str().expect("id").to_string();

    let driver = Driver::start(&driver_path);
    let b = Browser::open(
        &driver,
        &browser_path,
        &tmp.path().join("profile"),
        shots.clone(),
    )
    .await;
    b.goto(&format!("{base}/")).await;

    // Before sign-in, no navigation.
    b.element("#signin").await;
    assert_eq!(
        b.js(
            "return getComputedStyle(document.querySelector('#nav')).display",
            json!([])
        )
        .await,
        json!("none")
    );

    // A mistyped token is refused with the API's words.
    b.type_in("#token", "not-a-token").await;
    b.click("#signin button[type=submit]").await;
    let refused = b.text_of("#signin-problem .problem").await;
    assert!(refused.contains("not known to this gateway"), "{refused}");
    audit.check(&b, "sign-in (a token refused)").await;

    // Signed in: the group, with its leader.
    b.type_in("#token", &token).await;
    b.click("#signin button[type=submit]").await;
    b.until(
        "the leader in the members",
        "return document.querySelector('#group-members [data-badge=leader]') !== null",
        json!([]),
    )
    .await;
    assert_eq!(b.text_of("#group-leader").await, "1");
    b.shot("group").await;
    audit.check(&b, "group").await;
    let stored = b
        .js(
            "return [sessionStorage.length, localStorage.length, document.cookie]",
            json!([]),
        )
        .await;
    assert_eq!(
        stored,
        json!([1, 0, ""]),
        "the token is in sessionStorage only"
    );

    // Devices: a search by id prefix and label finds the two pumps.
    b.click("nav a[data-view=devices]").await;
    b.type_in("#device-prefix", "pump").await;
    b.type_in("#device-labels", "site=north").await;
    b.click("main form button[type=submit]").await;
    let found = b
        .until(
            "both pumps online",
            "const rows = [...document.querySelectorAll('#device-list [data-device]')]; \
             return rows.length === 2 && rows.every(r => r.querySelector('[data-badge=online]')) \
               && rows.map(r => r.dataset.device)",
            json!([]),
        )
        .await;
    assert_eq!(found, json!(["pump-1", "pump-2"]));
    audit.check(&b, "devices").await;

    // A device's page: presence, then a command followed to its end.
    b.click("#device-list [data-device=pump-1] a").await;
    let presence = b.text_of("#device-presence").await;
    assert!(presence.contains("online"), "{presence}");
    b.until(
        "the gateway holding it",
        "return document.querySelector('#device-presence').innerText.includes('on gateway 1')",
        json!([]),
    )
    .await;
    b.type_in("#command-name", "reboot").await;
    b.type_in("#command-params", r#"{"delay_s": 0}"#).await;
    b.click("#command-form button[type=submit]").await;
    b.until(
        "the command succeeded",
        "return document.querySelector('#command-followed [data-status=succeeded]') !== null",
        json!([]),
    )
    .await;
    assert!(
        b.text_of("#command-followed")
            .await
            .contains("\"ok\": true")
    );
    // Its lifecycle, from the event stream replayed from its issue: queued
    // first (the page opened the stream after it), succeeded last (a device
    // that answers at once skips the sent and accepted steps' own entries).
    b.until(
        "the lifecycle",
        "const t = document.querySelector('#command-lifecycle')?.innerText; \
         return t && t.startsWith('queued → ') && t.endsWith(' → succeeded')",
        json!([]),
    )
    .await;

    // Desired state: the delta appears against what the device reported.
    b.until(
        "the reported speed",
        "return document.querySelector('#shadow-reported')?.innerText.includes('\"speed\": 1')",
        json!([]),
    )
    .await;
    let version = b
        .until(
            "the shadow's version",
            "const v = document.querySelector('#desired-version').value; return v !== '' && v",
            json!([]),
        )
        .await;
    b.type_in("#desired-patch", r#"{"speed": 5}"#).await;
    b.click("#desired-form button[type=submit]").await;
    b.until(
        "the delta",
        "return document.querySelector('#shadow-delta')?.innerText.includes('\"speed\": 5')",
        json!([]),
    )
    .await;
    b.shot("device").await;
    audit.check(&b, "device").await;
    // The version read before that change is stale now: the API's 412.
    b.type_in("#desired-version", version.as_str().expect("version"))
        .await;
    b.type_in("#desired-patch", r#"{"speed": 6}"#).await;
    b.click("#desired-form button[type=submit]").await;
    let conflict = b
        .text_of("#desired-result .problem[data-status='412']")
        .await;
    let shadow: Value = api
        .get(format!("{base}/v1/devices/pump-1/shadow"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("shadow")
        .json()
        .await
        .expect("shadow json");
    assert_eq!(
        shadow["desired"],
        json!({"speed": 5}),
        "the stale edit was refused"
    );
    let expected: Value = api
        .patch(format!("{base}/v1/devices/pump-1/shadow"))
        .bearer_auth(&admin)
        .header("If-Match", version.as_str().expect("version"))
        .json(&json!({"desired": {"speed": 6}}))
        .send()
        .await
        .expect("stale patch")
        .json()
        .await
        .expect("problem");
    assert!(
        conflict.contains(expected["title"].as_str().expect("title"))
            && conflict.contains(expected["detail"].as_str().expect("detail")),
        "{conflict} is not {expected}"
    );

    // Narrow screens get one column (two on a wide one).
    assert_eq!(b.js(ONE_COLUMN, json!(["main .grid"])).await, json!(false));
    b.resize(480, 1000).await;
    b.until("one column", ONE_COLUMN, json!(["main .grid"]))
        .await;
    b.js("window.scrollTo(0, 0)", json!([])).await;
    b.shot("device-narrow").await;
    // A phone's width: the same checks.
    b.resize(390, 844).await;
    b.until(
        "the window 390 px wide",
        "return window.innerWidth <= 390",
        json!([]),
    )
    .await;
    audit.check(&b, "device at 390×844").await;
    b.resize(1280, 1000).await;

    // The device's commands, listed by status.
    b.click("nav a[data-view=commands]").await;
    b.type_in("#commands-device", "pump-1").await;
    b.select("#commands-status", "succeeded").await;
    b.click("main form button[type=submit]").await;
    let listed = b.text_of("#commands-list [data-command]").await;
    assert!(
        listed.contains("reboot") && listed.contains("succeeded"),
        "{listed}"
    );
    audit.check(&b, "commands").await;

    // A job the API refuses: its 422, in the API's words.
    b.click("nav a[data-view=jobs]").await;
    b.type_in("#job-name", &"x".repeat(129)).await;
    b.select("#job-target-mode", "devices").await;
    b.type_in("#job-target", "pump-1").await;
    b.click("#job-form button[type=submit]").await;
    let invalid = b.text_of("main .problem[data-status='422']").await;
    assert!(
        invalid.contains("Invalid request body") && invalid.contains("1 to 128 characters"),
        "{invalid}"
    );
    audit.check(&b, "jobs (a job refused)").await;

    // A job launching one device a minute, canceled from its page after
    // the first.
    b.type_in("#job-name", "slow-update").await;
    b.type_in("#job-target", "pump-1, pump-2").await;
    b.type_in("#job-per-minute", "1").await;
    b.click("#job-form button[type=submit]").await;
    b.until(
        "one execution succeeded",
        "return document.querySelector('#job-progress[data-state=in_progress] [data-progress=\"50\"]') !== null",
        json!([]),
    )
    .await;
    b.click("#job-cancel").await;
    b.until(
        "the job canceled",
        "return document.querySelector('#job-progress[data-state=canceled]') !== null",
        json!([]),
    )
    .await;
    assert_eq!(
        b.text_of("#job-progress [data-count=canceled]")
            .await
            .trim(),
        "canceled 1"
    );

    // A job over the north site, rolled out to 100 %.
    b.click("nav a[data-view=jobs]").await;
    b.type_in("#job-name", "update-firmware").await;
    b.type_in("#job-params", r#"{"version": "2.4.1"}"#).await;
    b.select("#job-target-mode", "labels").await;
    b.type_in("#job-target", "site=north").await;
    b.type_in("#job-per-minute", "600").await;
    b.type_in("#job-in-flight", "1").await;
    b.click("#job-form button[type=submit]").await;
    b.until(
        "the job completed at 100 %",
        "return document.querySelector('#job-progress[data-state=completed] [data-progress=\"100\"]') !== null",
        json!([]),
    )
    .await;
    let counts = b.text_of("#job-progress [data-count=succeeded]").await;
    assert_eq!(counts.trim(), "succeeded 2");
    b.shot("job").await;
    audit.check(&b, "job").await;
    b.click("nav a[data-view=jobs]").await;
    b.element("#jobs-list [data-job] [role=progressbar]").await;
    audit.check(&b, "jobs").await;

    // A device with more commands than the page lists shows its newest.
    let mut last = String::new();
    for i in 0..25 {
        let r: Value = api
            .post(format!("{base}/v1/devices/valve-1/commands"))
            .bearer_auth(&admin)
            .json(&json!({"name": format!("step-{i}")}))
            .send()
            .await
            .expect("command")
            .json()
            .await
            .expect("command json");
        last = r["id"].as_str().expect("id").to_string();
    }
    b.goto(&format!("{base}/#/device/valve-1")).await;
    let first = b
        .until(
            "the newest command first",
            "const rows = document.querySelectorAll('#device-commands [data-command]'); \
             return rows.length === 20 && rows[0].dataset.command",
            json!([]),
        )
        .await;
    assert_eq!(first, json!(last));

    // Live: an event as it happens, and the connected devices charted.
    b.click("nav a[data-view=live]").await;
    b.until(
        "the stream is live",
        "return document.querySelector('#live-state')?.innerText === 'live'",
        json!([]),
    )
    .await;
    let r = api
        .post(format!("{base}/v1/devices/valve-1/commands"))
        .bearer_auth(&admin)
        .json(&json!({"name": "close"}))
        .send()
        .await
        .expect("command");
    assert_eq!(r.status(), 201);
    b.until(
        "the command's events",
        "return document.querySelector('#live-events [data-event=\"command.issued\"]') !== null",
        json!([]),
    )
    .await;
    b.until(
        "three connected devices charted",
        "return document.querySelector('#chart-sessions')?.dataset.last === '3'",
        json!([]),
    )
    .await;
    b.until(
        "a command rate charted",
        "const v = document.querySelector('#chart-commands')?.dataset.last; return v !== undefined && v !== ''",
        json!([]),
    )
    .await;
    b.until(
        "a device message rate charted",
        "const v = document.querySelector('#chart-messages')?.dataset.last; return v !== undefined && v !== ''",
        json!([]),
    )
    .await;
    b.shot("live").await;
    audit.check(&b, "live").await;

    // The token is revoked: the console returns to sign-in with the 401's detail.
    let r = api
        .delete(format!("{base}/v1/tokens/{token_id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("revoke");
    assert!(r.status().is_success(), "{}", r.status());
    let why = b
        .text_of("#signin-problem .problem[data-status='401']")
        .await;
    assert!(why.contains("not known to this gateway"), "{why}");
    let left = b
        .js("return sessionStorage.getItem('entente.token')", json!([]))
        .await;
    assert_eq!(left, Value::Null, "the revoked token is forgotten");
    b.shot("signed-out").await;
    audit.check(&b, "sign-in (signed out)").await;

    // Nothing the policy refused, no script error.
    let log = b.log().await;
    for line in &log {
        assert!(
            !line.contains("Content Security Policy") && !line.contains("Uncaught"),
            "the browser said: {line}"
        );
    }

    // Every view: no serious or critical accessibility violation.
    audit.assert_clean(11);

    // The README's picture.
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console.png");
    if std::env::var_os("ENTENTE_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(shots.join("device.png"), &docs).expect("copy the screenshot");
    }
    b.close().await;
    drop(driver);
    for d in devices {
        d.abort();
    }
    gw.stop().await;
}

/// Three gateways on loopback listeners, and the admin token (once every
/// gateway has applied it).
async fn group(dir: &Path) -> (Vec<gateway::Gateway>, String) {
    let listeners: Vec<gateway::Listeners> = (0..3).map(|_| common::loopback_listeners()).collect();
    let peers: Vec<(u64, std::net::SocketAddr)> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, common::addr_of(&l.peer)))
        .collect();
    let starts: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let id = i as u64 + 1;
            let mut c = Config::single(
                dir.join(format!("g{id}")),
                "127.0.0.1:0".parse().expect("addr"),
                peers[i].1,
            );
            c.node_id = id;
            c.peers = peers.iter().map(|(id, a)| (*id, (*a).into())).collect();
            c.cluster_secret = Some("console-test-secret".into());
            c.tick = Duration::from_millis(5);
            tokio::spawn(gateway::start_with(c, l))
        })
        .collect();
    let mut gws = Vec::new();
    for s in starts {
        gws.push(s.await.expect("join").expect("start"));
    }
    let (file, applied) = gws
        .iter()
        .find_map(|g| {
            g.admin_token_file
                .clone()
                .map(|f| (f, g.db().applied_index()))
        })
        .expect("the first leader wrote the admin token");
    let token = std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_string();
    let deadline = Instant::now() + WAIT;
    while gws.iter().any(|g| g.db().applied_index() < applied) {
        assert!(
            Instant::now() < deadline,
            "the admin token was not applied everywhere"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (gws, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_view_warns_of_a_member_the_leader_cannot_reach() {
    let Some((driver_path, browser_path)) = browser_or_skip("the_group_view") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let shots = tempfile::Builder::new()
        .prefix("entente-console-group-")
        .tempdir()
        .expect("tempdir")
        .keep();
    println!("console screenshots in {}", shots.display());
    let (mut gws, token) = group(&tmp.path().join("group")).await;
    let api = http();
    let leader = {
        let deadline = Instant::now() + WAIT;
        loop {
            let r: Value = api
                .get(format!("http://{}/v1/cluster", gws[0].http_addr))
                .bearer_auth(&token)
                .send()
                .await
                .expect("cluster")
                .json()
                .await
                .expect("cluster json");
            if let Some(l) = r["leader"].as_u64() {
                break l;
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let at = |id: u64| gws.iter().position(|g| g.node().status().raft.id == id);
    let base = format!("http://{}", gws[at(leader).expect("the leader")].http_addr);

    let driver = Driver::start(&driver_path);
    let b = Browser::open(&driver, &browser_path, &tmp.path().join("profile"), shots).await;
    b.goto(&format!("{base}/#/group")).await;
    b.type_in("#token", &token).await;
    b.click("#signin button[type=submit]").await;
    b.until(
        "three members, all healthy",
        "const rows = [...document.querySelectorAll('#group-members [data-member]')]; \
         return rows.length === 3 && rows.every(r => r.querySelector('[data-badge=ok]'))",
        json!([]),
    )
    .await;
    assert_eq!(b.text_of("#group-leader").await, leader.to_string());
    // Every member's own commit and applied index and term are shown on
    // its row, as it reported them (followers' too), with how long ago:
    // "now" on the leader's own row.
    const CELLS: &str = "const r = document.querySelector(`#group-members [data-member='${arguments[0]}']`); \
         const v = r && Object.fromEntries(['commit', 'applied', 'term', 'reported'] \
           .map(f => [f, r.querySelector(`[data-field=${f}]`).innerText])); \
         return v && /^(now|.* ago)$/.test(v.reported) && v";
    let numeric = |v: &Value, f: &str| v[f].as_str().is_some_and(|t| t.parse::<u64>().is_ok());
    for g in &gws {
        let id = g.node().status().raft.id;
        let v = b
            .until(
                "a member's reported indexes and their age",
                CELLS,
                json!([id]),
            )
            .await;
        for f in ["commit", "applied", "term"] {
            assert!(numeric(&v, f), "member {id}: {v}");
        }
        if id == leader {
            assert_eq!(v["reported"], "now", "{v}");
        } else {
            assert!(
                v["reported"].as_str().is_some_and(|t| t.ends_with(" ago")),
                "{v}"
            );
        }
    }
    let a_follower = gws
        .iter()
        .map(|g| g.node().status().raft.id)
        .find(|&id| id != leader)
        .expect("a follower");
    let row = |id: u64| {
        b.js(
            "return document.querySelector(`#group-members [data-member='${arguments[0]}']`).innerText",
            json!([id]),
        )
    };
    let follower_row = row(a_follower).await;
    assert!(
        follower_row
            .as_str()
            .is_some_and(|t| !t.contains("unknown")),
        "{follower_row}"
    );
    assert_eq!(
        b.js(
            "return document.querySelectorAll('#group-warnings .notice').length",
            json!([])
        )
        .await,
        json!(0)
    );

    // A follower goes away: the leader's console says it cannot reach it.
    let follower = gws.remove(
        gws.iter()
            .position(|g| g.node().status().raft.id != leader)
            .expect("a follower"),
    );
    let lost = follower.node().status().raft.id;
    follower.crash().await;
    b.until(
        "the warning",
        "return [...document.querySelectorAll('#group-warnings .notice')] \
           .some(n => n.innerText === arguments[0])",
        json!([format!("Member {lost} is unreachable from the leader.")]),
    )
    .await;
    b.until(
        "the member marked unreachable",
        "return document.querySelector(`#group-members [data-member='${arguments[0]}'] [data-badge=unreachable]`) !== null",
        json!([lost]),
    )
    .await;
    // Its row keeps the last numbers it reported, aging.
    let last = b.until("its last numbers", CELLS, json!([lost])).await;
    for f in ["commit", "applied", "term"] {
        assert!(numeric(&last, f), "member {lost}: {last}");
    }
    b.shot("group-member-lost").await;

    // The other follower too: no quorum. The leader steps down, and the
    // console says there is no leader and shows /readyz's 503 detail.
    let other = gws.remove(
        gws.iter()
            .position(|g| g.node().status().raft.id != leader)
            .expect("the other follower"),
    );
    other.crash().await;
    b.until(
        "no leader",
        "return [...document.querySelectorAll('#group-warnings .notice')] \
           .some(n => n.innerText.startsWith('No leader is known'))",
        json!([]),
    )
    .await;
    let health = b
        .until(
            "readyz failing",
            "const t = document.querySelector('#group-health')?.innerText; \
             return t && t.includes('failing') && t",
            json!([]),
        )
        .await;
    let readyz: Value = api
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("problem");
    let detail = readyz["detail"].as_str().expect("detail");
    assert!(
        health.as_str().expect("text").contains(detail),
        "{health} does not show {detail}"
    );
    b.shot("group-no-quorum").await;
    b.close().await;
    drop(driver);
    for g in gws {
        g.stop().await;
    }
}
