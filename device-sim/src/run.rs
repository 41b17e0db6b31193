//! `device-sim run`: connect a fleet, keep it running, and measure what
//! connecting it cost — on the simulator and, through `/metrics`, on the
//! gateways.

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use tokio::time::Instant;

use crate::creds::Credentials;
use crate::fleet::{Fleet, FleetConfig, FleetSnapshot};
use crate::mqtt::Protocol;
use crate::rest::{Api, GatewaySample};
use crate::stats::{LatencySummary, kib, mib, own_rss_bytes, per_sec};
use crate::status::StatusLine;

/// Settings of a run besides the fleet's.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Longest wait for every device to connect and subscribe.
    pub connect_timeout: Duration,
    /// Pause after connecting before the gateway's memory is read.
    pub settle: Duration,
    /// Show the live status line.
    pub status: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// MQTT version.
    pub protocol: Protocol,
    /// Gateways (MQTT).
    pub gateways: Vec<String>,
    /// Devices simulated.
    pub devices: usize,
    /// Devices connected (first connection) in the connect phase.
    pub connected: u64,
    /// From the first CONNECT to the last first CONNACK, seconds.
    pub connect_secs: f64,
    /// Devices connected per second over that window.
    pub connect_rate: f64,
    /// Each device's first connection attempt → CONNACK, ms.
    pub connect_latency: LatencySummary,
    /// This process's resident memory before the fleet started.
    pub sim_rss_before: Option<u64>,
    /// ... and once every device was connected.
    pub sim_rss_after: Option<u64>,
    /// The difference per device.
    pub sim_bytes_per_device: Option<f64>,
    /// The gateways' resident memory (summed) before connecting.
    pub gateway_rss_before: Option<f64>,
    /// ... and after every device connected (plus the settle time).
    pub gateway_rss_after: Option<f64>,
    /// The difference per connected idle device.
    pub gateway_bytes_per_device: Option<f64>,
    /// From every device connected and subscribed to the gateways idle
    /// again (logs still and applied, CPU low: `Api::settle`), seconds: the
    /// rest of the connection work (presence, deliveries on subscribe).
    pub gateway_idle_after_secs: Option<f64>,
    /// CPU the gateways spent from before the fleet started until then,
    /// seconds.
    pub gateway_connect_cpu_secs: Option<f64>,
    /// Seconds the connected fleet ran.
    pub duration_secs: f64,
    /// `shadow/reported` messages sent in that time, per second.
    pub reports_sent_per_sec: f64,
    /// ... and acknowledged by the gateways, per second.
    pub reports_acked_per_sec: f64,
    /// Reported patches the gateways received during the run.
    pub gateway_reports_received: Option<f64>,
    /// `ReportState` proposals they made of them.
    pub gateway_report_proposals: Option<f64>,
    /// Patches per proposal (coalescing).
    pub coalescing_ratio: Option<f64>,
    /// The fleet's counters at the end.
    pub fleet: FleetSnapshot,
}

fn opt(v: Option<String>) -> String {
    v.unwrap_or_else(|| "n/a".into())
}

impl RunReport {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let f = &self.fleet;
        let mut s = String::new();
        s.push_str(&format!(
            "devices          {} over {} ({:?})\n",
            self.devices,
            self.gateways.join(","),
            self.protocol
        ));
        s.push_str(&format!(
            "connect          {} devices in {:.2} s: {:.0} devices/s (first CONNECT to last CONNACK)\n",
            self.connected, self.connect_secs, self.connect_rate
        ));
        let l = &self.connect_latency;
        s.push_str(&format!(
            "connect latency  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (attempt to CONNACK)\n",
            l.p50, l.p99, l.max
        ));
        if let Some(idle) = self.gateway_idle_after_secs {
            s.push_str(&format!(
                "gateway work     idle {:.2} s after the last subscription; {} of gateway CPU for the connect\n",
                idle,
                opt(self.gateway_connect_cpu_secs.map(|c| format!("{c:.2} s")))
            ));
        }
        s.push_str(&format!(
            "sim memory       {} -> {}: {} per device\n",
            opt(self.sim_rss_before.map(|b| mib(b as f64))),
            opt(self.sim_rss_after.map(|b| mib(b as f64))),
            opt(self.sim_bytes_per_device.map(kib))
        ));
        s.push_str(&format!(
            "gateway memory   {} -> {}: {} per connected idle device\n",
            opt(self.gateway_rss_before.map(mib)),
            opt(self.gateway_rss_after.map(mib)),
            opt(self.gateway_bytes_per_device.map(kib))
        ));
        s.push_str(&format!(
            "ran              {:.1} s; reconnects {}, churned {}, connect errors {}\n",
            self.duration_secs,
            f.connects.saturating_sub(f.initially_connected),
            f.churned,
            f.connect_errors
        ));
        s.push_str(&format!(
            "commands         received {} (duplicates {}), succeeded {}, failed {}, results acked {}\n",
            f.commands_received,
            f.commands_duplicate,
            f.results_succeeded,
            f.results_failed,
            f.results_acked
        ));
        s.push_str(&format!(
            "reports          sent {} ({:.1}/s), acked {} ({:.1}/s)\n",
            f.reports_sent, self.reports_sent_per_sec, f.reports_acked, self.reports_acked_per_sec
        ));
        s.push_str(&format!(
            "gateway reports  received {}, proposals {}, coalescing {} patches/proposal\n",
            opt(self.gateway_reports_received.map(|v| format!("{v:.0}"))),
            opt(self.gateway_report_proposals.map(|v| format!("{v:.0}"))),
            opt(self.coalescing_ratio.map(|v| format!("{v:.2}")))
        ));
        if let Some(e) = &f.last_error {
            s.push_str(&format!("last error       {e}\n"));
        }
        s
    }
}

