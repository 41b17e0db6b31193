//! The command line: `device-sim run | bench | ingest`, and the glue from
//! flags to the modules that do the work.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bench::{self, ApiMode, BenchConfig};
use crate::creds::{Credentials, Provision, check_prefix, device_id, provision};
use crate::device::Behaviour;
use crate::fleet::{Fleet, FleetConfig};
use crate::ingest::{self, IngestClient, IngestConfig};
use crate::mqtt::{BrokerAddr, Protocol, Tls};
use crate::rest::Api;
use crate::run::{self, RunOptions};

/// Simulated Entente devices and load generators.
#[derive(Debug, Parser)]
#[command(name = "device-sim", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register and connect a fleet of devices that answer commands, apply
    /// desired state and report; measure connection rate and memory.
    Run(RunArgs),
    /// Issue commands over REST at a fixed rate to an in-process fleet and
    /// measure REST, delivery and result latencies.
    Bench(BenchArgs),
    /// MQTT ingest: clients publish QoS 1 messages as fast as allowed (or
    /// at a rate) and measure PUBACKs per second and latency.
    Ingest(IngestArgs),
}

/// Bounds of time flags (they are added to instants, which must not overflow).
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
const YEAR: u64 = 365 * DAY;

fn parse_broker(s: &str) -> Result<BrokerAddr, String> {
    BrokerAddr::parse(s)
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a probability between 0 and 1"))
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v >= 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} must be zero or more"))
    }
}

fn parse_positive_rate(s: &str) -> Result<f64, String> {
    match parse_rate(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err("must be more than zero".into()),
    }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    check_prefix(s).map(|_| s.to_string())
}

/// Flags every subcommand shares.
#[derive(Debug, Args)]
pub struct Common {
    /// MQTT addresses of the gateways (or broker), comma-separated
    /// host:port. Use the MQTT 5 listeners with --mqtt5.
    #[arg(long, value_delimiter = ',', value_parser = parse_broker,
          default_value = "127.0.0.1:1883")]
    pub gateways: Vec<BrokerAddr>,
    /// REST addresses of the gateways, comma-separated (http://host:port or
    /// host:port). Needed to register devices, issue commands and read
    /// the gateways' metrics.
    #[arg(long, value_delimiter = ',')]
    pub api: Vec<String>,
    /// Bearer token for the REST API.
    #[arg(long, env = "ENTENTE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (a gateway writes its first admin token
    /// to <data-dir>/admin-token).
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Speak MQTT 5 instead of 3.1.1.
    #[arg(long)]
    pub mqtt5: bool,
    /// Connect over TLS, trusting the CA certificates (PEM) in this file;
    /// point --gateways at the gateways' TLS listeners (--mqtt-tls-listen,
    /// 8883 by default) by a name or address their certificate carries.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the summary as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Connection attempts in progress at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Longest wait for every client to connect, in seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=DAY))]
    pub connect_timeout_secs: u64,
    /// Longest wait of one connection attempt (TCP connect to CONNACK), in
    /// seconds; a gateway busy with many new devices answers slowly.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=HOUR))]
    pub attempt_timeout_secs: u64,
    /// MQTT keep-alive, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    pub keep_alive_secs: u64,
    /// Where device ids and secrets are kept between runs (read if it
    /// exists; written after registering).
    #[arg(long)]
    pub devices_file: Option<PathBuf>,
    /// Give devices that are already registered, but whose secret is not in
    /// the devices file, a new secret (instead of failing).
    #[arg(long)]
    pub rotate_existing: bool,
    /// Single registrations in flight at once. Devices are registered in
    /// batches of 1,000 (POST /v1/devices/batch, one log entry each); one
    /// request per device only for a batch that met devices registered
    /// already.
    #[arg(long, default_value_t = 32)]
    pub register_concurrency: usize,
    /// Timeout of one REST request, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=HOUR * 1000))]
    pub request_timeout_ms: u64,
}

impl Common {
    /// The TLS settings of `--tls-ca`, if given.
    fn tls(&self) -> Result<Option<Tls>> {
        Ok(self.tls_ca.as_deref().map(Tls::trusting).transpose()?)
    }

