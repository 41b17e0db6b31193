//! `loadgen`: the load generator and report writer of the side-by-side
//! benchmarks (`bench/run.sh`). The same client code drives etcd (through
//! its JSON gateway) and an Entente group (through its REST API); latencies
//! go into HdrHistograms. See `loadgen --help`.

mod failover;
mod load;
mod machine;
mod report;
mod sampler;
mod stats;
mod systems;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::load::{LoadSpec, Spread};
use crate::systems::{Op, Sys, Target, normalise, read_token};

/// Load generator for the side-by-side benchmarks (Entente and etcd).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Describe the machine and time fdatasync in a directory (JSON).
    Machine(MachineArgs),
    /// Record, until killed, the CPU used by this session's processes and
    /// by all other work on the machine (JSON lines).
    Sample(SampleArgs),
    /// Wait (bounded) until the CPUs are mostly idle, so that a burst of
    /// other work on a shared machine does not land on one measurement.
    WaitQuiet(WaitQuietArgs),
    /// Wait until a group has a settled leader; print the leader's index
    /// (0-based, in --endpoints order).
    Ready(ReadyArgs),
    /// Create the keys (etcd) or devices (Entente) the clients use.
    Setup(SetupArgs),
    /// ~100-byte JSON writes: etcd PUT, Entente desired-state PATCH.
    Write(LoadArgs),
    /// Reads: etcd range, Entente GET of a device.
    Read(ReadArgs),
    /// Kill -9 the leader of a group started from the given command lines,
    /// time to the first successful write, N times.
    Failover(FailoverArgs),
    /// The lower of the systems' best closed-loop write throughputs in a
    /// results directory (for choosing open-loop rates).
    Peak(PeakArgs),
    /// Write BENCHMARKS.md and the chart's data from a results directory.
    Report(report::ReportArgs),
}

#[derive(Debug, Args)]
struct MachineArgs {
    /// Where to time fdatasync (the benchmark's data directory).
    #[arg(long)]
    dir: PathBuf,
    /// fdatasync calls to time.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Bytes appended before each fdatasync.
    #[arg(long, default_value_t = 4096)]
    block: usize,
    /// Output file (stdout if absent).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SampleArgs {
    /// The benchmark's session id (its processes count as "ours").
    #[arg(long)]
    session: u32,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    interval_secs: u64,
    /// Output file (appended).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct WaitQuietArgs {
    /// Quiet means at most this share of all CPU time busy over the window, %.
    #[arg(long, default_value_t = 25.0)]
    max_busy_pct: f64,
    /// Window, s.
    #[arg(long, default_value_t = 2)]
    window_secs: u64,
    /// Give up after this long, s (and go on anyway).
    #[arg(long, default_value_t = 20)]
    timeout_secs: u64,
}

