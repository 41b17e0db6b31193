//! A replicated key-value map built only on `coordinator`'s public API: the
//! smallest complete example of embedding it, and the process the kill -9
//! tests start.
//!
//! ```text
//! entente-kv --id 1 --data-dir /tmp/kv1 --raft-listen 127.0.0.1:7001 \
//!     --client-listen 127.0.0.1:8001 --peers 2=127.0.0.1:7002,3=127.0.0.1:7003 \
//!     --voters 1,2,3 --secret s3cret [--consensus raft|multi-paxos|basic-paxos|pbft] \
//!     [--group-keys 1=<key>,2=<key>,3=<key>,4=<key>]
//! ```
//!
//! `--consensus` picks the group's consensus engine (default `raft`); every
//! member must run the same one. PBFT (3f+1 members, f Byzantine) signs
//! every message with each member's Ed25519 key, kept in its data directory
//! and created on first start: `entente-kv keys <data-dir>` prints it, and
//! `--group-keys` lists every voter's (required with more than one voter).
//!
//! Clients speak a line protocol on `--client-listen`:
//!
//! | request | reply |
//! |---|---|
//! | `PUT <key> <value>` | `OK <index>` once applied (index of the write) |
//! | `GET <key>` | `VALUE <index> <value>` or `NONE` — linearizable (ReadIndex) |
//! | `LGET <key>` | the same from local state, without ReadIndex |
//! | `DUMP` | `ENTRY <index> <key> <value>` lines then `END` (local state) |
//! | `PEER <id> <addr>` | `OK`: (re)sets a peer's raft address |
//! | `STATUS` | `STATUS <role> <term> <leader or 0> <commit> <applied> <syncs> <entries>` |
//!
//! Errors are `ERR <reason>`. On start it prints
//! `READY raft=<addr> client=<addr>` on stdout.
//!
//! `entente-kv request <client-addr> <request...>` is a client: it sends one
//! request and prints the reply, waiting up to 10 s for the node to accept
//! connections and know a leader; it exits 1 on an `ERR` reply.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use coordinator::engine::EngineKind;
use coordinator::image::ImageReader;
use coordinator::node::{
    BoxError, BuildEngine, Committed, Node, NodeConfig, SnapshotView, StateMachine,
};
use coordinator::paxos::MultiPaxos;
use coordinator::pbft::Pbft;
use coordinator::raft::{ConfState, Index, InitialState, NodeId, Raft, SnapshotMeta};
use coordinator::storage::{Storage, StorageOptions};
use coordinator::transport::{PeerBook, Transport, TransportConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The map: key → (value, index of the write that set it).
#[derive(Default)]
struct Kv {
    map: BTreeMap<String, (String, Index)>,
    applied: Index,
}

impl Kv {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.applied.to_be_bytes());
        for (k, (v, i)) in &self.map {
            for part in [k.as_bytes(), v.as_bytes()] {
                out.extend_from_slice(&(part.len() as u32).to_be_bytes());
                out.extend_from_slice(part);
            }
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }

    fn decode(mut b: &[u8]) -> Result<Kv, BoxError> {
        if b.is_empty() {
            // The initial state, sent to a member added before any snapshot.
            return Ok(Kv::default());
        }
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], BoxError> {
            if b.len() < n {
                return Err("truncated snapshot image".into());
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h)
        }
        fn u64_of(s: &[u8]) -> u64 {
            s.iter().fold(0, |a, &x| (a << 8) | u64::from(x))
        }
        let applied = u64_of(take(&mut b, 8)?);
        let mut map = BTreeMap::new();
        while !b.is_empty() {
            let kl = u64_of(take(&mut b, 4)?) as usize;
            let k = String::from_utf8(take(&mut b, kl)?.to_vec())?;
            let vl = u64_of(take(&mut b, 4)?) as usize;
            let v = String::from_utf8(take(&mut b, vl)?.to_vec())?;
            let i = u64_of(take(&mut b, 8)?);
            map.insert(k, (v, i));
        }
        Ok(Kv { map, applied })
    }
}

/// The state machine shares the map with the client handlers.
struct KvMachine(Arc<std::sync::RwLock<Kv>>);

