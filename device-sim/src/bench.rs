//! `device-sim bench`: operator-side load. Commands are issued over REST at
//! a fixed rate to devices of an in-process fleet, and each is followed to
//! its result.
//!
//! **Open loop.** Command `i` has an intended send time `start + i / rate`.
//! The issuer sleeps until then and sends; if it is late (the machine or
//! the gateway is slow) it sends at once. At most `concurrency` requests are
//! outstanding: a command that finds no free slot waits for one. Every
//! latency is measured **from the intended time**, so time spent waiting
//! behind a slow server shows as latency rather than as a lower offered
//! rate (no coordinated omission). Commands that could still not be sent
//! `send_grace` (default one second) after the run's end are not sent and
//! count as `backlog` errors: the offered load the gateway could not take.
//!
//! **Three latencies per command**, all from the intended time:
//! - `rest accepted`: the `POST /v1/devices/{id}/commands` response (201,
//!   i.e. committed by the group);
//! - `device received`: the simulated device got the command over MQTT
//!   (same process, so the same clock);
//! - `result committed`: the `command.result` event arrived on the
//!   gateway's event stream (`GET /v1/events`, Server-Sent Events). One
//!   stream carries every command's outcome, so this costs one connection
//!   instead of one long-poll (`?wait=`) per command holding a slot. The
//!   event is sent after the gateway applied the committed result, which
//!   is when a `?wait` would answer too. With several gateways the stream
//!   is read from the one requests go to first (the leader in
//!   `--api-mode leader`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::fleet::CommandSeen;
use crate::rest::Api;
use crate::sse::SseReader;
use crate::stats::{Latency, LatencySummary, per_sec};

/// Where requests go with several gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiMode {
    /// Round-robin over every `--api` address (followers forward writes).
    Spread,
    /// Only to the gateway that leads when the run starts.
    Leader,
}

/// A benchmark's settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Commands per second offered.
    pub rate: f64,
    /// How long to offer them.
    pub duration: Duration,
    /// Requests outstanding at most.
    pub concurrency: usize,
    /// Where requests go.
    pub api_mode: ApiMode,
    /// How long to wait for outstanding results after the last send.
    pub drain: Duration,
    /// How late after the end of the run a command may still be sent;
    /// later ones count as `backlog`.
    pub send_grace: Duration,
    /// Command name.
    pub command_name: String,
    /// Command time to live (the gateway's default if `None`).
    pub ttl_ms: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
}

/// The intended send time of command `i` at `rate` per second.
pub fn intended_time(start: Instant, i: u64, rate: f64) -> Instant {
    start + Duration::from_secs_f64(i as f64 / rate)
}