    fn protocol(&self) -> Protocol {
        if self.mqtt5 {
            Protocol::V5
        } else {
            Protocol::V4
        }
    }

    fn token(&self) -> Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_string()));
        }
        match &self.token_file {
            Some(path) => {
                let t = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?;
                let t = t.trim();
                if t.is_empty() {
                    bail!("the token file {} is empty", path.display());
                }
                Ok(Some(t.to_string()))
            }
            None => Ok(None),
        }
    }

    /// The REST client, if `--api` was given (a token is then required).
    fn api(&self, pool: usize) -> Result<Option<Api>> {
        if self.api.is_empty() {
            return Ok(None);
        }
        let Some(token) = self.token()? else {
            bail!(
                "--api needs a bearer token: give --token, --token-file or ENTENTE_TOKEN \
                 (a gateway writes its first admin token to <data-dir>/admin-token)"
            );
        };
        Api::new(
            &self.api,
            Some(token),
            Duration::from_millis(self.request_timeout_ms),
            pool,
        )
        .map(Some)
    }

    async fn credentials(
        &self,
        api: Option<&Api>,
        prefix: &str,
        count: usize,
    ) -> Result<Vec<Credentials>> {
        if count == 0 {
            bail!("give at least one device");
        }
        let started = Instant::now();
        let creds = provision(
            api,
            &Provision {
                prefix,
                count,
                file: self.devices_file.as_deref(),
                rotate_existing: self.rotate_existing,
                concurrency: self.register_concurrency,
            },
        )
        .await?;
        eprintln!(
            "device-sim: {count} devices ready ({}…) in {:.1} s",
            creds.first().map_or("", |c| c.id.as_str()),
            started.elapsed().as_secs_f64()
        );
        Ok(creds)
    }
}

/// Flags of the simulated fleet.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Devices to simulate.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Device id prefix (ids are the prefix and a six-digit index).
    #[arg(long, default_value = "sim-", value_parser = parse_prefix)]
    pub prefix: String,
    /// Delay between a command's `accepted` and its `result`, ms.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=HOUR * 1000))]
    pub result_delay_ms: u64,
    /// Probability that a command fails (`"fail": true` in the parameters
    /// always fails); seeded (--seed). Jobs' commands too: with a job's
    /// abort rule this exercises it.
    #[arg(long, alias = "fail-rate", default_value_t = 0.0, value_parser = parse_probability)]
    pub failure_rate: f64,
    /// Random state reports per device per second.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub report_rate: f64,
    /// Random disconnects per device per second (each device reconnects to
    /// the next gateway).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub churn_rate: f64,
    /// Longest reconnect backoff, ms.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=HOUR * 1000))]
    pub backoff_max_ms: u64,
}

impl FleetArgs {
    fn config(&self, common: &Common) -> Result<FleetConfig> {
        Ok(FleetConfig {
            gateways: common.gateways.clone(),
            protocol: common.protocol(),
            keep_alive: Duration::from_secs(common.keep_alive_secs),
            connect_concurrency: common.connect_concurrency,
            attempt_timeout: Duration::from_secs(common.attempt_timeout_secs),
            behaviour: Behaviour {
                result_delay: Duration::from_millis(self.result_delay_ms),
                failure_rate: self.failure_rate,
            },
            report_rate: self.report_rate,
            churn_rate: self.churn_rate,
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            seed: common.seed,
            observer: None,
            tls: common.tls()?,
        })
    }
}

/// `device-sim run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: Common,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub fleet: FleetArgs,
    /// How long to run once connected, seconds (0 = until Ctrl-C).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=YEAR))]
    pub duration_secs: u64,
    /// Pause after every device connected before reading the gateways'
    /// memory, seconds.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=HOUR))]
    pub settle_secs: u64,
    /// Follow this job (needs --api): print its progress to stderr while
    /// the fleet answers its commands, and end the run when the job is
    /// over (completed, canceled or aborted) — or at --duration-secs or
    /// Ctrl-C, whichever is first. The summary ends with the job's state.
    #[arg(long)]
    pub job: Option<String>,
    /// Once the fleet is connected, create a job over all its devices (at
    /// most 10,000) launching this many a minute (needs --api), follow it
    /// as --job does, and report how long its rollout took against the
    /// time the rate implies.
    #[arg(long, conflicts_with = "job", value_parser = clap::value_parser!(u32).range(1..=600_000))]
    pub job_rate: Option<u32>,
    /// With --job-rate: the job's max_in_flight.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub job_in_flight: u32,
}