/// Which group and how to reach it.
#[derive(Debug, Args, Clone)]
struct Group {
    /// The system.
    #[arg(long, value_enum)]
    target: Target,
    /// Client URLs of the members, comma-separated (http://host:port).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Entente: files that may hold the admin token (the first that exists
    /// is read), comma-separated.
    #[arg(long, value_delimiter = ',')]
    token_file: Vec<PathBuf>,
    /// Timeout of one request, ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

impl Group {
    async fn sys(&self, wait: Duration) -> Result<Sys> {
        let token = match self.target {
            Target::Entente => Some(read_token(&self.token_file, wait).await?),
            Target::Etcd => None,
        };
        Ok(Sys {
            target: self.target,
            endpoints: self.endpoints.iter().map(|e| normalise(e)).collect(),
            token,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

#[derive(Debug, Args)]
struct ReadyArgs {
    #[command(flatten)]
    t: Group,
    /// Longest wait, s.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

#[derive(Debug, Args)]
struct SetupArgs {
    #[command(flatten)]
    t: Group,
    /// Clients whose key or device to create.
    #[arg(long)]
    clients: usize,
}

#[derive(Debug, Args, Clone)]
struct LoadArgs {
    #[command(flatten)]
    t: Group,
    /// Concurrent clients (each with its own connections).
    #[arg(long)]
    clients: usize,
    /// Total offered requests per second: open loop. Absent: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Which member each request goes to.
    #[arg(long, value_enum, default_value_t = Spread::Rotate)]
    spread: Spread,
    /// Server process ids, comma-separated: their CPU time per request is
    /// reported.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Write the result (JSON) here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Consistency {
    /// etcd: linearizable range (its default); Entente: the default GET (ReadIndex).
    Linearizable,
    /// etcd: serializable range; Entente: `?consistency=local`.
    Local,
}

#[derive(Debug, Args)]
struct ReadArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Read consistency.
    #[arg(long, value_enum, default_value_t = Consistency::Linearizable)]
    consistency: Consistency,
}

#[derive(Debug, Args)]
struct FailoverArgs {
    #[command(flatten)]
    t: Group,
    /// One command line per member, in --endpoints order (repeat the flag).
    #[arg(long = "member-cmd", required = true)]
    member_cmd: Vec<String>,
    /// Member logs and their pid file.
    #[arg(long)]
    log_dir: PathBuf,
    /// Kills.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// A new write attempt every this many ms after the kill.
    #[arg(long, default_value_t = 10)]
    probe_every_ms: u64,
    /// Bound of one write attempt, ms.
    #[arg(long, default_value_t = 5_000)]
    attempt_timeout_ms: u64,
    /// Pause between the group settling and the kill, ms.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// A label for the settings (shown in the report).
    #[arg(long, default_value = "defaults")]
    label: String,
    /// Write the result (JSON) here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PeakArgs {
    /// The results directory.
    #[arg(long)]
    results: PathBuf,
}

fn emit<T: serde::Serialize>(v: &T, out: Option<&PathBuf>) -> Result<()> {
    let s = serde_json::to_string_pretty(v).context("encoding")?;
    if let Some(p) = out {
        std::fs::write(p, &s).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{s}");
    Ok(())
}

async fn load(a: LoadArgs, op: Op) -> Result<()> {
    if a.clients == 0 || a.duration_secs == 0 {
        bail!("give at least one client and one second");
    }
    if let Some(r) = a.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be positive");
    }
    let sys = Arc::new(a.t.sys(Duration::from_secs(5)).await?);
    let spec = LoadSpec {
        op,
        clients: a.clients,
        rate: a.rate,
        warmup: Duration::from_secs(a.warmup_secs),
        duration: Duration::from_secs(a.duration_secs),
        spread: a.spread,
        pids: a.pids.clone(),
    };
    let r = load::run(sys, &spec).await;
    let errs: u64 = r.errors.values().sum();
    eprintln!(
        "{} {:?} {} clients{}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        r.system.name(),
        r.op,
        r.clients,
        r.offered_rate
            .map_or(String::new(), |x| format!(" at {x:.0}/s offered")),
        r.throughput,
        r.latency.p50,
        r.latency.p99,
        errs
    );
    emit(&r, a.out.as_ref())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Machine(a) => {
            std::fs::create_dir_all(&a.dir).context("creating --dir")?;
            let m = machine::measure(&a.dir, a.count, a.block)?;
            emit(&m, a.out.as_ref())
        }
        Cmd::Sample(a) => sampler::run(
            a.session,
            Duration::from_secs(a.interval_secs.max(1)),
            &a.out,
        ),
        Cmd::Report(a) => report::write(&a),
        Cmd::WaitQuiet(a) => {
            let t = std::time::Instant::now();
            let mut busy;
            loop {
                busy = machine::busy_pct(Duration::from_secs(a.window_secs.max(1)));
                if busy <= a.max_busy_pct || t.elapsed().as_secs() >= a.timeout_secs {
                    break;
                }
            }
            println!("{busy:.0} {:.0}", t.elapsed().as_secs_f64());
            Ok(())
        }
        Cmd::Peak(a) => {
            let peak = report::peak_write(&a.results)?;
            println!("{peak:.0}");
            Ok(())
        }
        cmd => tokio::runtime::Runtime::new()
            .context("runtime")?
            .block_on(async_main(cmd)),
    }
}

async fn async_main(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Ready(a) => {
            let limit = Duration::from_secs(a.timeout_secs);
            let sys = a.t.sys(limit).await?;
            let all: Vec<usize> = (0..sys.endpoints.len()).collect();
            let leader = sys
                .wait_settled(&systems::http_client(), &all, limit)
                .await?;
            println!("{leader}");
            Ok(())
        }
        Cmd::Setup(a) => {
            let sys = a.t.sys(Duration::from_secs(30)).await?;
            sys.setup(a.clients).await
        }
        Cmd::Write(a) => load(a, Op::Write).await,
        Cmd::Read(a) => {
            let op = match a.consistency {
                Consistency::Linearizable => Op::ReadLinearizable,
                Consistency::Local => Op::ReadLocal,
            };
            load(a.load, op).await
        }
        Cmd::Failover(a) => {
            let sys = Sys {
                target: a.t.target,
                endpoints: a.t.endpoints.iter().map(|e| normalise(e)).collect(),
                token: None,
                timeout: Duration::from_millis(a.t.timeout_ms),
            };
            let spec = failover::FailoverSpec {
                commands: a.member_cmd,
                log_dir: a.log_dir,
                trials: a.trials,
                probe_every: Duration::from_millis(a.probe_every_ms.max(1)),
                attempt_timeout: Duration::from_millis(a.attempt_timeout_ms),
                settle: Duration::from_millis(a.settle_ms),
                token_files: a.t.token_file,
                label: a.label,
            };
            let r = failover::run(sys, &spec).await?;
            eprintln!(
                "{} failover ({}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} kills",
                r.system.name(),
                r.label,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.trials_ms.len()
            );
            emit(&r, a.out.as_ref())
        }
        _ => unreachable!("handled in main"),
    }
}