/// How many commands a run of `duration` at `rate` offers: those whose
/// intended time falls before the end.
pub fn planned_commands(rate: f64, duration: Duration) -> u64 {
    if !(rate > 0.0 && rate.is_finite()) {
        return 0;
    }
    (rate * duration.as_secs_f64()).ceil() as u64
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

#[derive(Debug, Default)]
struct Entry {
    intended: Option<Instant>,
    received: Option<Instant>,
    committed: Option<(Instant, Outcome)>,
}

#[derive(Debug, Default)]
struct Book {
    entries: HashMap<String, Entry>,
    outstanding: u64,
    sent: u64,
    accepted: u64,
    completed: u64,
    succeeded: u64,
    failed: u64,
    expired: u64,
    canceled: u64,
    rest: Latency,
    received: Latency,
    committed: Latency,
    errors: BTreeMap<String, u64>,
    last_completion: Option<Instant>,
}

/// Per-command timestamps, filled in whatever order they arrive (the event
/// stream may report a result before the POST's response is read).
#[derive(Debug, Default)]
struct Tracker {
    book: Mutex<Book>,
    settled: Notify,
}

impl Tracker {
    fn with<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        let mut g = match self.book.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut g)
    }

    fn sent(&self) {
        self.with(|b| b.sent += 1);
    }

    fn error(&self, kind: &str) {
        self.with(|b| *b.errors.entry(kind.to_string()).or_default() += 1);
    }

    fn accepted(&self, cid: String, intended: Instant, at: Instant) {
        self.with(|b| {
            b.accepted += 1;
            b.outstanding += 1;
            b.rest.record(at.saturating_duration_since(intended));
            b.entries.entry(cid.clone()).or_default().intended = Some(intended);
            self.settle(b, &cid);
        });
    }

    fn received(&self, cid: String, at: Instant) {
        self.with(|b| {
            let e = b.entries.entry(cid.clone()).or_default();
            e.received.get_or_insert(at);
            self.settle(b, &cid);
        });
    }

    fn committed(&self, cid: String, at: Instant, outcome: Outcome) {
        self.with(|b| {
            let e = b.entries.entry(cid.clone()).or_default();
            e.committed.get_or_insert((at, outcome));
            self.settle(b, &cid);
        });
    }

    /// Finishes `cid` if everything about it is known.
    fn settle(&self, b: &mut Book, cid: &str) {
        let Some(e) = b.entries.get(cid) else {
            return;
        };
        let (Some(intended), Some((at, outcome))) = (e.intended, e.committed) else {
            return;
        };
        let answered = matches!(outcome, Outcome::Succeeded | Outcome::Failed);
        if answered && e.received.is_none() {
            return;
        }
        let received = e.received;
        b.entries.remove(cid);
        b.outstanding = b.outstanding.saturating_sub(1);
        match outcome {
            Outcome::Succeeded => b.succeeded += 1,
            Outcome::Failed => b.failed += 1,
            Outcome::Expired => {
                b.expired += 1;
                *b.errors.entry("expired".into()).or_default() += 1;
            }
            Outcome::Canceled => {
                b.canceled += 1;
                *b.errors.entry("canceled".into()).or_default() += 1;
            }
        }
        if answered {
            b.completed += 1;
            if let Some(r) = received {
                b.received.record(r.saturating_duration_since(intended));
            }
            b.committed.record(at.saturating_duration_since(intended));
            b.last_completion = Some(at);
        }
        if b.outstanding == 0 {
            self.settled.notify_waiters();
        }
    }

    /// Waits until no accepted command is outstanding, or `deadline`.
    async fn drained(&self, deadline: Instant) {
        loop {
            let n = self.settled.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.with(|b| b.outstanding) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return;
            }
        }
    }

    /// Counts what never finished as errors.
    fn close(&self) {
        self.with(|b| {
            let mut not_delivered = 0;
            let mut no_result = 0;
            for e in b.entries.values() {
                if e.intended.is_none() || (e.committed.is_some() && e.received.is_some()) {
                    continue;
                }
                if e.received.is_none() {
                    not_delivered += 1;
                } else {
                    no_result += 1;
                }
            }
            if not_delivered > 0 {
                *b.errors.entry("not delivered".into()).or_default() += not_delivered;
            }
            if no_result > 0 {
                *b.errors.entry("no result".into()).or_default() += no_result;
            }
        });
    }
}

/// What a benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Commands per second offered.
    pub rate: f64,
    /// Seconds offered.
    pub duration_secs: f64,
    /// Outstanding requests allowed.
    pub concurrency: usize,
    /// Where requests went.
    pub api_mode: ApiMode,
    /// The REST addresses used.
    pub apis: Vec<String>,
    /// The gateway whose event stream timed the results.
    pub events_from: String,
    /// Devices commands were spread over.
    pub devices: usize,
    /// Commands the schedule offered.
    pub planned: u64,
    /// Requests sent.
    pub sent: u64,
    /// Requests answered 201/200.
    pub accepted: u64,
    /// Commands with a result seen.
    pub completed: u64,
    /// Results `succeeded`.
    pub succeeded: u64,
    /// Results `failed` (by the device: not an error of the system).
    pub failed: u64,
    /// Commands that expired first.
    pub expired: u64,
    /// Commands canceled by someone else.
    pub canceled: u64,
    /// Accepted requests per second of the run.
    pub accepted_per_sec: f64,
    /// Results per second, from the start to the last result.
    pub completed_per_sec: f64,
    /// POST answered, from the intended time.
    pub rest_accepted: LatencySummary,
    /// Device got it over MQTT, from the intended time.
    pub device_received: LatencySummary,
    /// Result committed (event stream), from the intended time.
    pub result_committed: LatencySummary,
    /// Errors by kind: `http <status>`, `timeout`, `connect`, `transport`,
    /// `backlog`, `expired`, `canceled`, `not delivered`, `no result`,
    /// `event stream`.
    pub errors: BTreeMap<String, u64>,
    /// The simulated fleet's counters at the end (filled by the caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetSnapshot>,
}

