//! The README check, shared by the tests of the crates whose binaries the
//! READMEs use (`gateway/tests/readme.rs`, `example-kv/tests/readme.rs`,
//! `device-sim/tests/readme.rs`).
//!
//! Every ```` ```sh ```` block of `README.md` and `device-sim/README.md` is
//! preceded by a marker naming who checks it and how:
//!
//! ```text
//! <!-- readme-check: RUNNER MODE ["READY TEXT" [COUNT]] -->
//! ```
//!
//! - `gateway`, `example-kv`, `device-sim`: that crate's test runs the
//!   block. `run`: its commands must succeed. `start`: it starts servers
//!   (in the background, as a reader would in another terminal); the next
//!   block waits until the block's output shows READY TEXT (COUNT times).
//!   `help`: not run, but every `--flag` it uses must be in the `--help`
//!   of the command it names.
//! - `static`: not run (too long for CI, or it is CI's own command); the
//!   gateway's test checks that what it names exists (see [`check_static`]).
//!
//! A runner's blocks run in order as one bash script (so variables carry
//! over), in a temporary directory, with these substitutions: `cargo build`
//! is a no-op and `cargo run --release -p NAME [--]` / `target/release/NAME`
//! are the binaries cargo built for the test; every `127.0.0.1:PORT` and
//! `localhost:PORT` (and the gateway's default ports, through its
//! `ENTENTE_*_LISTEN` variables) is moved to a free port; `curl` fails on
//! an HTTP error; a runner may cap flags such as `--devices` to keep CI
//! fast. Whatever the blocks started is stopped with SIGINT at the end and
//! must exit within 30 s.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The README files checked, relative to the workspace root.
pub const READMES: &[&str] = &["README.md", "device-sim/README.md"];

/// The runners, each the crate whose test runs its blocks.
pub const RUNNERS: &[&str] = &["gateway", "example-kv", "device-sim"];

/// How long one runner's script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a `start` block may take to show its ready text.
const READY_TIMEOUT_TENTHS: u32 = 600;
/// How long started processes may take to stop after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a block is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Run; must succeed.
    Run,
    /// Run in the background until the end; ready when its output shows
    /// `ready` `count` times.
    Start {
        /// Text the output must show.
        ready: String,
        /// How many times.
        count: usize,
    },
    /// Its flags are checked against `--help`.
    Help,
    /// Checked statically.
    Static,
}

/// One ```` ```sh ```` block.
#[derive(Debug, Clone)]
pub struct Block {
    /// README file, relative to the workspace root.
    pub file: String,
    /// Line of the opening fence (1-based).
    pub line: usize,
    /// Who checks it (a crate of [`RUNNERS`], or `static`).
    pub runner: String,
    /// How.
    pub mode: Mode,
    /// Its text.
    pub text: String,
}

impl Block {
    /// Where it is, for messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    /// Its commands: continuation lines joined, comments and blank lines
    /// dropped.
    pub fn commands(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for line in self.text.lines() {
            let line = strip_comment(line);
            let line = line.trim();
            if let Some(head) = line.strip_suffix('\\') {
                cur.push_str(head);
                cur.push(' ');
                continue;
            }
            cur.push_str(line);
            let cmd = cur.split_whitespace().collect::<Vec<_>>().join(" ");
            if !cmd.is_empty() {
                out.push(cmd);
            }
            cur.clear();
        }
        out
    }
}

/// A line without its `# comment` (a `#` at the start or after a space,
/// outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// The workspace root (the parent of the crate running the test).
pub fn root() -> PathBuf {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    Path::new(&manifest)
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every ```` ```sh ```` block of `file` with its marker; panics, saying
/// how to mark it, at a block without a valid one.
pub fn blocks(file: &str) -> Vec<Block> {
    let path = root().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if !fence.starts_with("```sh") {
            i += 1;
            continue;
        }
        let start = i + 1;
        let end = (start..lines.len())
            .find(|&j| lines[j].trim_start().starts_with("```"))
            .unwrap_or_else(|| panic!("{file}:{start}: unterminated code block"));
        let marker = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim())
            .unwrap_or_default();
        let (runner, mode) = parse_marker(marker).unwrap_or_else(|why| {
            panic!(
                "{file}:{start}: this sh block has no valid README check marker ({why}); put \
                 `<!-- readme-check: RUNNER MODE -->` on the line before it (see \
                 gateway/tests/support/readme.rs): a command in the README is either run by a \
                 test or checked statically"
            )
        });
        out.push(Block {
            file: file.to_string(),
            line: start,
            runner,
            mode,
            text: lines[start..end].join("\n"),
        });
        i = end + 1;
    }
    out
}