impl StateMachine for KvMachine {
    type Output = ();

    fn applied_index(&self) -> Index {
        self.0.read().map(|kv| kv.applied).unwrap_or(0)
    }

    async fn apply(
        &mut self,
        entries: Vec<Committed>,
        last_index: Index,
    ) -> Result<Vec<()>, BoxError> {
        let mut kv = self.0.write().map_err(|_| "state lock poisoned")?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            // A write is "key\0value"; anything else is ignored.
            let text = String::from_utf8_lossy(&e.data);
            if let Some((k, v)) = text.split_once('\0') {
                kv.map.insert(k.to_string(), (v.to_string(), e.index));
            }
            out.push(());
        }
        kv.applied = kv.applied.max(last_index);
        Ok(out)
    }

    type Snapshot = KvImage;

    async fn snapshot(&mut self) -> Result<KvImage, BoxError> {
        // The map is small: encoded at once, written out on another task.
        let kv = self.0.read().map_err(|_| "state lock poisoned")?;
        Ok(KvImage(kv.encode(), kv.applied))
    }

    async fn restore(
        &mut self,
        meta: &SnapshotMeta,
        mut image: ImageReader,
    ) -> Result<(), BoxError> {
        let data = tokio::task::spawn_blocking(move || {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut image, &mut data).map(|_| data)
        })
        .await??;
        let mut restored = Kv::decode(&data)?;
        restored.applied = meta.index;
        *self.0.write().map_err(|_| "state lock poisoned")? = restored;
        Ok(())
    }
}

/// The encoded map and the index it stands at.
struct KvImage(Vec<u8>, Index);

impl SnapshotView for KvImage {
    async fn write_to(self, dest: PathBuf) -> Result<Index, BoxError> {
        tokio::fs::write(dest, self.0).await?;
        Ok(self.1)
    }
}