impl BenchReport {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let w = 18;
        s.push_str(&format!(
            "offered          {:.1} commands/s for {:.1} s ({} planned, {} devices, concurrency {}, {:?} over {})\n",
            self.rate,
            self.duration_secs,
            self.planned,
            self.devices,
            self.concurrency,
            self.api_mode,
            self.apis.join(",")
        ));
        s.push_str(&format!(
            "requests         sent {}, accepted {} ({:.1}/s)\n",
            self.sent, self.accepted, self.accepted_per_sec
        ));
        s.push_str(&format!(
            "results          {} ({:.1}/s): succeeded {}, failed {}, expired {}, canceled {} (events from {})\n",
            self.completed,
            self.completed_per_sec,
            self.succeeded,
            self.failed,
            self.expired,
            self.canceled,
            self.events_from
        ));
        s.push_str(&LatencySummary::header(w));
        s.push('\n');
        for (label, l) in [
            ("rest accepted", &self.rest_accepted),
            ("device received", &self.device_received),
            ("result committed", &self.result_committed),
        ] {
            s.push_str(&l.row(label, w));
            s.push('\n');
        }
        if self.errors.is_empty() {
            s.push_str("errors           none\n");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            s.push_str(&format!("errors           {}\n", list.join(", ")));
        }
        s
    }
}

fn outcome_of(status: Option<&str>) -> Option<Outcome> {
    match status? {
        "succeeded" => Some(Outcome::Succeeded),
        "failed" => Some(Outcome::Failed),
        "expired" => Some(Outcome::Expired),
        "canceled" => Some(Outcome::Canceled),
        _ => None,
    }
}

/// Feeds one event-stream event to the tracker.
fn on_event(tracker: &Tracker, kind: &str, data: &str, at: Instant) {
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return;
    };
    let id_of = |c: &Value| c.get("id").and_then(Value::as_str).map(str::to_string);
    match kind {
        "command.result" | "command.canceled" => {
            if let (Some(id), Some(o)) = (
                id_of(&v),
                outcome_of(v.get("status").and_then(Value::as_str)),
            ) {
                tracker.committed(id, at, o);
            }
        }
        "command.expired" => {
            for c in v
                .get("commands")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(id) = id_of(c) {
                    tracker.committed(id, at, Outcome::Expired);
                }
            }
        }
        _ => {}
    }
}