fn parse_marker(line: &str) -> Result<(String, Mode), String> {
    let inner = line
        .strip_prefix("<!-- readme-check:")
        .and_then(|l| l.strip_suffix("-->"))
        .ok_or("no marker")?
        .trim();
    let (runner, rest) = inner.split_once(' ').unwrap_or((inner, ""));
    let rest = rest.trim();
    if runner == "static" {
        return if rest.is_empty() {
            Ok((runner.into(), Mode::Static))
        } else {
            Err(format!("`static` takes nothing after it, got {rest:?}"))
        };
    }
    if !RUNNERS.contains(&runner) {
        return Err(format!(
            "unknown runner {runner:?}, not one of {RUNNERS:?} or static"
        ));
    }
    let (mode, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let mode = match mode {
        "run" => Mode::Run,
        "help" => Mode::Help,
        "start" => {
            let rest = rest.trim();
            let quoted = rest
                .strip_prefix('"')
                .and_then(|r| r.split_once('"'))
                .ok_or("`start` needs the text that shows it is ready, in double quotes")?;
            let count = match quoted.1.trim() {
                "" => 1,
                n => n.parse().map_err(|_| format!("bad count {n:?}"))?,
            };
            return Ok((
                runner.into(),
                Mode::Start {
                    ready: quoted.0.to_string(),
                    count,
                },
            ));
        }
        other => return Err(format!("unknown mode {other:?}: run, start or help")),
    };
    if !rest.trim().is_empty() {
        return Err(format!("unexpected {rest:?}"));
    }
    Ok((runner.into(), mode))
}

/// The leading `NAME=value` assignments of a command, and the rest.
fn split_assignments(cmd: &str) -> (Vec<String>, Vec<String>) {
    let mut words = cmd.split_whitespace().peekable();
    let mut vars = Vec::new();
    while let Some(w) = words.peek() {
        match w.split_once('=') {
            Some((name, _))
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
            {
                vars.push(name.to_string());
                words.next();
            }
            _ => break,
        }
    }
    (vars, words.map(str::to_string).collect())
}

/// The directory of workspace package `name`.
fn package_dir(name: &str) -> Result<PathBuf, String> {
    let root = root();
    for entry in std::fs::read_dir(&root).map_err(|e| e.to_string())? {
        let dir = entry.map_err(|e| e.to_string())?.path();
        let manifest = dir.join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&manifest)
            && text
                .lines()
                .any(|l| l.trim() == format!("name = \"{name}\""))
        {
            return Ok(dir);
        }
    }
    Err(format!("no workspace package {name:?}"))
}

