//! Gateway configuration: flags, a TOML file, or `ENTENTE_*` environment
//! variables, with flags winning over the environment and both over the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use coordinator::engine::EngineKind;
use coordinator::transport::PeerAddr;
use serde::Deserialize;

/// Command-line flags. Every flag can also come from an `ENTENTE_*`
/// environment variable or the TOML file given with `--config`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "gateway",
    version,
    about = "Entente edge gateway: device registry, commands and shadows, agreed by Raft (or Multi-Paxos, or PBFT).",
    long_about = "Entente edge gateway.\n\nWith no flags it runs a single-node group: data in ./data, REST on 0.0.0.0:8080, \
peers on 127.0.0.1:7000. On first start it creates an admin token and prints the file it is in.\n\n\
A single gateway with no cluster secret generates one in <data-dir>/cluster-secret (mode 0600) \
and reuses it. A cluster: start the same binary on each machine with --node-id, --peers (every member, \
id=host:port of its peer listener) and the same secret, from a file (--cluster-secret-file) or the \
environment (ENTENTE_CLUSTER_SECRET) rather than the command line, which every local user can read. \
Peers may be named by host name, looked up at every connection attempt.\n\n\
SIGTERM or SIGINT stops it gracefully at any time (devices told, requests in flight answered); \
a second signal exits at once."
)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the long flag names with `_`).
    #[arg(long, env = "ENTENTE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This gateway's id in the group (1, 2, 3, ...).
    #[arg(long, env = "ENTENTE_NODE_ID")]
    pub node_id: Option<u64>,
    /// Every member of the group, `id=host:port` of its peer listener,
    /// comma-separated. A host name is looked up at every connection
    /// attempt (and again on every reconnect), so members may start in any
    /// order and move.
    #[arg(long, env = "ENTENTE_PEERS")]
    pub peers: Option<String>,
    /// Start as a new member of a running group: with no membership of its
    /// own, waiting to be added (`POST /v1/cluster/members`); `--peers` then
    /// lists the running members and this one.
    #[arg(long, env = "ENTENTE_JOIN")]
    pub join: bool,
    /// The consensus engine the group runs: `raft` (the default),
    /// `multi-paxos` or `pbft`. Every member must run the same one (a
    /// member running another is refused at the handshake); Raft alone
    /// changes membership at run time. PBFT tolerates f Byzantine members
    /// among 3f+1 (four gateways for f = 1), signs every message with each
    /// gateway's Ed25519 key (`gateway keys`) and needs --group-keys.
    /// (`basic-paxos`, which has no leader, runs in the example group and
    /// the benchmarks, not in a gateway.)
    #[arg(long, env = "ENTENTE_CONSENSUS")]
    pub consensus: Option<EngineKind>,
    /// PBFT: every member's Ed25519 public key, `id=key` comma-separated
    /// (`gateway keys --data-dir D` prints a gateway's). Required with
    /// `--consensus pbft` when the group has more than one member; a single
    /// gateway uses its own key.
    #[arg(long, env = "ENTENTE_GROUP_KEYS")]
    pub group_keys: Option<String>,
    /// Tests only (built with the `byzantine` feature, never in a release
    /// build): this PBFT member misbehaves on purpose, a comma-separated
    /// list of `equivocate`, `lie-in-view-change` and `wrong-replies`.
    #[cfg(feature = "byzantine")]
    #[arg(long, hide = true, value_name = "MODES")]
    pub byzantine: Option<String>,
    /// Where the Raft log and the state database live.
    #[arg(long, env = "ENTENTE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// REST API listen address.
    #[arg(long, env = "ENTENTE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Peer (Raft) listen address.
    #[arg(long, env = "ENTENTE_RAFT_LISTEN")]
    pub raft_listen: Option<SocketAddr>,
    /// Shared secret authenticating the gateways to each other. Prefer
    /// --cluster-secret-file or the environment: a command line is visible
    /// to every local user (ps). Without any, a single gateway generates one
    /// in <data-dir>/cluster-secret; a cluster must be given one.
    #[arg(long, env = "ENTENTE_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// File holding the cluster secret (surrounding whitespace is ignored);
    /// keep it readable by the gateway's user only.
    #[arg(long, env = "ENTENTE_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Name of the cluster; gateways of another cluster are refused.
    #[arg(long, env = "ENTENTE_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// How long a write may wait for the group before failing with 503 (ms;
    /// default 5000). Also bounds reads: an `Entente-Min-Index` is waited for
    /// at most this long, a read's whole barrier at most twice this.
    #[arg(long, env = "ENTENTE_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// REST requests a second each API token may make (bursts of twice
    /// as many); over it the answer is 429 with Retry-After. 0 turns the
    /// limit off (default 1000).
    #[arg(long, env = "ENTENTE_REST_RATE_LIMIT")]
    pub rest_rate_limit: Option<u32>,
    /// Length of one Raft tick (ms).
    #[arg(long, env = "ENTENTE_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Take a state snapshot once the log since the last one holds this
    /// many bytes (default 67108864, 64 MiB). Snapshots are built in the
    /// background; the log is compacted behind each.
    #[arg(long, env = "ENTENTE_SNAPSHOT_LOG_BYTES")]
    pub snapshot_log_bytes: Option<u64>,
    /// Also take a state snapshot every this many log entries (default:
    /// only by the log's size).
    #[arg(long, env = "ENTENTE_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// MQTT 3.1.1 listen address for devices (default 0.0.0.0:1883).
    #[arg(long, env = "ENTENTE_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,
    /// MQTT 5 listen address for devices (default 0.0.0.0:1884).
    #[arg(long, env = "ENTENTE_MQTT5_LISTEN")]
    pub mqtt5_listen: Option<SocketAddr>,
    /// MQTT over TLS listen address for devices (default 0.0.0.0:8883);
    /// open only when --mqtt-tls-cert and --mqtt-tls-key are given. Serves
    /// MQTT 3.1.1 and 5 like the other device listeners.
    #[arg(long, env = "ENTENTE_MQTT_TLS_LISTEN")]
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// The TLS device listener's certificate chain (PEM, leaf first).
    #[arg(long, env = "ENTENTE_MQTT_TLS_CERT")]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// The TLS device listener's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "ENTENTE_MQTT_TLS_KEY")]
    pub mqtt_tls_key: Option<PathBuf>,
    /// CA certificates (PEM) whose client certificates the TLS listener
    /// asks for. A device registered with `cert_sha256` logs in with the
    /// certificate of that fingerprint, without a password; a certificate
    /// stays optional for devices that use their secret.
    #[arg(long, env = "ENTENTE_MQTT_TLS_CLIENT_CA")]
    pub mqtt_tls_client_ca: Option<PathBuf>,
    /// Mutual TLS between gateways: the cluster CA certificate (PEM). With
    /// --peer-tls-cert and --peer-tls-key; `gateway certs` makes all three.
    /// Every member must use peer TLS, or none.
    #[arg(long, env = "ENTENTE_PEER_TLS_CA")]
    pub peer_tls_ca: Option<PathBuf>,
    /// This gateway's peer certificate (PEM, leaf first), issued by the
    /// cluster CA for the DNS name `node-<node-id>.<cluster-id>.entente`.
    #[arg(long, env = "ENTENTE_PEER_TLS_CERT")]
    pub peer_tls_cert: Option<PathBuf>,
    /// The private key of --peer-tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "ENTENTE_PEER_TLS_KEY")]
    pub peer_tls_key: Option<PathBuf>,
    /// Serve the REST API over HTTPS (HTTP/2 and HTTP/1.1, by ALPN) with
    /// this certificate chain (PEM, leaf first); with --http-tls-key.
    #[arg(long, env = "ENTENTE_HTTP_TLS_CERT")]
    pub http_tls_cert: Option<PathBuf>,
    /// The private key of --http-tls-cert (PEM).
    #[arg(long, env = "ENTENTE_HTTP_TLS_KEY")]
    pub http_tls_key: Option<PathBuf>,
    /// Most device connections open at once, all device listeners together
    /// (default 15000, less if the open-file limit is lower); one more is
    /// closed as soon as it is accepted.
    #[arg(long, env = "ENTENTE_MQTT_MAX_CONNECTIONS")]
    pub mqtt_max_connections: Option<usize>,
    /// How long the leader waits before declaring an unreachable gateway's
    /// device sessions lost (ms).
    #[arg(long, env = "ENTENTE_SESSION_GRACE_MS")]
    pub session_grace_ms: Option<u64>,
    /// Longest a device's reported-state patches wait to be proposed
    /// together with the rest of its window (ms, default 50). One proposal
    /// of a device's patches is in flight at a time; the next one carries
    /// what arrived meanwhile and goes as soon as the device has sent again
    /// as many as it had out (ten in flight: ten per proposal), or after
    /// this wait. 0: as soon as the one before committed.
    #[arg(long, env = "ENTENTE_REPORT_COALESCE_MS")]
    pub report_coalesce_ms: Option<u64>,
    /// How long finished jobs (completed, canceled, aborted) and their
    /// executions are kept before the leader deletes them (ms, default
    /// 604,800,000: 7 days). 0: kept forever.
    #[arg(long, env = "ENTENTE_JOB_RETENTION_MS")]
    pub job_retention_ms: Option<u64>,
    /// Most REST connections open at once (default: a quarter of the
    /// open-file limit, 64 to 1,024). At the limit a new connection replaces
    /// the one idle longest; if every one has a request in flight it is
    /// answered 503.
    #[arg(long, env = "ENTENTE_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// A REST connection must send a complete request head within this
    /// time of opening or of its previous response, or it is closed; this
    /// is also the keep-alive idle timeout (ms, default 10,000).
    #[arg(long, env = "ENTENTE_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// A REST client that takes no bytes of a response (event streams
    /// included) for this long is disconnected (ms, default 30,000).
    #[arg(long, env = "ENTENTE_HTTP_SEND_TIMEOUT_MS")]
    pub http_send_timeout_ms: Option<u64>,
    /// Most `/v1/events` streams open at once, all tokens together (default
    /// 256, or a quarter of the REST connection limit if less); more are
    /// answered 503.
    #[arg(long, env = "ENTENTE_EVENTS_MAX_STREAMS")]
    pub events_max_streams: Option<usize>,
    /// Most `/v1/events` streams open at once with one token (default 16);
    /// more are answered 429.
    #[arg(long, env = "ENTENTE_EVENTS_MAX_STREAMS_PER_TOKEN")]
    pub events_max_streams_per_token: Option<usize>,
    /// Log line format on stdout: `text` (plain, coloured only on a
    /// terminal) or `json` (one object per line with `timestamp`, `level`,
    /// `target`, `message` and the event's fields; the address lines printed
    /// at start are left out). Default `text`. `RUST_LOG` sets the level
    /// (default `info`).
    #[arg(long, env = "ENTENTE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Disaster recovery, offline: turn this member's data (--data-dir,
    /// --node-id) into a new single-member group that keeps every log entry
    /// it holds, print what was kept and what may be lost, and exit. Only
    /// for a group that lost its quorum for good; stop the gateway first.
    /// Members named in --peers, the snapshot or the log are dropped.
    #[arg(long)]
    pub recover: bool,
    /// Restore, offline: create a new single-member group (this --node-id
    /// its only voter) in --data-dir, which must not hold a group yet, from
    /// a backup file taken with `GET /v1/admin/backup`; check its checksum,
    /// print what was restored and exit. Then start the gateway on that
    /// data directory and add members as usual.
    #[arg(long, value_name = "FILE", conflicts_with = "recover")]
    pub restore: Option<std::path::PathBuf>,
    /// A subcommand instead of running the gateway.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands (without one, the gateway runs).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make the certificates of a group with peer TLS: a cluster CA (key and
    /// certificate) and a key and certificate per gateway, signed by it,
    /// as private files (0600) in --out; print what was written and the
    /// flags each gateway takes. Refuses to overwrite a file.
    Certs(crate::certs::CertsArgs),
    /// Print this gateway's Ed25519 public key (PBFT signs every message
    /// with it), creating the key pair in --data-dir (mode 0600) if it has
    /// none. Give every member `id=<key>` of each in --group-keys.
    Keys(KeysArgs),
    /// Check a write's commit certificate — the `Entente-Certificate`
    /// header a PBFT group's gateway answers a write with — against the
    /// group's public keys alone, and print what it proves (exit status 0)
    /// or why it is not valid (1).
    VerifyCertificate(VerifyArgs),
}