/// Follows the event stream of gateway `base` until `stop`, resuming from
/// the last event id (on the next gateway) if it breaks. `ready` is told
/// once the first stream is open (or could not be).
async fn follow_events(
    api: Api,
    base: usize,
    tracker: Arc<Tracker>,
    ready: oneshot::Sender<Result<()>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ready = Some(ready);
    let mut last: Option<u64> = None;
    let mut target = base;
    loop {
        let opened = tokio::select! {
            r = api.events(target, last) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let res = match opened {
            Ok(r) => r,
            Err(e) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracker.error("event stream");
                target += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        if last.is_none() {
            last = res
                .headers()
                .get("entente-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok());
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(Ok(()));
        }
        let mut reader = SseReader::new(res);
        loop {
            let next = tokio::select! {
                n = reader.next() => n,
                _ = stop.wait_for(|s| *s) => return,
            };
            match next {
                Ok(Some(ev)) => {
                    if let Some(id) = ev.id.as_deref().and_then(|s| s.parse().ok()) {
                        last = Some(id);
                    }
                    on_event(&tracker, &ev.event, &ev.data, Instant::now());
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fn progress_bar(cfg: &BenchConfig, planned: u64) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(planned);
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} sent  {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs a benchmark against `api`, spreading commands round-robin over
/// `devices` (ids of a running fleet whose observer feeds `seen`).
pub async fn run(
    cfg: &BenchConfig,
    api: &Api,
    devices: &[String],
    mut seen: mpsc::UnboundedReceiver<CommandSeen>,
) -> Result<BenchReport> {
    if devices.is_empty() {
        bail!("the benchmark needs at least one device");
    }
    if !(cfg.rate > 0.0 && cfg.rate.is_finite()) {
        bail!("--rate must be a positive number of commands per second");
    }
    let targets: Vec<usize> = match cfg.api_mode {
        ApiMode::Spread => (0..api.bases().len()).collect(),
        ApiMode::Leader => vec![
            api.leader()
                .await?
                .context("no gateway in --api says it is the leader")?,
        ],
    };
    let tracker = Arc::new(Tracker::default());
    let (stop_tx, stop) = watch::channel(false);
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(follow_events(
        api.clone(),
        targets[0],
        tracker.clone(),
        ready_tx,
        stop.clone(),
    ));
    ready_rx
        .await
        .context("the event stream task ended")?
        .context("opening the event stream")?;
    let t = tracker.clone();
    let observer = tokio::spawn(async move {
        while let Some(s) = seen.recv().await {
            t.received(s.cid, s.at);
        }
    });

    let planned = planned_commands(cfg.rate, cfg.duration);
    let bar = progress_bar(cfg, planned);
    let t = tracker.clone();
    let ticker_bar = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let msg = t.with(|b| {
                format!(
                    "accepted {}  done {}  outstanding {}  errors {}",
                    b.accepted,
                    b.completed,
                    b.outstanding,
                    b.errors.values().sum::<u64>()
                )
            });
            ticker_bar.set_message(msg);
        }
    });

    let gate = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let start = Instant::now();
    let end = start + cfg.duration;
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..planned {
        let intended = intended_time(start, i, cfg.rate);
        tokio::time::sleep_until(intended).await;
        let permit = if Instant::now() > end + cfg.send_grace {
            None
        } else {
            tokio::time::timeout_at(end + cfg.send_grace, gate.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok)
        };
        let Some(permit) = permit else {
            let backlog = planned - i;
            tracker.with(|b| *b.errors.entry("backlog".into()).or_default() += backlog);
            break;
        };
        let device = &devices[(i % devices.len() as u64) as usize];
        let base = targets[(i % targets.len() as u64) as usize];
        let mut body = json!({ "name": cfg.command_name, "params": { "seq": i } });
        if let Some(ttl) = cfg.ttl_ms {
            body["ttl_ms"] = json!(ttl);
        }
        let (api, device, t) = (api.clone(), device.clone(), tracker.clone());
        tracker.sent();
        requests.spawn(async move {
            let r = api.issue_command(base, &device, &body).await;
            let at = Instant::now();
            drop(permit);
            match r {
                Ok(cid) => t.accepted(cid, intended, at),
                Err(e) => t.error(&e.to_string()),
            }
        });
        bar.inc(1);
        // Reap finished request tasks as we go.
        while requests.try_join_next().is_some() {}
    }
    let offered_until = Instant::now();
    while requests.join_next().await.is_some() {}
    tracker.drained(Instant::now() + cfg.drain).await;
    tracker.close();
    let _ = stop_tx.send(true);
    ticker.abort();
    observer.abort();
    bar.finish_and_clear();

    let run_secs = offered_until
        .max(end)
        .saturating_duration_since(start)
        .as_secs_f64();
    Ok(tracker.with(|b| BenchReport {
        rate: cfg.rate,
        duration_secs: cfg.duration.as_secs_f64(),
        concurrency: cfg.concurrency,
        api_mode: cfg.api_mode,
        apis: targets.iter().map(|&i| api.bases()[i].clone()).collect(),
        events_from: api.bases()[targets[0]].clone(),
        devices: devices.len(),
        planned,
        sent: b.sent,
        accepted: b.accepted,
        completed: b.completed,
        succeeded: b.succeeded,
        failed: b.failed,
        expired: b.expired,
        canceled: b.canceled,
        accepted_per_sec: per_sec(b.accepted, run_secs),
        completed_per_sec: per_sec(
            b.completed,
            b.last_completion
                .map_or(0.0, |l| l.saturating_duration_since(start).as_secs_f64()),
        ),
        rest_accepted: b.rest.summary(),
        device_received: b.received.summary(),
        result_committed: b.committed.summary(),
        errors: b.errors.clone(),
        fleet: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_fixed_by_rate_and_does_not_drift() {
        let t0 = Instant::now();
        assert_eq!(intended_time(t0, 0, 200.0), t0);
        assert_eq!(intended_time(t0, 1, 200.0), t0 + Duration::from_millis(5));
        // The millionth command is exactly where the rate says, not the sum
        // of a million rounded intervals.
        let far = intended_time(t0, 1_000_000, 3.0);
        let want = Duration::from_secs_f64(1_000_000.0 / 3.0);
        let got = far - t0;
        assert!(got.abs_diff(want) < Duration::from_micros(1), "{got:?}");
        assert_eq!(planned_commands(200.0, Duration::from_secs(10)), 2000);
        assert_eq!(planned_commands(3.0, Duration::from_millis(500)), 2);
        assert_eq!(planned_commands(0.0, Duration::from_secs(1)), 0);
        assert_eq!(planned_commands(f64::NAN, Duration::from_secs(1)), 0);
    }

    #[test]
    fn the_tracker_settles_in_any_order_and_measures_from_the_intended_time() {
        let t = Tracker::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Result event and device first, the POST's answer last.
        t.committed("a".into(), t0 + ms(30), Outcome::Succeeded);
        t.received("a".into(), t0 + ms(20));
        assert_eq!(t.with(|b| b.completed), 0);
        t.accepted("a".into(), t0, t0 + ms(10));
        // In order, failed by the device.
        t.accepted("b".into(), t0, t0 + ms(5));
        t.received("b".into(), t0 + ms(6));
        t.committed("b".into(), t0 + ms(7), Outcome::Failed);
        // Expired without reaching the device.
        t.accepted("c".into(), t0, t0 + ms(5));
        on_event(
            &t,
            "command.expired",
            r#"{"commands":[{"id":"c","status":"expired"}]}"#,
            t0 + ms(60_000),
        );
        // Accepted, never answered.
        t.accepted("d".into(), t0, t0 + ms(5));
        t.received("d".into(), t0 + ms(6));
        t.close();
        t.with(|b| {
            assert_eq!((b.accepted, b.completed, b.outstanding), (4, 2, 1));
            assert_eq!((b.succeeded, b.failed, b.expired), (1, 1, 1));
            assert_eq!(b.errors.get("expired"), Some(&1));
            assert_eq!(b.errors.get("no result"), Some(&1));
            let c = b.committed.summary();
            assert!((c.max - 30.0).abs() < 0.1, "{c:?}");
            let r = b.rest.summary();
            assert!((r.max - 10.0).abs() < 0.1, "{r:?}");
        });
    }

    #[test]
    fn result_events_are_understood() {
        let t = Tracker::default();
        let t0 = Instant::now();
        t.accepted("x".into(), t0, t0);
        t.received("x".into(), t0);
        on_event(&t, "command.sent", r#"{"id":"x","status":"sent"}"#, t0);
        on_event(&t, "command.result", "not json", t0);
        assert_eq!(t.with(|b| b.completed), 0);
        on_event(
            &t,
            "command.result",
            r#"{"id":"x","status":"succeeded"}"#,
            t0,
        );
        assert_eq!(t.with(|b| (b.completed, b.outstanding)), (1, 0));
    }
}