/// Text of a file, or of every file under a directory.
fn read_all(path: &Path) -> String {
    if path.is_dir() {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                out.push_str(&read_all(&e.path()));
            }
        }
        out
    } else {
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

/// The static check of one command of a `static` block:
///
/// - `cargo test --workspace --locked` is what `.ci/run` runs (it must be a
///   line of it);
/// - `cargo test … -p P [--test T] …`: package P (and its test T) exist,
///   and every `NAME=` knob set before it is read by P's tests;
/// - `cargo bench -p P`: P has benchmarks;
/// - `path/script.sh`: the script exists, is executable, reads every knob
///   set before it and passes `bash -n`;
/// - `docker compose …` / `docker build …`: `docker-compose.yml` /
///   `Dockerfile` exists (other `docker` commands act on what they made).
pub fn check_static(cmd: &str) -> Result<(), String> {
    let root = root();
    let (vars, words) = split_assignments(cmd);
    let word = |i: usize| words.get(i).map(String::as_str);
    let flag = |f: &str| {
        words
            .iter()
            .position(|w| w == f)
            .and_then(|i| words.get(i + 1))
            .cloned()
    };
    let knobs_in = |text: &str, what: &str| -> Result<(), String> {
        for v in &vars {
            if !text.contains(v.as_str()) {
                return Err(format!("{what} does not read {v}"));
            }
        }
        Ok(())
    };
    match (word(0), word(1)) {
        (Some("cargo"), Some("test")) if vars.is_empty() && words.len() == 4 => {
            let ci = std::fs::read_to_string(root.join(".ci/run")).map_err(|e| e.to_string())?;
            if ci.lines().any(|l| l.trim() == cmd) {
                Ok(())
            } else {
                Err("not a command .ci/run runs".into())
            }
        }
        (Some("cargo"), Some("test")) => {
            let package = flag("-p").ok_or("names no package (-p)")?;
            let dir = package_dir(&package)?;
            let tests = match flag("--test") {
                Some(t) => {
                    let file = dir.join("tests").join(format!("{t}.rs"));
                    if !file.is_file() {
                        return Err(format!("{} does not exist", file.display()));
                    }
                    let mut text = read_all(&file);
                    text.push_str(&read_all(&dir.join("tests").join(&t)));
                    text
                }
                None => read_all(&dir.join("tests")),
            };
            knobs_in(&tests, &format!("the tests of {package}"))
        }
        (Some("cargo"), Some("bench")) => {
            let package = flag("-p").ok_or("names no package (-p)")?;
            let dir = package_dir(&package)?;
            let manifest = read_all(&dir.join("Cargo.toml"));
            if manifest.contains("[[bench]]") && dir.join("benches").is_dir() {
                Ok(())
            } else {
                Err(format!("{package} has no benchmarks"))
            }
        }
        (Some("docker"), Some(sub)) => {
            // Not run (CI has no container engine); what it builds from exists.
            let needs = match sub {
                "compose" => "docker-compose.yml",
                "build" => "Dockerfile",
                _ => return Ok(()),
            };
            if root.join(needs).is_file() {
                Ok(())
            } else {
                Err(format!("there is no {needs}"))
            }
        }
        (Some(script), _) if script.contains('/') && !script.starts_with("target/") => {
            let path = root.join(script);
            let meta = std::fs::metadata(&path).map_err(|e| format!("{script}: {e}"))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o111 == 0 {
                    return Err(format!("{script} is not executable"));
                }
            }
            let _ = meta;
            knobs_in(&read_all(&path), script)?;
            let ok = Command::new("bash")
                .arg("-n")
                .arg(&path)
                .status()
                .map_err(|e| format!("bash: {e}"))?
                .success();
            if ok {
                Ok(())
            } else {
                Err(format!("{script} does not parse (bash -n)"))
            }
        }
        _ => Err(
            "no static check knows this command; run it from a crate's README test \
                  instead, or add a check to gateway/tests/support/readme.rs"
                .into(),
        ),
    }
}

/// `n` distinct free loopback ports (the OS picks them; released for the
/// script). Every listener is held until all are picked: a port released at
/// once can be handed out again by the next bind, and two README ports
/// standing for one made a gateway listen on another's address.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// The gateway's default listeners: `ENTENTE_*_LISTEN` moves them.
const GATEWAY_DEFAULTS: &[(&str, u16)] = &[
    ("ENTENTE_HTTP_LISTEN", 8080),
    ("ENTENTE_MQTT_LISTEN", 1883),
    ("ENTENTE_MQTT5_LISTEN", 1884),
    ("ENTENTE_RAFT_LISTEN", 7000),
];

/// One runner's blocks, ready to run in a temporary directory.
pub struct Runner {
    /// The runner's name.
    pub name: String,
    /// Its blocks, in README order.
    pub blocks: Vec<Block>,
    dir: tempfile::TempDir,
    ports: BTreeMap<u16, u16>,
    bins: BTreeMap<String, PathBuf>,
    caps: Vec<(String, f64)>,
}