/// `gateway verify-certificate`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Every member's public key, `id=ed25519:<base64>` comma-separated
    /// (the group's --group-keys).
    #[arg(long, env = "ENTENTE_GROUP_KEYS")]
    pub group_keys: String,
    /// The header's value (or the whole `Entente-Certificate: ...` line);
    /// `-`, the default, reads it from standard input.
    #[arg(default_value = "-")]
    pub certificate: String,
}

/// `gateway keys`.
#[derive(Debug, Clone, clap::Args)]
pub struct KeysArgs {
    /// The gateway's data directory (default ./data).
    #[arg(long, env = "ENTENTE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
}

/// How the gateway writes its log (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stdout is a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Args {
    /// The log format: the flag or environment, else the settings file's
    /// `log_format`, else text. Resolved on its own, before the rest of the
    /// configuration, so that everything the configuration logs is already
    /// in the chosen format.
    pub fn log_format(&self) -> Result<LogFormat, String> {
        if let Some(f) = self.log_format {
            return Ok(f);
        }
        match &self.config {
            Some(path) => Ok(read_file_config(path)?.log_format.unwrap_or_default()),
            None => Ok(LogFormat::default()),
        }
    }
}

/// Reads and parses the settings file.
fn read_file_config(path: &std::path::Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// The settings file (same keys as the flags).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    peers: Option<String>,
    join: Option<bool>,
    consensus: Option<String>,
    group_keys: Option<String>,
    data_dir: Option<PathBuf>,
    http_listen: Option<SocketAddr>,
    raft_listen: Option<SocketAddr>,
    cluster_secret: Option<String>,
    cluster_secret_file: Option<PathBuf>,
    cluster_id: Option<String>,
    write_timeout_ms: Option<u64>,
    rest_rate_limit: Option<u32>,
    tick_ms: Option<u64>,
    snapshot_log_bytes: Option<u64>,
    snapshot_every: Option<u64>,
    mqtt_listen: Option<SocketAddr>,
    mqtt5_listen: Option<SocketAddr>,
    mqtt_tls_listen: Option<SocketAddr>,
    mqtt_tls_cert: Option<PathBuf>,
    mqtt_tls_key: Option<PathBuf>,
    mqtt_tls_client_ca: Option<PathBuf>,
    peer_tls_ca: Option<PathBuf>,
    peer_tls_cert: Option<PathBuf>,
    peer_tls_key: Option<PathBuf>,
    http_tls_cert: Option<PathBuf>,
    http_tls_key: Option<PathBuf>,
    mqtt_max_connections: Option<usize>,
    session_grace_ms: Option<u64>,
    report_coalesce_ms: Option<u64>,
    job_retention_ms: Option<u64>,
    http_max_connections: Option<usize>,
    http_header_timeout_ms: Option<u64>,
    http_send_timeout_ms: Option<u64>,
    events_max_streams: Option<usize>,
    events_max_streams_per_token: Option<usize>,
    log_format: Option<LogFormat>,
}