async fn sample(api: Option<&Api>) -> Option<GatewaySample> {
    match api?.sample().await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: could not read the gateways' /metrics: {e:#}");
            None
        }
    }
}

/// Connects `devices` as `fleet` describes, keeps them running until `stop`
/// resolves, and reports. With `api`, reads the gateways' metrics too.
pub async fn run(
    fleet: FleetConfig,
    devices: &[Credentials],
    api: Option<&Api>,
    options: &RunOptions,
    stop: impl Future<Output = ()>,
) -> Result<RunReport> {
    let gateways: Vec<String> = fleet.gateways.iter().map(|g| g.to_string()).collect();
    let protocol = fleet.protocol;
    let gw_before = sample(api).await;
    let sim_before = own_rss_bytes();
    let fleet = Fleet::start(fleet, devices)?;
    let status = StatusLine::start(fleet.stats().clone(), options.status);
    if let Err(e) = fleet
        .wait_ready(devices.len(), options.connect_timeout)
        .await
    {
        status.finish();
        fleet.stop(Duration::from_secs(2)).await;
        return Err(e);
    }
    let sim_after = own_rss_bytes();
    let idle = match api {
        Some(a) => match a
            .settle(crate::rest::SETTLE_QUIET, crate::rest::SETTLE_TIMEOUT)
            .await
        {
            Ok(took) => Some(took),
            Err(e) => {
                eprintln!("warning: {e:#}");
                None
            }
        },
        None => None,
    };
    let gw_idle = match idle {
        Some(_) => sample(api).await,
        None => None,
    };
    let (window, connected) = fleet
        .stats()
        .connect_window()
        .unwrap_or((Duration::ZERO, 0));
    tokio::time::sleep(options.settle).await;
    let gw_after = sample(api).await;

    let t0 = Instant::now();
    let s0 = fleet.stats().snapshot();
    stop.await;
    let secs = t0.elapsed().as_secs_f64();
    let s1 = fleet.stats().snapshot();
    let gw_end = sample(api).await;
    status.finish();
    let stats = fleet.stats().clone();
    fleet.stop(Duration::from_secs(3)).await;

    let per_device = |a: f64, b: f64| (connected > 0).then(|| (b - a) / connected as f64);
    let gw_rss_before = gw_before.as_ref().and_then(|g| g.rss);
    let gw_rss_after = gw_after.as_ref().and_then(|g| g.rss);
    let (received, proposals) = match (&gw_before, &gw_end) {
        (Some(a), Some(b)) => (
            Some(b.reports_received - a.reports_received),
            Some(b.report_proposals - a.report_proposals),
        ),
        _ => (None, None),
    };
    Ok(RunReport {
        protocol,
        gateways,
        devices: devices.len(),
        connected,
        connect_secs: window.as_secs_f64(),
        connect_rate: per_sec(connected, window.as_secs_f64()),
        connect_latency: stats.connect_latency(),
        sim_rss_before: sim_before,
        sim_rss_after: sim_after,
        sim_bytes_per_device: sim_before
            .zip(sim_after)
            .and_then(|(a, b)| per_device(a as f64, b as f64)),
        gateway_rss_before: gw_rss_before,
        gateway_rss_after: gw_rss_after,
        gateway_bytes_per_device: gw_rss_before
            .zip(gw_rss_after)
            .and_then(|(a, b)| per_device(a, b)),
        gateway_idle_after_secs: idle.map(|d| d.as_secs_f64()),
        gateway_connect_cpu_secs: gw_before
            .as_ref()
            .and_then(|g| g.cpu)
            .zip(gw_idle.as_ref().and_then(|g| g.cpu))
            .map(|(a, b)| b - a),
        duration_secs: secs,
        reports_sent_per_sec: per_sec(s1.reports_sent.saturating_sub(s0.reports_sent), secs),
        reports_acked_per_sec: per_sec(s1.reports_acked.saturating_sub(s0.reports_acked), secs),
        gateway_reports_received: received,
        gateway_report_proposals: proposals,
        coalescing_ratio: received
            .zip(proposals)
            .and_then(|(r, p)| (p > 0.0).then(|| r / p)),
        fleet: stats.snapshot(),
    })
}
