//! A fault-injecting TCP proxy for one directed peer link.
//!
//! The peer transport dials each peer for its own outbound traffic and only
//! reads on the connections it accepts (see `coordinator::transport`), so the
//! link i→j is exactly the connections gateway i dials to gateway j. Gateway
//! i's `--peers` entry for j points at the proxy of i→j, which forwards to j's
//! real peer listener. Faults on that proxy therefore act on what i sends to
//! j (and on the few bytes j answers on those connections: the handshake and
//! snapshot acknowledgements).
//!
//! Faults ([`Mode`]):
//! - `Pass { delay, jitter }`: forward, holding every chunk for `delay` plus
//!   up to `jitter` (order is kept; throughput is not limited);
//! - `Cut`: close every open connection and close new ones at once (what a
//!   crashed router or a firewall sending resets looks like). Dropping bytes
//!   inside a TCP stream would only corrupt the framing, so "message loss" is
//!   modelled as cutting connections: the transport reconnects and Raft
//!   retransmits;
//! - `Stall`: keep connections open but move no bytes, and accept new ones
//!   without forwarding (a silent partition: the sender sees no error until
//!   its own timeouts fire). On heal the held bytes flow again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass { delay_ms: u64, jitter_ms: u64 },
    Cut,
    Stall,
}

impl Mode {
    pub const HEALTHY: Mode = Mode::Pass {
        delay_ms: 0,
        jitter_ms: 0,
    };
}

#[derive(Debug)]
pub struct Proxy {
    pub listen: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    mode: watch::Sender<Mode>,
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections end when they see the sender gone.
    }
}

impl Proxy {
    /// A proxy on a fresh loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port");
        let listen = listener.local_addr().expect("proxy address");
        let target = Arc::new(Mutex::new(target));
        let (mode, _) = watch::channel(Mode::HEALTHY);
        let connections = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            target.clone(),
            mode.clone(),
            connections.clone(),
            seed,
        ));
        Proxy {
            listen,
            target,
            mode,
            connections,
            task,
        }
    }

    /// Where new connections go (a restarted gateway may listen elsewhere).
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().expect("proxy target") = target;
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: Arc<Mutex<SocketAddr>>,
    mode: watch::Sender<Mode>,
    connections: Arc<AtomicU64>,
    seed: u64,
) {
    let mut n = 0u64;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        n += 1;
        if *mode.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        connections.fetch_add(1, Ordering::Relaxed);
        let to = *target.lock().expect("proxy target");
        let rx = mode.subscribe();
        tokio::spawn(serve(client, to, rx, Rng::fork(seed, n)));
    }
}

async fn serve(client: TcpStream, target: SocketAddr, mode: watch::Receiver<Mode>, rng: Rng) {
    let _ = client.set_nodelay(true);
    let server =
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let rng2 = Rng::fork(rng.clone().next_u64(), 2);
    let mut cut = mode.clone();
    // Either direction ending (EOF, error or a cut) ends the connection.
    tokio::select! {
        _ = pump(cr, sw, mode.clone(), rng) => {}
        _ = pump(sr, cw, mode, rng2) => {}
        _ = cut.wait_for(|m| *m == Mode::Cut) => {}
    }
}

/// Waits while the link is stalled; `false` if it is (or becomes) cut or the
/// proxy is gone.
async fn passable(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let m = *mode.borrow_and_update();
        match m {
            Mode::Cut => return false,
            Mode::Pass { .. } => return true,
            Mode::Stall => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<Mode>,
    mut rng: Rng,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut rmode = mode.clone();
    let reader = async move {
        let mut last = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !passable(&mut rmode).await {
                return;
            }
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                c = rmode.changed() => {
                    if c.is_err() { return; }
                    continue;
                }
            };
            let delay = match *rmode.borrow() {
                Mode::Pass {
                    delay_ms,
                    jitter_ms,
                } => {
                    delay_ms
                        + if jitter_ms > 0 {
                            rng.below(jitter_ms + 1)
                        } else {
                            0
                        }
                }
                _ => 0,
            };
            // Keep order: a chunk is never released before the one ahead of it.
            last = last.max(Instant::now() + Duration::from_millis(delay));
            if tx.send((last, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let mut wmode = mode;
    let writer = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if !passable(&mut wmode).await {
                return;
            }
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
    };
    // The reader finishing (EOF) still lets the writer flush what is queued.
    let (_, ()) = tokio::join!(reader, writer);
}