/// REST requests a second per API token by default: far above what an
/// operator or an integration sends, far below what a runaway loop does.
pub const DEFAULT_REST_RATE_LIMIT: u32 = 1000;

/// Resolved settings of one gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// This gateway's node id.
    pub node_id: u64,
    /// Every voter of the initial group and its peer address (includes this
    /// node): a socket address or a host name, resolved at every dial.
    pub peers: BTreeMap<u64, PeerAddr>,
    /// Joining a running group: start with no membership (the leader's
    /// snapshot brings it) rather than with `peers` as the voters.
    pub join: bool,
    /// The consensus engine the group runs.
    pub consensus: EngineKind,
    /// PBFT: every member's Ed25519 public key (empty: a single gateway,
    /// which uses its own key from its data directory).
    pub group_keys: BTreeMap<u64, [u8; 32]>,
    /// Tests only (feature `byzantine`): how this PBFT member misbehaves
    /// (`--byzantine`); `None` runs the correct engine.
    #[cfg(feature = "byzantine")]
    pub byzantine: Option<coordinator::pbft::byzantine::Mode>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// REST listen address (port 0 picks one).
    pub http_listen: SocketAddr,
    /// Peer listen address (port 0 picks one).
    pub raft_listen: SocketAddr,
    /// Cluster secret. `None`: a single gateway (one peer, not joining)
    /// generates one in `<data-dir>/cluster-secret` on first start and
    /// reuses it; a gateway of a cluster refuses to start without one.
    pub cluster_secret: Option<String>,
    /// Cluster id.
    pub cluster_id: String,
    /// Bound on a write waiting for the group.
    pub write_timeout: Duration,
    /// Raft tick length.
    pub tick: Duration,
    /// Snapshot policy: by the log's size in bytes ...
    pub snapshot_log_bytes: u64,
    /// ... or every this many entries, whichever comes first.
    pub snapshot_every: u64,
    /// REST requests a second per API token (bursts of twice as many);
    /// 0: no limit.
    pub rest_rate_limit: u32,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Largest accepted body of `POST /v1/devices/batch` (up to 1,000
    /// devices); every other route takes at most `max_body_bytes`.
    pub batch_max_body_bytes: usize,
    /// Largest page size of list endpoints.
    pub max_page: u32,
    /// Longest `?wait=` a client may ask for.
    pub max_wait: Duration,
    /// MQTT 3.1.1 listener for devices (`None`: none).
    pub mqtt_listen: Option<SocketAddr>,
    /// MQTT 5 listener for devices (`None`: none).
    pub mqtt5_listen: Option<SocketAddr>,
    /// MQTT over TLS listener for devices; open only when
    /// [`Config::mqtt_tls_cert`] and [`Config::mqtt_tls_key`] are set.
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// The TLS listener's certificate chain (PEM file, leaf first).
    pub mqtt_tls_cert: Option<PathBuf>,
    /// The TLS listener's private key (PEM file).
    pub mqtt_tls_key: Option<PathBuf>,
    /// CA certificates (PEM file) whose client certificates the TLS
    /// listener asks for (optional for the client).
    pub mqtt_tls_client_ca: Option<PathBuf>,
    /// Mutual TLS between gateways: the cluster CA, this gateway's
    /// certificate and its key (PEM files); all three or none (plain TCP).
    pub peer_tls: Option<PeerTlsFiles>,
    /// HTTPS for the REST API: certificate chain and key (PEM files);
    /// `None`: plain HTTP.
    pub http_tls: Option<(PathBuf, PathBuf)>,
    /// How long a new device connection has for its TLS handshake (on the
    /// TLS listener), its CONNECT and the login check together.
    pub mqtt_connect_timeout: Duration,
    /// How long a peer must be unreachable from the leader before its device
    /// sessions are declared lost.
    pub session_grace: Duration,
    /// Longest a device's reported-state patches wait to be proposed
    /// together with the rest of its window (zero: as soon as the proposal
    /// before committed).
    pub report_coalesce: Duration,
    /// How long finished jobs are kept before the leader prunes them
    /// (zero: forever).
    pub job_retention: Duration,
    /// Largest MQTT packet a device may send; a bigger one disconnects it.
    pub mqtt_max_packet: usize,
    /// Largest payload the gateway acts on; a bigger one (up to
    /// `mqtt_max_packet`) is ignored, logged and counted.
    pub mqtt_max_payload: usize,
    /// Most device connections open at once (both listeners together).
    pub mqtt_max_connections: usize,
    /// Most REST connections open at once; at the limit a new connection
    /// replaces the one idle longest, or is answered 503 if none is idle.
    pub http_max_connections: usize,
    /// Time a REST connection has to send a complete request head after it
    /// opened or after its previous response (so also the keep-alive idle
    /// timeout).
    pub http_header_timeout: Duration,
    /// A REST client that takes no bytes of a response for this long is
    /// disconnected; an event stream that cannot buffer its next event for
    /// half this long ends.
    pub http_send_timeout: Duration,
    /// Most event streams open at once (503 beyond).
    pub events_max_streams: usize,
    /// Most event streams open at once per token (429 beyond).
    pub events_max_streams_per_token: usize,
    /// Bytes of events buffered per event stream, waiting for its client.
    pub events_buffer_bytes: usize,
    /// The log format `main` set up; with `json`, [`crate::run`] prints no
    /// plain-text address lines on stdout (the "gateway started" log event
    /// carries them).
    pub log_format: LogFormat,
}