impl Runner {
    /// The blocks of `file` that `name` runs (there must be some), with
    /// `bins` (binary name → path) for `target/release/NAME` and `cargo run
    /// -p NAME`.
    pub fn new(file: &str, name: &str, bins: &[(&str, &str)]) -> Runner {
        let blocks: Vec<Block> = blocks(file)
            .into_iter()
            .filter(|b| b.runner == name)
            .collect();
        assert!(!blocks.is_empty(), "{file} has no block for {name}");
        let mut all: Vec<u16> = GATEWAY_DEFAULTS.iter().map(|(_, p)| *p).collect();
        for b in &blocks {
            all.extend(ports_in(&b.text).into_iter().map(|(_, _, p)| p));
        }
        all.sort_unstable();
        all.dedup();
        let ports: BTreeMap<u16, u16> = all.iter().copied().zip(free_ports(all.len())).collect();
        Runner {
            name: name.to_string(),
            blocks,
            dir: tempfile::tempdir().expect("tempdir"),
            ports,
            bins: bins
                .iter()
                .map(|(n, p)| (n.to_string(), PathBuf::from(p)))
                .collect(),
            caps: Vec::new(),
        }
    }

    /// Caps the numeric value of `--flag` at `max` (to keep CI fast).
    pub fn cap(mut self, flag: &str, max: f64) -> Runner {
        self.caps.push((flag.to_string(), max));
        self
    }

    /// The directory the script runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The free port standing in for the README's `port`.
    pub fn port(&self, port: u16) -> u16 {
        *self
            .ports
            .get(&port)
            .unwrap_or_else(|| panic!("port {port} is not in the README blocks"))
    }

    /// The block's text with the substitutions of the module documentation.
    fn rewrite(&self, b: &Block) -> String {
        let mut out = Vec::new();
        for line in b.text.lines() {
            if line.trim_start().starts_with("cargo build ") {
                assert!(
                    !line.trim_end().ends_with('\\'),
                    "{}: a `cargo build` line is replaced whole; no continuation",
                    b.at()
                );
                out.push(": # built by cargo for this test".to_string());
                continue;
            }
            let mut l = line.to_string();
            for (name, path) in &self.bins {
                let quoted = format!("'{}'", path.display());
                l = l.replace(&format!("cargo run --release -p {name} --"), &quoted);
                l = l.replace(&format!("cargo run --release -p {name}"), &quoted);
                l = l.replace(&format!("./target/release/{name}"), &quoted);
                l = l.replace(&format!("target/release/{name}"), &quoted);
            }
            assert!(
                !l.contains("target/release/") && !l.contains("cargo run"),
                "{}: {line:?} uses a binary the {} test does not have",
                b.at(),
                self.name
            );
            for (start, end, port) in ports_in(&l).into_iter().rev() {
                l.replace_range(start..end, &self.ports[&port].to_string());
            }
            for (flag, max) in &self.caps {
                l = cap_flag(&l, flag, *max);
            }
            out.push(l);
        }
        out.join("\n")
    }

    /// The script of all blocks.
    pub fn script(&self) -> String {
        let mut s = String::from(
            "set -e\n\
             curl() { command curl --fail --show-error \"$@\"; }\n\
             readme_wait() {\n\
             \x20 for _ in $(seq 1 \"$4\"); do\n\
             \x20   [ \"$(grep -cF -- \"$2\" \"$1\")\" -ge \"$3\" ] && return 0\n\
             \x20   sleep 0.1\n\
             \x20 done\n\
             \x20 echo \"README check: $1 never showed '$2' $3 time(s):\"; cat \"$1\"; return 1\n\
             }\n",
        );
        for (k, b) in self.blocks.iter().enumerate() {
            s.push_str(&format!("\n# ---- {} ({:?})\n", b.at(), b.mode));
            let body = self.rewrite(b);
            match &b.mode {
                Mode::Run => {
                    s.push_str(&body);
                    s.push('\n');
                }
                Mode::Start { ready, count } => {
                    assert!(!ready.contains('\''), "{}: no ' in the ready text", b.at());
                    s.push_str(&format!(
                        "(\n{body}\n) > start-{k}.log 2>&1 &\n\
                         readme_wait start-{k}.log '{ready}' {count} {READY_TIMEOUT_TENTHS}\n"
                    ));
                }
                Mode::Help => {
                    for cmd in b.commands() {
                        s.push_str(&self.help_check(b, &cmd));
                    }
                }
                Mode::Static => unreachable!("static blocks have no runner"),
            }
        }
        s
    }