/// `device-sim bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: Common,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub fleet: FleetArgs,
    /// Commands per second to offer.
    #[arg(long, default_value_t = 200.0, value_parser = parse_positive_rate)]
    pub rate: f64,
    /// How long to offer them, seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=DAY))]
    pub duration_secs: u64,
    /// Requests outstanding at most (a command finding none free waits,
    /// and its latency counts the wait).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Where requests go with several --api addresses.
    #[arg(long, value_enum, default_value_t = ApiMode::Spread)]
    pub api_mode: ApiMode,
    /// How long to wait for outstanding results after the last command, s.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=DAY))]
    pub drain_secs: u64,
    /// How late after the end a command may still be sent, ms; commands
    /// not sent by then count as `backlog` errors.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=HOUR * 1000))]
    pub send_grace_ms: u64,
    /// Command name.
    #[arg(long, default_value = "bench")]
    pub command_name: String,
    /// Command time to live, ms (the gateway's default if absent).
    #[arg(long)]
    pub ttl_ms: Option<u64>,
}

/// `device-sim ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: Common,
    /// Publishing clients.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Client (device) id prefix.
    #[arg(long, default_value = "ingest-", value_parser = parse_prefix)]
    pub prefix: String,
    /// Unacknowledged messages per client.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Total messages per second (open loop); as fast as acknowledged if
    /// absent.
    #[arg(long, value_parser = parse_positive_rate)]
    pub rate: Option<f64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=DAY))]
    pub duration_secs: u64,
    /// Payload size, bytes (JSON).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=16_000))]
    pub payload_bytes: u64,
    /// Connect without credentials, to any broker (no registration).
    #[arg(long)]
    pub anonymous: bool,
}

/// Prints `table`, or with `json` the report as JSON on stdout and the
/// table on stderr.
fn emit<T: Serialize>(json: bool, table: &str, report: &T) -> Result<()> {
    if json {
        eprint!("{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(report).context("encoding the report")?
        );
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Resolves after `duration`, or on Ctrl-C (only on Ctrl-C when `None`).
async fn stop_after(duration: Option<Duration>) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match duration {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = ctrl_c => {}
            }
        }
        None => ctrl_c.await,
    }
}

fn interactive() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal()
}