/// The files of peer TLS (`--peer-tls-ca`, `--peer-tls-cert`,
/// `--peer-tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This gateway's certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// The default of `--events-max-streams`: 256, or a quarter of the REST
/// connection cap if that is less (streams hold their connections).
pub fn default_events_max_streams(http_max_connections: usize) -> usize {
    (http_max_connections / 4).clamp(1, 256)
}

/// The default of `--http-max-connections`: a quarter of this process's
/// open-file limit, at least 64 and at most 1,024, so that REST clients
/// cannot take the descriptors devices, peers and storage need.
pub fn default_http_max_connections() -> usize {
    let soft = rlimit::Resource::NOFILE
        .get()
        .map_or(1024, |(soft, _hard)| soft);
    usize::try_from((soft / 4).clamp(64, 1024)).unwrap_or(1024)
}

/// The default of `--mqtt-max-connections`: 15,000, or less when this
/// process's open-file limit would not leave room for the REST connections,
/// peers and storage (at least 64).
pub fn default_mqtt_max_connections() -> usize {
    let soft = rlimit::Resource::NOFILE
        .get()
        .map_or(1024, |(soft, _hard)| soft);
    let http = u64::try_from(default_http_max_connections()).unwrap_or(1024);
    let room = soft.saturating_sub(http).saturating_sub(512);
    usize::try_from(room.clamp(64, 15_000)).unwrap_or(15_000)
}

impl Config {
    /// How long a request that found no leader waits for one before it is
    /// answered 503: about two election timeouts (an election takes one;
    /// the Raft core draws each from 10–20 ticks, 200–400 ms at the default
    /// tick), never longer than the write timeout. A gateway cut off from
    /// its quorum keeps having no leader, and says so within this time
    /// instead of after the whole write timeout.
    pub fn leader_wait(&self) -> Duration {
        // The longest election timeout is twice `election_tick` ticks.
        let election_max = 2 * coordinator::raft::Config::new(self.node_id).election_tick;
        self.tick
            .saturating_mul(2 * election_max)
            .min(self.write_timeout)
    }

    /// A single-node gateway in `data_dir` listening on the given addresses:
    /// what tests start from. Its MQTT listeners (3.1.1 and 5) are on the REST
    /// listener's IP with port 0 (picked by the OS); [`Config::from_args`]
    /// (the defaults of `cargo run -p gateway`) puts them on 1883 and 1884.
    pub fn single(data_dir: PathBuf, http_listen: SocketAddr, raft_listen: SocketAddr) -> Config {
        let http_max_connections = default_http_max_connections();
        Config {
            node_id: 1,
            peers: BTreeMap::from([(1, raft_listen.into())]),
            join: false,
            consensus: EngineKind::Raft,
            group_keys: BTreeMap::new(),
            #[cfg(feature = "byzantine")]
            byzantine: None,
            data_dir,
            http_listen,
            raft_listen,
            cluster_secret: None,
            cluster_id: "entente".into(),
            write_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(20),
            snapshot_log_bytes: 64 << 20,
            snapshot_every: u64::MAX,
            rest_rate_limit: DEFAULT_REST_RATE_LIMIT,
            max_body_bytes: 64 * 1024,
            batch_max_body_bytes: 4 * 1024 * 1024,
            max_page: 1000,
            max_wait: Duration::from_secs(60),
            mqtt_listen: Some(SocketAddr::new(http_listen.ip(), 0)),
            mqtt5_listen: Some(SocketAddr::new(http_listen.ip(), 0)),
            mqtt_tls_listen: Some(SocketAddr::new(http_listen.ip(), 0)),
            mqtt_tls_cert: None,
            mqtt_tls_key: None,
            mqtt_tls_client_ca: None,
            peer_tls: None,
            http_tls: None,
            mqtt_connect_timeout: Duration::from_secs(10),
            session_grace: Duration::from_secs(10),
            report_coalesce: Duration::from_millis(50),
            job_retention: crate::jobs::DEFAULT_JOB_RETENTION,
            mqtt_max_packet: 256 * 1024,
            mqtt_max_payload: 64 * 1024,
            mqtt_max_connections: default_mqtt_max_connections(),
            http_max_connections,
            http_header_timeout: Duration::from_secs(10),
            http_send_timeout: Duration::from_secs(30),
            events_max_streams: default_events_max_streams(http_max_connections),
            events_max_streams_per_token: 16,
            events_buffer_bytes: 128 * 1024,
            log_format: LogFormat::Text,
        }
    }