    /// Shell lines checking that every `--flag` of `cmd` is in the
    /// `--help` of its binary and subcommand.
    fn help_check(&self, b: &Block, cmd: &str) -> String {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let bin = words
            .first()
            .and_then(|w| w.rsplit('/').next())
            .and_then(|name| self.bins.get(name))
            .unwrap_or_else(|| panic!("{}: {cmd:?} names no binary of this test", b.at()));
        let sub: Vec<&str> = words[1..]
            .iter()
            .take_while(|w| !w.starts_with('-'))
            .copied()
            .collect();
        let mut s = format!("help=$('{}' {} --help)\n", bin.display(), sub.join(" "));
        for w in &words[1..] {
            if let Some(f) = w.strip_prefix("--") {
                let f = f.split('=').next().unwrap_or(f);
                s.push_str(&format!(
                    "grep -qF -- '--{f}' <<< \"$help\" || {{ echo 'README check: {}: --{f} is not a flag'; exit 1; }}\n",
                    b.at()
                ));
            }
        }
        s
    }

    /// Runs the script: it must succeed; then what it started is stopped
    /// with SIGINT and must exit. Returns everything it printed.
    pub fn run(&self) -> String {
        let script = self.script();
        let path = self.dir().join(format!("readme-{}.sh", self.name));
        std::fs::write(&path, &script).expect("write script");
        let mut cmd = Command::new("bash");
        cmd.arg(&path)
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("ENTENTE_") || k == "RUST_LOG" || k == "NO_COLOR" {
                cmd.env_remove(&key);
            }
        }
        for (var, port) in GATEWAY_DEFAULTS {
            cmd.env(var, format!("127.0.0.1:{}", self.ports[port]));
        }
        let mut child = cmd
            .spawn()
            .expect("bash (the README check runs the README's commands with it)");
        let group = Group(child.id());
        let out = Arc::new(Mutex::new(Vec::new()));
        let readers: Vec<_> = [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ]
        .into_iter()
        .map(|r| {
            let out = out.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    out.lock().unwrap_or_else(|e| e.into_inner()).push(l);
                }
            })
        })
        .collect();
        let text = |out: &Arc<Mutex<Vec<String>>>| {
            out.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
        };
        let deadline = Instant::now() + SCRIPT_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                panic!(
                    "the {} README commands did not finish in {SCRIPT_TIMEOUT:?}\n{}\n{}",
                    self.name,
                    self.dump(&script),
                    text(&out)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "the {} README commands failed ({status})\n{}\n--- output ---\n{}",
            self.name,
            self.dump(&script),
            text(&out)
        );
        let stopped = group.stop();
        for r in readers {
            let _ = r.join();
        }
        assert!(
            stopped,
            "what the {} README commands started did not stop within {STOP_TIMEOUT:?} of \
             SIGINT\n{}",
            self.name,
            text(&out)
        );
        text(&out)
    }

    /// The script and the logs of the blocks started in the background.
    fn dump(&self, script: &str) -> String {
        let mut s = format!("--- script ---\n{script}\n");
        for k in 0..self.blocks.len() {
            let log = self.dir().join(format!("start-{k}.log"));
            if let Ok(text) = std::fs::read_to_string(&log) {
                s.push_str(&format!("--- start-{k}.log ---\n{text}\n"));
            }
        }
        s
    }
}

/// The process group of the script: whatever it started in the background.
struct Group(u32);

