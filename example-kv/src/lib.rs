//! Process harness for the example group: start `entente-kv` processes on
//! loopback, talk its line protocol, find the leader. Used by the kill -9
//! test and the group benchmark.
#![deny(missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// One `entente-kv` process.
#[derive(Debug)]
pub struct Proc {
    /// Its node id.
    pub id: u64,
    child: Option<Child>,
    /// Its peer (raft) address.
    pub raft: SocketAddr,
    /// Its client address.
    pub client: SocketAddr,
    /// Its data directory.
    pub dir: PathBuf,
}

impl Proc {
    /// Starts node `id` of a three-voter group from `bin`, with its data in
    /// `dir`, listening for peers on `raft` (port 0 for any), and waits for
    /// its READY line.
    ///
    /// # Panics
    /// If the process cannot be started or does not print READY.
    pub fn spawn(bin: &str, id: u64, dir: &Path, raft: SocketAddr, extra: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args([
                "--id",
                &id.to_string(),
                "--voters",
                "1,2,3",
                "--secret",
                "kill-test-secret",
            ])
            .args([
                "--raft-listen",
                &raft.to_string(),
                "--client-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start entente-kv");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("READY line");
        let mut raft_addr = None;
        let mut client = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("raft=") {
                raft_addr = a.parse().ok();
            }
            if let Some(a) = part.strip_prefix("client=") {
                client = a.parse().ok();
            }
        }
        Proc {
            id,
            child: Some(child),
            raft: raft_addr.unwrap_or_else(|| panic!("node {id} printed {line:?}")),
            client: client.unwrap_or_else(|| panic!("node {id} printed {line:?}")),
            dir: dir.to_path_buf(),
        }
    }

    /// SIGKILLs the process (if running) and reaps it.
    ///
    /// # Panics
    /// If the signal cannot be sent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reap");
        }
    }

    /// Whether it is running.
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One request, one reply line (or several for DUMP), within 8 seconds.
pub async fn request(addr: SocketAddr, line: &str) -> Result<Vec<String>, String> {
    let fut = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (r, mut w) = stream.into_split();
        w.write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut lines = AsyncBufReader::new(r).lines();
        let mut out = Vec::new();
        while let Some(l) = lines.next_line().await.map_err(|e| e.to_string())? {
            let done = !l.starts_with("ENTRY");
            out.push(l);
            if done {
                break;
            }
        }
        Ok(out)
    };
    timeout(Duration::from_secs(8), fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// The parts of a STATUS reply the harness uses.
#[derive(Debug)]
pub struct Status {
    /// Role name.
    pub role: String,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Number of fsyncs.
    pub syncs: u64,
    /// Entries persisted.
    pub entries: u64,
}

/// Asks a node for its status.
pub async fn status(addr: SocketAddr) -> Option<Status> {
    let r = request(addr, "STATUS").await.ok()?;
    let f: Vec<&str> = r.first()?.split_whitespace().collect();
    Some(Status {
        role: f.get(1)?.to_string(),
        commit: f.get(4)?.parse().ok()?,
        applied: f.get(5)?.parse().ok()?,
        syncs: f.get(6)?.parse().ok()?,
        entries: f.get(7)?.parse().ok()?,
    })
}

/// The index of the process that says it leads, if any.
pub async fn find_leader(procs: &[Proc]) -> Option<usize> {
    for (i, p) in procs.iter().enumerate() {
        if p.alive() && status(p.client).await.is_some_and(|s| s.role == "leader") {
            return Some(i);
        }
    }
    None
}

/// Tells every running process the peer addresses of the others.
///
/// # Panics
/// If a process refuses.
pub async fn introduce(procs: &[Proc]) {
    for p in procs.iter().filter(|p| p.alive()) {
        for q in procs.iter().filter(|q| q.id != p.id) {
            let r = request(p.client, &format!("PEER {} {}", q.id, q.raft)).await;
            assert_eq!(
                r.ok().and_then(|r| r.first().cloned()).as_deref(),
                Some("OK")
            );
        }
    }
}