    /// Resolves flags, environment and file into settings.
    pub fn from_args(args: Args) -> Result<Config, String> {
        let file: FileConfig = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let http = args
            .http_listen
            .or(file.http_listen)
            .unwrap_or(([0, 0, 0, 0], 8080).into());
        let raft = args
            .raft_listen
            .or(file.raft_listen)
            .unwrap_or(([127, 0, 0, 1], 7000).into());
        let dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("data"));
        let mut c = Config::single(dir, http, raft);
        c.node_id = args.node_id.or(file.node_id).unwrap_or(1);
        if c.node_id == 0 {
            return Err("--node-id must be at least 1".into());
        }
        if let Some(peers) = args.peers.or(file.peers) {
            c.peers = parse_peers(&peers)?;
            if !c.peers.contains_key(&c.node_id) {
                return Err(format!("--peers must include this node ({})", c.node_id));
            }
        } else {
            c.peers = BTreeMap::from([(c.node_id, raft.into())]);
        }
        c.join = args.join || file.join.unwrap_or(false);
        c.consensus = match (args.consensus, file.consensus) {
            (Some(kind), _) => kind,
            (None, Some(name)) => name.parse()?,
            (None, None) => EngineKind::Raft,
        };
        if c.consensus == EngineKind::BasicPaxos {
            return Err(
                "--consensus basic-paxos has no leader, and a gateway needs one (it bootstraps the \
                 admin token, expires commands and declares lost sessions): use raft or \
                 multi-paxos (basic Paxos runs in the example group and the benchmarks)"
                    .into(),
            );
        }
        if c.join && !c.consensus.reconfigurable() {
            return Err(format!(
                "--join adds a member at run time, which the {} engine does not do (its \
                 membership is fixed at start: list every member in --peers)",
                c.consensus
            ));
        }
        if let Some(text) = args.group_keys.or(file.group_keys) {
            if c.consensus != EngineKind::Pbft {
                return Err(format!(
                    "--group-keys is for --consensus pbft (this group runs {})",
                    c.consensus
                ));
            }
            c.group_keys = coordinator::keys::parse_group_keys(&text)
                .map_err(|e| format!("--group-keys: {e}"))?;
        }
        if c.consensus == EngineKind::Pbft {
            c.check_group_keys()?;
        }
        #[cfg(feature = "byzantine")]
        if let Some(modes) = args.byzantine {
            if c.consensus != EngineKind::Pbft {
                return Err(format!(
                    "--byzantine makes a PBFT member misbehave: it needs --consensus pbft (this \
                     group runs {})",
                    c.consensus
                ));
            }
            let mode: coordinator::pbft::byzantine::Mode =
                modes.parse().map_err(|e| format!("--byzantine: {e}"))?;
            if mode == coordinator::pbft::byzantine::Mode::default() {
                return Err("--byzantine: name at least one behaviour (equivocate, \
                            lie-in-view-change, wrong-replies)"
                    .into());
            }
            c.byzantine = Some(mode);
        }
        // Flags and environment win over the settings file, as a pair: a
        // secret from one place and a file from another are not mixed.
        c.cluster_secret = match secret_source(args.cluster_secret, args.cluster_secret_file)? {
            Some(secret) => Some(secret),
            None => secret_source(file.cluster_secret, file.cluster_secret_file)?,
        };
        if c.cluster_secret.is_none() && (c.peers.len() > 1 || c.join) {
            return Err(
                "a cluster needs a shared secret, the same on every gateway: \
                 --cluster-secret-file (or ENTENTE_CLUSTER_SECRET)"
                    .into(),
            );
        }
        if let Some(id) = args.cluster_id.or(file.cluster_id) {
            c.cluster_id = id;
        }
        if let Some(ms) = args.write_timeout_ms.or(file.write_timeout_ms) {
            c.write_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(n) = args.rest_rate_limit.or(file.rest_rate_limit) {
            c.rest_rate_limit = n;
        }
        if let Some(ms) = args.tick_ms.or(file.tick_ms) {
            c.tick = Duration::from_millis(ms.max(1));
        }
        if let Some(n) = args.snapshot_log_bytes.or(file.snapshot_log_bytes) {
            c.snapshot_log_bytes = n.max(1);
        }
        if let Some(n) = args.snapshot_every.or(file.snapshot_every) {
            c.snapshot_every = n.max(1);
        }
        c.mqtt_listen = Some(
            args.mqtt_listen
                .or(file.mqtt_listen)
                .unwrap_or(([0, 0, 0, 0], 1883).into()),
        );
        c.mqtt5_listen = Some(
            args.mqtt5_listen
                .or(file.mqtt5_listen)
                .unwrap_or(([0, 0, 0, 0], 1884).into()),
        );
        c.mqtt_tls_listen = Some(
            args.mqtt_tls_listen
                .or(file.mqtt_tls_listen)
                .unwrap_or(([0, 0, 0, 0], 8883).into()),
        );
        c.mqtt_tls_cert = args.mqtt_tls_cert.or(file.mqtt_tls_cert);
        c.mqtt_tls_key = args.mqtt_tls_key.or(file.mqtt_tls_key);
        c.mqtt_tls_client_ca = args.mqtt_tls_client_ca.or(file.mqtt_tls_client_ca);
        c.check_mqtt_tls()?;
        c.peer_tls = match (
            args.peer_tls_ca.or(file.peer_tls_ca),
            args.peer_tls_cert.or(file.peer_tls_cert),
            args.peer_tls_key.or(file.peer_tls_key),
        ) {
            (Some(ca), Some(cert), Some(key)) => Some(PeerTlsFiles { ca, cert, key }),
            (None, None, None) => None,
            _ => {
                return Err(
                    "peer TLS needs all three of --peer-tls-ca, --peer-tls-cert and \
                     --peer-tls-key (`gateway certs` makes them)"
                        .into(),
                );
            }
        };
        c.http_tls = match (
            args.http_tls_cert.or(file.http_tls_cert),
            args.http_tls_key.or(file.http_tls_key),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err("--http-tls-cert needs --http-tls-key".into()),
            (None, Some(_)) => return Err("--http-tls-key needs --http-tls-cert".into()),
        };
        if let Some(n) = args.mqtt_max_connections.or(file.mqtt_max_connections) {
            c.mqtt_max_connections = n.max(1);
        }
        if let Some(ms) = args.session_grace_ms.or(file.session_grace_ms) {
            c.session_grace = Duration::from_millis(ms);
        }
        if let Some(ms) = args.report_coalesce_ms.or(file.report_coalesce_ms) {
            c.report_coalesce = Duration::from_millis(ms);
        }
        if let Some(ms) = args.job_retention_ms.or(file.job_retention_ms) {
            c.job_retention = Duration::from_millis(ms);
        }
        if let Some(n) = args.http_max_connections.or(file.http_max_connections) {
            if n == 0 {
                return Err("--http-max-connections must be at least 1".into());
            }
            c.http_max_connections = n;
        }
        if let Some(ms) = args.http_header_timeout_ms.or(file.http_header_timeout_ms) {
            c.http_header_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = args.http_send_timeout_ms.or(file.http_send_timeout_ms) {
            c.http_send_timeout = Duration::from_millis(ms.max(1));
        }
        c.events_max_streams = args
            .events_max_streams
            .or(file.events_max_streams)
            .unwrap_or_else(|| default_events_max_streams(c.http_max_connections));
        if let Some(n) = args
            .events_max_streams_per_token
            .or(file.events_max_streams_per_token)
        {
            c.events_max_streams_per_token = n;
        }
        c.log_format = args.log_format.or(file.log_format).unwrap_or_default();
        Ok(c)
    }
}

impl Config {
    /// PBFT: the group's public keys name every member of `peers` and no
    /// one else; a group of more than one member must list them. (That the
    /// key of this gateway is the one in its data directory is checked at
    /// start.)
    pub fn check_group_keys(&self) -> Result<(), String> {
        if self.group_keys.is_empty() {
            if self.peers.len() > 1 {
                return Err(format!(
                    "--consensus pbft with {} members needs --group-keys: every member's public \
                     key, id=key comma-separated (`gateway keys --data-dir D` prints a gateway's)",
                    self.peers.len()
                ));
            }
            return Ok(());
        }
        if let Some(m) = self.peers.keys().find(|m| !self.group_keys.contains_key(m)) {
            return Err(format!("--group-keys has no key for member {m}"));
        }
        if let Some(k) = self.group_keys.keys().find(|k| !self.peers.contains_key(k)) {
            return Err(format!(
                "--group-keys lists node {k}, which is not a member (not in --peers)"
            ));
        }
        Ok(())
    }