impl Group {
    /// Signals the group (bash's own `kill`, so no other tool is needed).
    fn signal(&self, sig: &str) -> bool {
        Command::new("bash")
            .arg("-c")
            .arg(format!("kill {sig} -- -{}", self.0))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGINT, then waits until the group is empty; false if it is not
    /// within [`STOP_TIMEOUT`] (it is then killed).
    fn stop(&self) -> bool {
        if !self.signal("-INT") {
            return true;
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !self.signal("-0") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal("-KILL");
    }
}

/// Every `127.0.0.1:PORT` and `localhost:PORT` in `text`: the byte range
/// of the port and its value.
fn ports_in(text: &str) -> Vec<(usize, usize, u16)> {
    let mut out = Vec::new();
    for host in ["127.0.0.1:", "localhost:"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(host) {
            let start = from + i + host.len();
            let end = start
                + text[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(text.len() - start);
            if let Ok(p) = text[start..end].parse() {
                out.push((start, end, p));
            }
            from = end;
        }
    }
    out.sort();
    out
}

/// `line` with the number after `flag` (a whole word) at most `max`.
fn cap_flag(line: &str, flag: &str, max: f64) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut cap_next = false;
    for w in words {
        if cap_next {
            cap_next = false;
            if let Ok(v) = w.parse::<f64>()
                && v > max
            {
                out.push(format!("{max}"));
                continue;
            }
        }
        cap_next = w == flag;
        out.push(w.to_string());
    }
    out.join(" ")
}

#[test]
fn the_readme_check_parses_its_markers_and_rewrites() {
    assert_eq!(
        parse_marker("<!-- readme-check: gateway start \"admin token:\" -->"),
        Ok((
            "gateway".into(),
            Mode::Start {
                ready: "admin token:".into(),
                count: 1
            }
        ))
    );
    assert_eq!(
        parse_marker("<!-- readme-check: example-kv start \"READY\" 3 -->"),
        Ok((
            "example-kv".into(),
            Mode::Start {
                ready: "READY".into(),
                count: 3
            }
        ))
    );
    assert_eq!(
        parse_marker("<!-- readme-check: static -->"),
        Ok(("static".into(), Mode::Static))
    );
    assert!(parse_marker("<!-- readme-check: nobody run -->").is_err());
    assert!(parse_marker("<!-- readme-check: gateway start -->").is_err());
    assert!(parse_marker("Some prose.").is_err());
    assert_eq!(
        cap_flag(
            "x --devices 10000 --rate 0.5 --report-rate 7",
            "--rate",
            0.1
        ),
        "x --devices 10000 --rate 0.1 --report-rate 7"
    );
    assert_eq!(
        ports_in("a localhost:8080/v1 b=127.0.0.1:7001,c"),
        vec![(12, 16, 8080), (32, 36, 7001)]
    );
    assert_eq!(strip_comment("echo 'a # b' # c"), "echo 'a # b' ");
    assert_eq!(check_static("cargo test --workspace --locked"), Ok(()));
    assert_eq!(
        check_static("CHAOS_SEED=1 cargo test -p gateway --test chaos"),
        Ok(())
    );
    assert!(check_static("NOT_A_KNOB=1 cargo test -p gateway --test chaos").is_err());
    assert!(check_static("cargo test -p gateway --test no_such_test").is_err());
    assert!(check_static("cargo test -p no-such-package").is_err());
    assert!(check_static("cargo test --workspace --frozen").is_err());
    assert!(check_static("rm -rf data").is_err());
    assert!(check_static("target/release/gateway").is_err());
    assert_eq!(check_static("docker compose up -d"), Ok(()));
    assert_eq!(
        split_assignments("A=1 B_C=2 cargo test"),
        (
            vec!["A".to_string(), "B_C".to_string()],
            vec!["cargo".to_string(), "test".to_string()]
        )
    );
}

#[test]
fn the_ports_standing_in_for_the_readme_ports_are_distinct() {
    // Released one at a time, 500 picks of the OS collide almost surely
    // (the birthday bound over ~28,000 ephemeral ports).
    let mut ports = free_ports(500);
    ports.sort_unstable();
    let before = ports.len();
    ports.dedup();
    assert_eq!(ports.len(), before, "a free port was handed out twice");
}
