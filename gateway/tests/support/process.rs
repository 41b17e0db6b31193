//! A real `gateway` process for the tests that drive the binary: everything
//! it writes (stdout and stderr) is kept, and dropping it kills it. (Each
//! test binary uses a different part of this.)
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A running process and what it has written so far.
pub struct Proc {
    pub child: Child,
    pub out: Arc<Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain(stream: impl Read + Send + 'static, out: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let mut o = out.lock().expect("output");
            o.push_str(&line);
            o.push('\n');
        }
    });
}

/// Writes `secret` to `path`, readable by its owner only (as the gateway
/// expects of a secret file).
pub fn write_secret_file(path: &Path, secret: &str) {
    std::fs::write(path, secret).expect("secret file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}

impl Proc {
    /// Starts `command` with its output kept.
    pub fn start(mut command: Command) -> Proc {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gateway");
        let out = Arc::new(Mutex::new(String::new()));
        drain(child.stdout.take().expect("stdout"), out.clone());
        drain(child.stderr.take().expect("stderr"), out.clone());
        Proc { child, out }
    }

    /// What it wrote, without terminal colour codes.
    pub fn output(&self) -> String {
        strip_ansi(&self.out.lock().expect("output"))
    }

    /// Waits (bounded by `wait`) for a line of its output holding every needle.
    pub async fn wait_line(&self, needles: &[&str], wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        loop {
            let out = self.output();
            if let Some(l) = out.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no output line with {needles:?}; output:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends signal `sig` (a name such as `TERM`).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{sig} {pid}");
    }

    /// Its exit status, if it exits within `limit`.
    pub async fn exits_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `text` without ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Polls until `f` answers `Some`, at most `wait`, every 50 ms (a bounded
/// wait for a condition, not a sleep standing in for one).
pub async fn until_within<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    wait: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`until_within`] 15 s, the tests' usual bound.
pub async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    f: impl FnMut() -> F,
) -> T {
    until_within(what, Duration::from_secs(15), f).await
}