    /// PBFT: the group's public keys, checked against this gateway's key
    /// (a single gateway with none given: its own key alone).
    pub fn group_keys_with(
        &self,
        own: &coordinator::keys::NodeKey,
    ) -> Result<BTreeMap<u64, [u8; 32]>, String> {
        self.check_group_keys()?;
        let keys = if self.group_keys.is_empty() {
            BTreeMap::from([(self.node_id, own.public())])
        } else {
            self.group_keys.clone()
        };
        coordinator::keys::check_group_keys(&keys, self.peers.keys().copied(), self.node_id, own)
            .map_err(|e| format!("--group-keys: {e}"))?;
        Ok(keys)
    }

    /// Whether the TLS device listener is to open: a certificate and a key
    /// are given (and a listen address).
    pub fn mqtt_tls_enabled(&self) -> bool {
        self.mqtt_tls_listen.is_some()
            && self.mqtt_tls_cert.is_some()
            && self.mqtt_tls_key.is_some()
    }

    /// Refuses TLS settings that cannot work together: a certificate
    /// without a key or the other way round, a client CA without both.
    pub fn check_mqtt_tls(&self) -> Result<(), String> {
        match (&self.mqtt_tls_cert, &self.mqtt_tls_key) {
            (Some(_), None) => Err("--mqtt-tls-cert needs --mqtt-tls-key (its private key)".into()),
            (None, Some(_)) => Err("--mqtt-tls-key needs --mqtt-tls-cert".into()),
            (None, None) if self.mqtt_tls_client_ca.is_some() => Err(
                "--mqtt-tls-client-ca needs the TLS listener: --mqtt-tls-cert and --mqtt-tls-key"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

/// The cluster secret given directly or in a file (not both).
fn secret_source(secret: Option<String>, file: Option<PathBuf>) -> Result<Option<String>, String> {
    match (secret, file) {
        (Some(_), Some(_)) => Err(
            "give the cluster secret once: --cluster-secret or --cluster-secret-file, not both"
                .into(),
        ),
        (Some(secret), None) => check_secret(secret, "--cluster-secret").map(Some),
        (None, Some(path)) => read_secret_file(&path).map(Some),
        (None, None) => Ok(None),
    }
}

/// Refuses an empty secret and warns about a short one.
fn check_secret(secret: String, from: &str) -> Result<String, String> {
    if secret.is_empty() {
        return Err(format!("the cluster secret from {from} is empty"));
    }
    if secret.len() < MIN_SECRET_LEN {
        tracing::warn!(
            "the cluster secret from {from} is shorter than {MIN_SECRET_LEN} bytes; \
             a random one is safer (e.g. `head -c 32 /dev/urandom | base64`)"
        );
    }
    Ok(secret)
}

/// Secrets shorter than this draw a warning.
const MIN_SECRET_LEN: usize = 16;

/// Reads a cluster secret file: its contents without surrounding
/// whitespace. Warns if other users may read it.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the cluster secret file {}: {e}",
            path.display()
        )
    })?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{mode:o}"),
                "the cluster secret file can be read by other users; make it 0600"
            );
        }
    }
    check_secret(text.trim().to_string(), &path.display().to_string())
}