async fn run_cmd(a: RunArgs) -> Result<()> {
    let api = a.common.api(a.common.register_concurrency)?;
    let creds = a
        .common
        .credentials(api.as_ref(), &a.fleet.prefix, a.fleet.devices)
        .await?;
    let options = RunOptions {
        connect_timeout: Duration::from_secs(a.common.connect_timeout_secs),
        settle: Duration::from_secs(a.settle_secs),
        status: interactive(),
    };
    let duration = (a.duration_secs > 0).then(|| Duration::from_secs(a.duration_secs));
    if a.job.is_none() && a.job_rate.is_none() {
        let report = run::run(
            a.fleet.config(&a.common)?,
            &creds,
            api.as_ref(),
            &options,
            stop_after(duration),
        )
        .await?;
        return emit(a.common.json, &report.table(), &report);
    }
    let Some(api) = api.as_ref() else {
        bail!("--job and --job-rate use the REST API: give --api (and a token)");
    };
    if a.job_rate.is_some() && creds.len() > 10_000 {
        bail!("--job-rate makes a job over every device: at most 10,000 (a job's limit)");
    }
    let id = std::sync::Mutex::new(a.job.clone());
    let last = std::sync::Mutex::new(None);
    // Runs once the fleet is connected (run::run awaits it then).
    let stop = async {
        if let Some(rate) = a.job_rate {
            let body = serde_json::json!({
                "command": {"name": "sim-job"},
                "target": {"devices": creds.iter().map(|c| c.id.as_str()).collect::<Vec<_>>()},
                "rollout": {"max_per_minute": rate, "max_in_flight": a.job_in_flight},
            });
            match api.create_job(&body).await {
                Ok(j) => *lock(&id) = j["id"].as_str().map(str::to_string),
                Err(e) => {
                    eprintln!("device-sim: creating the job: {e:#}");
                    return;
                }
            }
        }
        let Some(job) = lock(&id).clone() else {
            return;
        };
        tokio::select! {
            j = crate::job::follow(api, &job, JOB_POLL) => {
                if let Ok(j) = j {
                    *lock(&last) = Some(j);
                }
            }
            _ = stop_after(duration) => {}
        }
    };
    let report = run::run(
        a.fleet.config(&a.common)?,
        &creds,
        Some(api),
        &options,
        stop,
    )
    .await?;
    let Some(job_id) = lock(&id).clone() else {
        bail!("no job was created");
    };
    let followed = lock(&last).clone();
    let job = match followed {
        Some(j) => j,
        None => api.job(&job_id).await?,
    };
    let mut table = format!("{}{}\n", report.table(), crate::job::progress_line(&job));
    if let Some(t) = crate::job::rollout_timing(&job) {
        table.push_str(&format!("{}\n", t.line()));
    }
    emit(
        a.common.json,
        &table,
        &serde_json::json!({
            "run": report,
            "job": job,
            "rollout": crate::job::rollout_timing(&job),
        }),
    )
}

/// `m` locked, poisoned or not.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often `run --job` reads the job.
const JOB_POLL: Duration = Duration::from_secs(1);

async fn bench_cmd(a: BenchArgs) -> Result<()> {
    let pool = a.concurrency.max(a.common.register_concurrency);
    let Some(api) = a.common.api(pool)? else {
        bail!("bench issues commands over REST: give --api (and a token)");
    };
    let creds = a
        .common
        .credentials(Some(&api), &a.fleet.prefix, a.fleet.devices)
        .await?;
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let mut config = a.fleet.config(&a.common)?;
    config.observer = Some(seen_tx);
    let fleet = Fleet::start(config, &creds)?;
    let connect_timeout = Duration::from_secs(a.common.connect_timeout_secs);
    if let Err(e) = fleet.wait_ready(creds.len(), connect_timeout).await {
        fleet.stop(Duration::from_secs(2)).await;
        return Err(e);
    }
    eprintln!("device-sim: {} devices connected", creds.len());
    match api
        .settle(crate::rest::SETTLE_QUIET, crate::rest::SETTLE_TIMEOUT)
        .await
    {
        Ok(took) => eprintln!(
            "device-sim: gateways idle after {} ms (logs still and applied, CPU under a tenth of a core)",
            took.as_millis()
        ),
        Err(e) => eprintln!("warning: starting anyway: {e:#}"),
    }
    let ids: Vec<String> = creds.into_iter().map(|c| c.id).collect();
    let cfg = BenchConfig {
        rate: a.rate,
        duration: Duration::from_secs(a.duration_secs),
        concurrency: a.concurrency,
        api_mode: a.api_mode,
        drain: Duration::from_secs(a.drain_secs),
        send_grace: Duration::from_millis(a.send_grace_ms),
        command_name: a.command_name.clone(),
        ttl_ms: a.ttl_ms,
        progress: interactive(),
    };
    let result = bench::run(&cfg, &api, &ids, seen_rx).await;
    let snapshot = fleet.stats().snapshot();
    fleet.stop(Duration::from_secs(3)).await;
    let mut report = result?;
    report.fleet = Some(snapshot);
    emit(a.common.json, &report.table(), &report)
}