struct Args {
    id: NodeId,
    data_dir: PathBuf,
    raft_listen: SocketAddr,
    client_listen: SocketAddr,
    peers: BTreeMap<NodeId, SocketAddr>,
    voters: Vec<NodeId>,
    secret: String,
    cluster: String,
    snapshot_every: u64,
    consensus: EngineKind,
    group_keys: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        id: 1,
        data_dir: PathBuf::from("kv-data"),
        raft_listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        client_listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        peers: BTreeMap::new(),
        voters: Vec::new(),
        secret: "entente-kv".into(),
        cluster: "entente-kv".into(),
        snapshot_every: 10_000,
        consensus: EngineKind::Raft,
        group_keys: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--id" => a.id = val()?.parse().map_err(|e| format!("--id: {e}"))?,
            "--data-dir" => a.data_dir = val()?.into(),
            "--raft-listen" => {
                a.raft_listen = val()?.parse().map_err(|e| format!("--raft-listen: {e}"))?
            }
            "--client-listen" => {
                a.client_listen = val()?
                    .parse()
                    .map_err(|e| format!("--client-listen: {e}"))?
            }
            "--peers" => {
                for p in val()?.split(',').filter(|s| !s.is_empty()) {
                    let (id, addr) = p
                        .split_once('=')
                        .ok_or(format!("--peers: {p} is not id=addr"))?;
                    a.peers.insert(
                        id.parse().map_err(|e| format!("--peers: {e}"))?,
                        addr.parse().map_err(|e| format!("--peers: {e}"))?,
                    );
                }
            }
            "--voters" => {
                a.voters = val()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--voters: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--secret" => a.secret = val()?,
            "--consensus" => {
                a.consensus = val()?.parse().map_err(|e| format!("--consensus: {e}"))?;
            }
            "--group-keys" => a.group_keys = Some(val()?),
            "--cluster" => a.cluster = val()?,
            "--snapshot-every" => {
                a.snapshot_every = val()?
                    .parse()
                    .map_err(|e| format!("--snapshot-every: {e}"))?
            }
            "--help" | "-h" => {
                println!(
                    "{}",
                    include_str!("main.rs")
                        .lines()
                        .take_while(|l| l.starts_with("//!"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}; see --help")),
        }
    }
    if a.voters.is_empty() {
        a.voters = std::iter::once(a.id)
            .chain(a.peers.keys().copied())
            .collect();
    }
    Ok(a)
}

async fn serve_client(
    stream: TcpStream,
    node: Node<()>,
    kv: Arc<std::sync::RwLock<Kv>>,
    peers: PeerSetter,
) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut parts = line.splitn(3, ' ');
        let reply = match (parts.next(), parts.next(), parts.next()) {
            (Some("PUT"), Some(k), Some(v)) => {
                match node.propose(format!("{k}\0{v}").into_bytes()).await {
                    Ok(a) => format!("OK {}\n", a.index),
                    Err(e) => format!("ERR {e}\n"),
                }
            }
            (Some(cmd @ ("GET" | "LGET")), Some(k), None) => {
                let ready = if cmd == "GET" {
                    node.read_index().await.map(|_| ())
                } else {
                    Ok(())
                };
                match ready {
                    Ok(()) => match kv.read().ok().and_then(|m| m.map.get(k).cloned()) {
                        Some((v, i)) => format!("VALUE {i} {v}\n"),
                        None => "NONE\n".to_string(),
                    },
                    Err(e) => format!("ERR {e}\n"),
                }
            }
            (Some("DUMP"), None, None) => {
                let mut s = String::new();
                if let Ok(m) = kv.read() {
                    for (k, (v, i)) in &m.map {
                        s.push_str(&format!("ENTRY {i} {k} {v}\n"));
                    }
                }
                s.push_str("END\n");
                s
            }
            (Some("PEER"), Some(id), Some(addr)) => match (id.parse(), addr.parse()) {
                (Ok(id), Ok(addr)) => {
                    peers(id, addr);
                    "OK\n".to_string()
                }
                _ => "ERR bad PEER arguments\n".to_string(),
            },
            (Some("STATUS"), None, None) => {
                let s = node.status();
                format!(
                    "STATUS {} {} {} {} {} {} {}\n",
                    s.raft.role,
                    s.raft.term,
                    s.raft.leader.unwrap_or(0),
                    s.raft.commit,
                    s.raft.applied,
                    s.syncs,
                    s.entries_persisted
                )
            }
            _ => "ERR unknown request\n".to_string(),
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

type PeerSetter = Arc<dyn Fn(NodeId, SocketAddr) + Send + Sync>;

/// `entente-kv request <addr> <request...>`: one request, the reply on
/// stdout. Retries while the node does not accept connections yet or knows
/// no leader (nothing was applied then), for up to 10 s.
async fn client(args: &[String]) -> i32 {
    let Some((addr, words)) = args.split_first().filter(|(_, w)| !w.is_empty()) else {
        eprintln!("usage: entente-kv request <client-addr> <request...>");
        return 2;
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("entente-kv: {addr}: {e}");
            return 2;
        }
    };
    let line = words.join(" ");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let reply = example_kv::request(addr, &line).await;
        // Only while nothing can have been applied: the node not listening
        // yet, or no leader to propose to.
        let retry = match &reply {
            Err(e) => e.contains("Connection refused"),
            Ok(lines) => lines
                .first()
                .is_some_and(|l| l.starts_with("ERR no leader")),
        };
        if !retry || tokio::time::Instant::now() >= deadline {
            return match reply {
                Ok(lines) => {
                    for l in &lines {
                        println!("{l}");
                    }
                    i32::from(lines.first().is_some_and(|l| l.starts_with("ERR")))
                }
                Err(e) => {
                    eprintln!("entente-kv: {addr}: {e}");
                    1
                }
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "request") {
        std::process::exit(client(&argv[1..]).await);
    }
    if argv.first().map(String::as_str) == Some("keys") {
        let Some(dir) = argv.get(1) else {
            eprintln!("usage: entente-kv keys <data-dir>");
            std::process::exit(2);
        };
        match coordinator::keys::load_or_create(std::path::Path::new(dir)) {
            Ok((key, _)) => {
                println!("{}", key.public_text());
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("entente-kv: {e}");
                std::process::exit(1);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("entente-kv: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("entente-kv: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let kv = Arc::new(std::sync::RwLock::new(Kv::default()));
    let mut cfg = NodeConfig::new(args.id);
    cfg.snapshot_every = args.snapshot_every;
    cfg.raft.seed = args.id ^ u64::from(std::process::id());
    let (node, raft_addr, set_peer) = start_node(&args, cfg, KvMachine(kv.clone())).await?;
    let client = TcpListener::bind(args.client_listen).await?;
    println!("READY raft={raft_addr} client={}", client.local_addr()?);
    loop {
        tokio::select! {
            accepted = client.accept() => {
                let (stream, _) = accepted?;
                tokio::spawn(serve_client(stream, node.clone(), kv.clone(), set_peer.clone()));
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    node.shutdown().await;
    Ok(())
}

/// Starts the transport and the node for the engine `E`.
async fn run_engine<E: BuildEngine>(
    tcfg: TransportConfig,
    cfg: NodeConfig,
    init: InitialState,
    storage: Storage,
    sm: KvMachine,
) -> Result<(Arc<dyn PeerBook>, Node<()>), BoxError> {
    let (transport, inbound) = Transport::<E::Message>::start(tcfg)?;
    let transport = Arc::new(transport);
    let node =
        Node::start::<E, _, _, _>(cfg, init, storage, transport.clone(), inbound, sm).await?;
    Ok((transport, node))
}

/// PBFT: this member's key (created in its data directory on first start)
/// and the voters' public keys (`--group-keys`; a group of one may omit it).
fn pbft_crypto(args: &Args) -> Result<Arc<dyn coordinator::pbft::crypto::Crypto>, BoxError> {
    let (key, _) = coordinator::keys::load_or_create(&args.data_dir)?;
    let keys = match &args.group_keys {
        Some(text) => {
            coordinator::keys::parse_group_keys(text).map_err(|e| format!("--group-keys: {e}"))?
        }
        None if args.voters == [args.id] => BTreeMap::from([(args.id, key.public())]),
        None => return Err("--consensus pbft with more than one voter needs --group-keys".into()),
    };
    coordinator::keys::check_group_keys(&keys, args.voters.iter().copied(), args.id, &key)
        .map_err(|e| format!("--group-keys: {e}"))?;
    Ok(key.crypto(args.id, &keys)?)
}

/// Opens the durable log, starts the transport and the node.
async fn start_node(
    args: &Args,
    cfg: NodeConfig,
    sm: KvMachine,
) -> Result<(Node<()>, SocketAddr, PeerSetter), BoxError> {
    let (storage, recovered) =
        Storage::open(args.data_dir.join("raft"), StorageOptions::default())?;
    let init = recovered.into_initial_state(ConfState::with_voters(args.voters.iter().copied()));
    let mut tcfg = TransportConfig::new(
        args.id,
        args.cluster.clone(),
        args.secret.clone(),
        args.raft_listen,
    );
    tcfg.peers = args
        .peers
        .iter()
        .filter(|(id, _)| **id != args.id)
        .map(|(i, a)| (*i, (*a).into()))
        .collect();
    tcfg.snapshot_dir = Some(storage.staging_dir().to_path_buf());
    tcfg.engine = args.consensus;
    let mut cfg = cfg;
    cfg.engine = args.consensus;
    let (transport, node) = match args.consensus {
        EngineKind::Raft => run_engine::<Raft>(tcfg, cfg, init, storage, sm).await?,
        EngineKind::MultiPaxos | EngineKind::BasicPaxos => {
            run_engine::<MultiPaxos>(tcfg, cfg, init, storage, sm).await?
        }
        EngineKind::Pbft => {
            cfg.pbft_crypto = Some(pbft_crypto(args)?);
            run_engine::<Pbft>(tcfg, cfg, init, storage, sm).await?
        }
    };
    let raft_addr = transport.local_addr();
    let set_peer: PeerSetter = Arc::new(move |id, addr| {
        if let Err(e) = transport.set_peer(id, addr.into()) {
            eprintln!("entente-kv: peer {id} at {addr}: {e}");
        }
    });
    Ok((node, raft_addr, set_peer))
}