/// Parses `1=host:port,2=host:port`. Host names are not looked up here: the
/// transport resolves them at every dial.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, PeerAddr>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("peer {part:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("peer id {id:?} is not a number"))?;
        let addr: PeerAddr = addr
            .trim()
            .parse()
            .map_err(|e| format!("peer {id} address: {e}"))?;
        if id == 0 || peers.insert(id, addr).is_some() {
            return Err(format!("peer id {id} is 0 or given twice"));
        }
    }
    if peers.is_empty() {
        return Err("--peers is empty".into());
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_defaults_are_single_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("g.toml");
        std::fs::write(
            &file,
            "node_id = 2\npeers = \"1=127.0.0.1:7001,2=127.0.0.1:7002\"\ncluster_secret = \"s\"\n",
        )
        .expect("write");
        let args = Args {
            config: Some(file),
            node_id: Some(1),
            ..Args::default()
        };
        let c = Config::from_args(args).expect("config");
        assert_eq!(c.node_id, 1);
        assert_eq!(c.peers.len(), 2);
        let c = Config::from_args(Args::default()).expect("defaults");
        assert_eq!(c.http_listen.port(), 8080);
        assert_eq!(c.mqtt_listen.map(|a| a.port()), Some(1883));
        assert_eq!(c.mqtt5_listen.map(|a| a.port()), Some(1884));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.data_dir, PathBuf::from("data"));
    }

    #[test]
    fn rest_limits_default_under_the_descriptor_limit_and_can_be_set() {
        let c = Config::from_args(Args::default()).expect("defaults");
        assert!((64..=1024).contains(&c.http_max_connections));
        assert_eq!(
            c.events_max_streams,
            (c.http_max_connections / 4).min(256),
            "streams leave most connections to other requests"
        );
        assert_eq!(c.events_max_streams_per_token, 16);
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        assert_eq!(c.http_send_timeout, Duration::from_secs(30));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("g.toml");
        std::fs::write(
            &file,
            "http_max_connections = 200\nhttp_header_timeout_ms = 2500\nevents_max_streams_per_token = 4\n",
        )
        .expect("write");
        let args = Args {
            config: Some(file),
            http_send_timeout_ms: Some(5000),
            ..Args::default()
        };
        let c = Config::from_args(args).expect("config");
        assert_eq!(c.http_max_connections, 200);
        assert_eq!(c.events_max_streams, 50);
        assert_eq!(c.events_max_streams_per_token, 4);
        assert_eq!(c.http_header_timeout, Duration::from_millis(2500));
        assert_eq!(c.http_send_timeout, Duration::from_secs(5));
        let zero = Args {
            http_max_connections: Some(0),
            ..Args::default()
        };
        assert!(Config::from_args(zero).is_err());
    }

    #[test]
    fn log_format_comes_from_flag_or_file_and_defaults_to_text() {
        assert_eq!(Args::default().log_format(), Ok(LogFormat::Text));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("g.toml");
        std::fs::write(&file, "log_format = \"json\"\n").expect("write");
        let from_file = Args {
            config: Some(file.clone()),
            ..Args::default()
        };
        assert_eq!(from_file.log_format(), Ok(LogFormat::Json));
        assert_eq!(
            Config::from_args(from_file).expect("config").log_format,
            LogFormat::Json
        );
        let flag_wins = Args {
            config: Some(file),
            log_format: Some(LogFormat::Text),
            ..Args::default()
        };
        assert_eq!(flag_wins.log_format(), Ok(LogFormat::Text));
        std::fs::write(dir.path().join("bad.toml"), "log_format = \"xml\"\n").expect("write");
        let bad = Args {
            config: Some(dir.path().join("bad.toml")),
            ..Args::default()
        };
        assert!(bad.log_format().is_err());
        use clap::Parser as _;
        let parsed = Args::try_parse_from(["gateway", "--log-format", "json"]).expect("parse");
        assert_eq!(parsed.log_format, Some(LogFormat::Json));
        assert!(Args::try_parse_from(["gateway", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn the_tls_listener_needs_a_certificate_and_its_key() {
        let c = Config::from_args(Args::default()).expect("defaults");
        assert_eq!(c.mqtt_tls_listen.map(|a| a.port()), Some(8883));
        assert!(!c.mqtt_tls_enabled(), "off without a certificate");
        assert_eq!(c.mqtt_connect_timeout, Duration::from_secs(10));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("g.toml");
        std::fs::write(
            &file,
            "mqtt_tls_key = \"key.pem\"\nmqtt_tls_listen = \"127.0.0.1:9883\"\n",
        )
        .expect("write");
        // The certificate from a flag, the key from the file.
        let c = Config::from_args(Args {
            config: Some(file),
            mqtt_tls_cert: Some("cert.pem".into()),
            ..Args::default()
        })
        .expect("config");
        assert!(c.mqtt_tls_enabled());
        assert_eq!(c.mqtt_tls_listen.map(|a| a.port()), Some(9883));
        assert_eq!(c.mqtt_tls_key, Some(PathBuf::from("key.pem")));
        for (args, want) in [
            (
                Args {
                    mqtt_tls_cert: Some("cert.pem".into()),
                    ..Args::default()
                },
                "--mqtt-tls-key",
            ),
            (
                Args {
                    mqtt_tls_key: Some("key.pem".into()),
                    ..Args::default()
                },
                "--mqtt-tls-cert",
            ),
            (
                Args {
                    mqtt_tls_client_ca: Some("ca.pem".into()),
                    ..Args::default()
                },
                "--mqtt-tls-client-ca needs",
            ),
        ] {
            let err = Config::from_args(args).expect_err("refused");
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn bad_peers_are_refused_with_a_reason() {
        assert!(parse_peers("1=127.0.0.1:1,1=127.0.0.1:2").is_err());
        assert!(
            parse_peers("x=127.0.0.1:1")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(
            parse_peers("1:127.0.0.1")
                .unwrap_err()
                .contains("id=host:port")
        );
        assert!(
            parse_peers("1=gw1")
                .unwrap_err()
                .contains("is not host:port")
        );
        // Names are kept as they are, for the transport to resolve at every
        // dial: one that does not resolve (yet) is no error.
        let peers = parse_peers("1=gw1:7000, 2=no-such-host.invalid:7000,3=[::1]:7003")
            .expect("names are accepted");
        assert_eq!(peers[&2].to_string(), "no-such-host.invalid:7000");
        assert_eq!(peers[&3].socket_addr(), Some("[::1]:7003".parse().unwrap()));
        let args = Args {
            peers: Some("1=127.0.0.1:1,2=127.0.0.1:2".into()),
            ..Args::default()
        };
        assert!(
            Config::from_args(args)
                .unwrap_err()
                .contains("cluster-secret")
        );
    }

    #[test]
    fn the_secret_comes_from_a_file_or_the_flags_never_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "  from-the-file-0123456789\n").expect("write");
        let peers = Some("1=127.0.0.1:1,2=127.0.0.1:2".to_string());
        let c = Config::from_args(Args {
            peers: peers.clone(),
            cluster_secret_file: Some(secret.clone()),
            ..Args::default()
        })
        .expect("config");
        assert_eq!(
            c.cluster_secret.as_deref(),
            Some("from-the-file-0123456789")
        );
        // The settings file may name it too; flags and environment win.
        let toml = dir.path().join("g.toml");
        std::fs::write(
            &toml,
            format!("cluster_secret_file = {:?}\n", secret.display().to_string()),
        )
        .expect("write");
        let c = Config::from_args(Args {
            config: Some(toml.clone()),
            peers: peers.clone(),
            ..Args::default()
        })
        .expect("config");
        assert_eq!(
            c.cluster_secret.as_deref(),
            Some("from-the-file-0123456789")
        );
        let c = Config::from_args(Args {
            config: Some(toml),
            peers: peers.clone(),
            cluster_secret: Some("from-the-flags-0123456789".into()),
            ..Args::default()
        })
        .expect("config");
        assert_eq!(
            c.cluster_secret.as_deref(),
            Some("from-the-flags-0123456789")
        );
        let both = Config::from_args(Args {
            peers: peers.clone(),
            cluster_secret: Some("x".repeat(32)),
            cluster_secret_file: Some(secret),
            ..Args::default()
        });
        assert!(both.unwrap_err().contains("not both"));
        std::fs::write(dir.path().join("empty"), "\n").expect("write");
        let empty = Config::from_args(Args {
            peers: peers.clone(),
            cluster_secret_file: Some(dir.path().join("empty")),
            ..Args::default()
        });
        assert!(empty.unwrap_err().contains("is empty"));
        let missing = Config::from_args(Args {
            peers,
            cluster_secret_file: Some(dir.path().join("missing")),
            ..Args::default()
        });
        assert!(missing.unwrap_err().contains("cannot read"));
        // A single gateway needs none (it generates one at start); a joining
        // one does.
        let c = Config::from_args(Args::default()).expect("single");
        assert_eq!(c.cluster_secret, None);
        let join = Config::from_args(Args {
            join: true,
            ..Args::default()
        });
        assert!(join.unwrap_err().contains("cluster-secret-file"));
    }

    #[test]
    fn consensus_picks_the_engine_and_refuses_what_a_gateway_cannot_run() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["gateway"];
            argv.extend_from_slice(extra);
            Config::from_args(Args::try_parse_from(argv).expect("parse"))
        };
        assert_eq!(parse(&[]).expect("default").consensus, EngineKind::Raft);
        assert_eq!(
            parse(&["--consensus", "multi-paxos"])
                .expect("multi-paxos")
                .consensus,
            EngineKind::MultiPaxos
        );
        let basic = parse(&["--consensus", "basic-paxos"]).expect_err("no leader");
        assert!(basic.contains("basic-paxos has no leader"), "{basic}");
        let join = parse(&[
            "--consensus",
            "multi-paxos",
            "--join",
            "--cluster-secret",
            "s",
            "--peers",
            "1=127.0.0.1:7000,2=127.0.0.1:7001",
        ])
        .expect_err("fixed membership");
        assert!(
            join.contains("--join") && join.contains("multi-paxos"),
            "{join}"
        );
        parse(&["--consensus", "pbft"]).expect("a single PBFT gateway uses its own key");
        assert!(Args::try_parse_from(["gateway", "--consensus", "pbf"]).is_err());
    }

    /// The Byzantine test mode: the flag exists in test builds (this
    /// crate's tests turn the feature on), parses every behaviour, and is
    /// refused on an engine other than PBFT and with an unknown behaviour.
    #[cfg(feature = "byzantine")]
    #[test]
    fn byzantine_flag_parses_in_test_builds_and_needs_pbft() {
        use coordinator::pbft::byzantine::Mode;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["gateway"];
            argv.extend_from_slice(extra);
            Config::from_args(Args::try_parse_from(argv).expect("parse"))
        };
        assert_eq!(parse(&[]).expect("default").byzantine, None);
        let c = parse(&[
            "--consensus",
            "pbft",
            "--byzantine",
            "equivocate,lie-in-view-change,wrong-replies",
        ])
        .expect("every behaviour");
        assert_eq!(
            c.byzantine,
            Some(Mode {
                equivocate: true,
                lie_in_view_change: true,
                wrong_replies: true,
            })
        );
        let c = parse(&["--consensus", "pbft", "--byzantine", "wrong-replies"]).expect("one");
        assert_eq!(
            c.byzantine,
            Some(Mode {
                wrong_replies: true,
                ..Mode::default()
            })
        );
        let e = parse(&["--byzantine", "equivocate"]).expect_err("raft");
        assert!(
            e.contains("needs --consensus pbft") && e.contains("raft"),
            "{e}"
        );
        let e = parse(&["--consensus", "pbft", "--byzantine", "equivocate,lie"])
            .expect_err("unknown behaviour");
        assert!(e.contains("--byzantine") && e.contains("\"lie\""), "{e}");
        let e = parse(&["--consensus", "pbft", "--byzantine", ""]).expect_err("none");
        assert!(e.contains("at least one behaviour"), "{e}");
        // Hidden from --help: a user of a test build is not invited to it.
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(!help.contains("--byzantine"), "{help}");
    }

    #[test]
    fn pbft_needs_every_members_key_and_no_other() {
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "gateway",
                "--consensus",
                "pbft",
                "--cluster-secret",
                "s",
                "--peers",
                "1=127.0.0.1:7000,2=127.0.0.1:7001,3=127.0.0.1:7002,4=127.0.0.1:7003",
            ];
            argv.extend_from_slice(extra);
            Config::from_args(Args::try_parse_from(argv).expect("parse"))
        };
        let key = |seed: u8| coordinator::keys::NodeKey::from_seed([seed; 32]).public_text();
        let keys = |ids: &[u64]| {
            ids.iter()
                .map(|&i| format!("{i}={}", key(i as u8)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let missing = parse(&[]).expect_err("no keys");
        assert!(missing.contains("needs --group-keys"), "{missing}");
        let c = parse(&["--group-keys", &keys(&[1, 2, 3, 4])]).expect("all four");
        assert_eq!(c.group_keys.len(), 4);
        let e = parse(&["--group-keys", &keys(&[1, 2, 3])]).expect_err("one missing");
        assert!(e.contains("no key for member 4"), "{e}");
        let e = parse(&["--group-keys", &keys(&[1, 2, 3, 4, 5])]).expect_err("non-member");
        assert!(e.contains("node 5, which is not a member"), "{e}");
        let bad = format!("{},4=ed25519:AAAA", keys(&[1, 2, 3]));
        let e = parse(&["--group-keys", &bad]).expect_err("malformed");
        assert!(e.contains("the key of node 4"), "{e}");
        // This gateway's key must be the one of its key file.
        let c = parse(&["--group-keys", &keys(&[1, 2, 3, 4])]).expect("all four");
        let own = coordinator::keys::NodeKey::from_seed([9; 32]);
        let e = c.group_keys_with(&own).expect_err("not its key");
        assert!(e.contains("not the key in its data directory"), "{e}");
        let own = coordinator::keys::NodeKey::from_seed([1; 32]);
        assert_eq!(c.group_keys_with(&own).expect("its key").len(), 4);
        // Membership is fixed under PBFT.
        let join = Config::from_args(
            Args::try_parse_from([
                "gateway",
                "--consensus",
                "pbft",
                "--join",
                "--cluster-secret",
                "s",
                "--peers",
                "1=127.0.0.1:7000,2=127.0.0.1:7001",
            ])
            .expect("parse"),
        )
        .expect_err("join");
        assert!(join.contains("--join") && join.contains("pbft"), "{join}");
        let raft = Config::from_args(
            Args::try_parse_from(["gateway", "--group-keys", &keys(&[1])]).expect("parse"),
        )
        .expect_err("raft");
        assert!(
            raft.contains("--group-keys is for --consensus pbft"),
            "{raft}"
        );
    }
}