async fn ingest_cmd(a: IngestArgs) -> Result<()> {
    if a.clients == 0 {
        bail!("give at least one client");
    }
    let api = a.common.api(a.common.register_concurrency)?;
    let clients: Vec<IngestClient> = if a.anonymous {
        (0..a.clients)
            .map(|i| IngestClient {
                id: device_id(&a.prefix, i),
                secret: None,
            })
            .collect()
    } else {
        a.common
            .credentials(api.as_ref(), &a.prefix, a.clients)
            .await?
            .into_iter()
            .map(|c| IngestClient {
                id: c.id,
                secret: Some(c.secret),
            })
            .collect()
    };
    let cfg = IngestConfig {
        brokers: a.common.gateways.clone(),
        protocol: a.common.protocol(),
        inflight: a.inflight,
        rate: a.rate,
        duration: Duration::from_secs(a.duration_secs),
        payload_bytes: usize::try_from(a.payload_bytes).unwrap_or(100),
        connect_concurrency: a.common.connect_concurrency,
        connect_timeout: Duration::from_secs(a.common.connect_timeout_secs),
        attempt_timeout: Duration::from_secs(a.common.attempt_timeout_secs),
        keep_alive: Duration::from_secs(a.common.keep_alive_secs),
        progress: interactive(),
        seed: a.common.seed,
        tls: a.common.tls()?,
    };
    let before = match &api {
        Some(api) => Some(api.sample().await?),
        None => None,
    };
    let mut report = ingest::run(&cfg, &clients).await?;
    if let (Some(api), Some(b)) = (&api, before) {
        // Give the gateways one coalescing window to flush what arrived last.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = api.sample().await?;
        report.gateway_reports_received = Some(after.reports_received - b.reports_received);
        report.gateway_report_proposals = Some(after.report_proposals - b.report_proposals);
    }
    emit(a.common.json, &report.table(), &report)
}

/// Raises the open-file limit (every device is a socket) and runs `cli`.
pub async fn main(cli: Cli) -> Result<()> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 20_000 => {
            eprintln!("device-sim: warning: the open-file limit is {n}; 10,000 devices need more")
        }
        Ok(_) => {}
        Err(e) => eprintln!("device-sim: warning: could not raise the open-file limit: {e}"),
    }
    match cli.command {
        Command::Run(a) => run_cmd(a).await,
        Command::Bench(a) => bench_cmd(a).await,
        Command::Ingest(a) => ingest_cmd(a).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_and_checks_values() {
        let cli = Cli::try_parse_from([
            "device-sim",
            "bench",
            "--gateways",
            "127.0.0.1:1883,127.0.0.1:2883",
            "--api",
            "127.0.0.1:8080",
            "--token",
            "t",
            "--rate",
            "1000",
            "--api-mode",
            "leader",
        ])
        .expect("parse");
        let Command::Bench(b) = cli.command else {
            panic!("bench expected");
        };
        assert_eq!(b.common.gateways.len(), 2);
        assert_eq!(b.api_mode, ApiMode::Leader);
        assert_eq!(b.rate, 1000.0);
        let cli = Cli::try_parse_from([
            "device-sim",
            "run",
            "--fail-rate",
            "0.25",
            "--job",
            "j-0123",
        ])
        .expect("parse");
        let Command::Run(r) = cli.command else {
            panic!("run expected");
        };
        assert_eq!(r.fleet.failure_rate, 0.25);
        assert_eq!(r.job.as_deref(), Some("j-0123"));
        for bad in [
            vec!["device-sim", "run", "--failure-rate", "2"],
            vec!["device-sim", "run", "--prefix", "a/b"],
            vec!["device-sim", "run", "--gateways", "nohost"],
            vec!["device-sim", "bench", "--rate", "0"],
            vec!["device-sim", "ingest", "--inflight", "0"],
            vec!["device-sim", "run", "--token", "a", "--token-file", "b"],
            vec![
                "device-sim",
                "run",
                "--result-delay-ms",
                "18446744073709551615",
            ],
            vec!["device-sim", "bench", "--duration-secs", "0"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn api_without_a_token_is_refused() {
        let cli =
            Cli::try_parse_from(["device-sim", "run", "--api", "127.0.0.1:1"]).expect("parse");
        let Command::Run(r) = cli.command else {
            panic!("run expected");
        };
        if r.common.token.is_none() {
            let err = r.common.api(1).expect_err("no token");
            assert!(err.to_string().contains("--token"), "{err}");
        }
    }
}
