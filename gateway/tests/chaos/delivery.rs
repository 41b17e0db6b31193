//! The delivery check: every command whose device held one connection to a
//! live gateway for the [`WINDOW`] before the command's TTL ended reaches a
//! terminal state other than `expired` (`succeeded`, `failed` or
//! `canceled`; never `expired`, never still open).
//!
//! # Which commands qualify
//!
//! Only what the harness knows is used:
//! - the devices' connections (`devices.rs`): from the CONNACK until the
//!   device saw the connection end, and to which gateway;
//! - the fault schedule (`faults.rs`): each fault from just before it was
//!   injected until the heal after it completed (a restarted gateway up
//!   again), with the gateways it affects;
//! - each command's `issued_at` and `expires_at` from the final database
//!   (the gateways' clock, the same machine's; converted with [`Clock`]).
//!
//! A command qualifies when, with `E` its expiry and `W` the window:
//! - it existed for the whole window: issued at or before `E − W` (its TTL
//!   is at least `W`);
//! - its device held one connection to one gateway `G` from at or before
//!   `E − W` until at or after `E`;
//! - no fault affecting `G` overlaps `[E − W, E]`. A gateway is live when
//!   no fault affects it: faults on other gateways (a killed leader, a
//!   paused follower, the minority side of a split without `G`) may run in
//!   the window — one fault at a time leaves `G` with a majority, and the
//!   gateway must cope with an election. Faults before the window do not
//!   matter: `G` catches up (from the log or a snapshot) well within it.
//!
//! # The window
//!
//! `W` = 8 s covers what the gateway needs to deliver a command that is
//! waiting, whatever happened to it before the window: its sweep runs every
//! 1 s and delivers again what has not changed for 3 s (a command that last
//! changed before the window is already stale), CommandSent and the device's
//! `accepted` and `result` are proposals retried through an election (the
//! chaos gateways' write timeout is 1.5 s; an election with 10 ms ticks
//! takes well under 1 s, the retries back off to at most 2 s), the device
//! answers within milliseconds, and ~1 s is left for the leader's expiry
//! loop (every 250 ms), the device noticing a connection's end late, and a
//! busy machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::SqliteConnectOptions;

use super::check::Final;
use super::devices::{Connection, Delivery};
use super::faults::FaultSpan;

/// How long before a command's expiry its device must have been connected
/// to a live gateway for the command to qualify (see the module docs).
pub const WINDOW: Duration = Duration::from_secs(8);

/// The run's clock: seconds since the run started, also for the gateways'
/// time stamps (milliseconds since the epoch).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The wall clock when the run started, in ms since the epoch.
    pub start_wall_ms: u64,
}

impl Clock {
    /// Now, on the wall clock, in ms since the epoch.
    pub fn wall_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// A gateway's time stamp in seconds since the run started.
    pub fn secs(&self, ms: u64) -> f64 {
        (ms as f64 - self.start_wall_ms as f64) / 1000.0
    }
}

/// A qualifying command that did not reach `succeeded`, `failed` or
/// `canceled`.
#[derive(Debug, Clone)]
pub struct Violation {
    pub cid: String,
    pub device: String,
    pub tag: Option<String>,
    pub status: String,
    /// Issued and expiry time, seconds since the run started.
    pub issued: f64,
    pub expires: f64,
    /// The connection that made it qualify.
    pub conn: Connection,
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Commands in the final state for devices that connect.
    pub checked: usize,
    /// Of those, the ones that qualified.
    pub qualified: usize,
    /// Qualifying commands by final status.
    pub by_status: BTreeMap<String, usize>,
    /// Commands checked that expired without qualifying (their devices were
    /// not connected to a live gateway for the window): not violations.
    pub expired_unqualified: usize,
    pub violations: Vec<Violation>,
}

/// The connection of `device` that covers `[from, to]` on a gateway no
/// fault affected in that time, if any.
fn live_connection<'a>(
    conns: &'a [Connection],
    spans: &[FaultSpan],
    device: &str,
    from: f64,
    to: f64,
) -> Option<&'a Connection> {
    conns.iter().find(|c| {
        c.device == device
            && c.from <= from
            && c.to.unwrap_or(f64::INFINITY) >= to
            && !spans.iter().any(|s| s.affects(c.gateway, from, to))
    })
}

/// Checks every command of a device in `devices` (those that connect).
pub fn check(
    fin: &Final,
    devices: &[String],
    conns: &[Connection],
    spans: &[FaultSpan],
    clock: Clock,
) -> Report {
    let window = WINDOW.as_secs_f64();
    let mut r = Report::default();
    for c in fin.commands.iter().filter(|c| devices.contains(&c.device)) {
        r.checked += 1;
        let issued = clock.secs(c.issued_at);
        let expires = clock.secs(c.expires_at);
        let start = expires - window;
        let conn = (issued <= start)
            .then(|| live_connection(conns, spans, &c.device, start, expires))
            .flatten();
        let Some(conn) = conn else {
            if c.status == "expired" {
                r.expired_unqualified += 1;
            }
            continue;
        };
        r.qualified += 1;
        *r.by_status.entry(c.status.clone()).or_insert(0) += 1;
        if !matches!(c.status.as_str(), "succeeded" | "failed" | "canceled") {
            r.violations.push(Violation {
                cid: c.id.clone(),
                device: c.device.clone(),
                tag: c.tag.clone(),
                status: c.status.clone(),
                issued,
                expires,
                conn: conn.clone(),
            });
        }
    }
    r
}

/// One row of a gateway's `events` table.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub index: u64,
    pub kind: String,
    pub data: Value,
}

/// The events of a stopped gateway's state database that concern commands
/// and presence, in index order.
pub async fn read_events(path: &Path) -> Result<Vec<EventRow>, String> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .read_only(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let rows = sqlx::query(
        "SELECT idx, kind, data FROM events WHERE kind LIKE 'command.%' \
         OR kind IN ('device.presence', 'gateway.sessions_lost') ORDER BY idx",
    )
    .fetch_all(&pool)
    .await
    .map_err(|e| format!("events of {}: {e}", path.display()));
    pool.close().await;
    Ok(rows?
        .iter()
        .map(|r| EventRow {
            index: r.get::<i64, _>(0) as u64,
            kind: r.get(1),
            data: serde_json::from_str(r.get::<&str, _>(2)).unwrap_or(Value::Null),
        })
        .collect())
}

/// The command `cid` as an event carries it (`command.expired` carries
/// a list).
fn event_command<'a>(e: &'a EventRow, cid: &str) -> Option<&'a Value> {
    if e.kind == "command.expired" {
        e.data["commands"]
            .as_array()?
            .iter()
            .find(|c| c["id"] == cid)
    } else if e.kind.starts_with("command.") && e.data["id"] == cid {
        Some(&e.data)
    } else {
        None
    }
}

/// Whether a presence event concerns `device`.
fn event_presence(e: &EventRow, device: &str) -> bool {
    match e.kind.as_str() {
        "device.presence" => e.data["id"] == device,
        "gateway.sessions_lost" => e.data["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == device)),
        _ => false,
    }
}

fn at(clock: Clock, v: &Value) -> String {
    v["updated_at"].as_u64().map_or_else(
        || "        -".into(),
        |ms| format!("{:>8.3}s", clock.secs(ms)),
    )
}

fn until(to: Option<f64>) -> String {
    to.map_or_else(|| "open".into(), |t| format!("{t:.3}s"))
}

/// A violation's report: the command's events (index, kind, time, status),
/// the device's presence events while it lived, what the device received,
/// the device's connections and the faults around it.
pub fn describe(
    v: &Violation,
    events: &[EventRow],
    deliveries: &[Delivery],
    conns: &[Connection],
    spans: &[FaultSpan],
    clock: Clock,
) -> String {
    let window = WINDOW.as_secs_f64();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "command {} ({}) of {} is {} although {} was connected to gw{} from {:.3}s to {} \
         and no fault affected gw{} in the {window} s before it expired \
         (issued {:.3}s, expires {:.3}s, window {:.3}s–{:.3}s):",
        v.cid,
        v.tag.as_deref().unwrap_or("?"),
        v.device,
        v.status,
        v.device,
        v.conn.gateway,
        v.conn.from,
        until(v.conn.to),
        v.conn.gateway,
        v.issued,
        v.expires,
        v.expires - window,
        v.expires,
    );
    let mine: Vec<&EventRow> = events
        .iter()
        .filter(|e| event_command(e, &v.cid).is_some())
        .collect();
    let _ = writeln!(out, "  events of the command (gw1's events table):");
    if mine.is_empty() {
        let _ = writeln!(out, "    none retained");
    }
    for e in &mine {
        let c = event_command(e, &v.cid).unwrap_or(&Value::Null);
        let _ = writeln!(
            out,
            "    #{:<7} {} {:<16} → {}",
            e.index,
            at(clock, c),
            e.kind,
            c["status"].as_str().unwrap_or("?")
        );
    }
    // The device's presence from the last change before the command to its
    // last event.
    let first = mine.first().map_or(0, |e| e.index);
    let last = mine.last().map_or(u64::MAX, |e| e.index);
    let presence: Vec<&EventRow> = events
        .iter()
        .filter(|e| event_presence(e, &v.device))
        .collect();
    let before = presence.iter().rposition(|e| e.index < first);
    let _ = writeln!(out, "  presence of {} meanwhile:", v.device);
    for e in presence
        .iter()
        .enumerate()
        .filter(|(i, e)| Some(*i) == before || (e.index > first && e.index <= last))
        .map(|(_, e)| e)
    {
        let what = if e.kind == "device.presence" {
            match (e.data["online"].as_bool(), e.data["gateway"].as_u64()) {
                (Some(true), Some(g)) => format!("online on gw{g}"),
                _ => "offline".into(),
            }
        } else {
            format!("gw{}'s sessions declared lost", e.data["gateway"])
        };
        let _ = writeln!(
            out,
            "    #{:<7} {} {:<21} {what}",
            e.index,
            at(clock, &e.data),
            e.kind
        );
    }
    let (from, to) = (v.issued - 10.0, v.expires + 5.0);
    let got: Vec<String> = deliveries
        .iter()
        .filter(|d| d.cid == v.cid)
        .map(|d| format!("{:.3}s via gw{}", d.at, d.gateway))
        .collect();
    let _ = writeln!(out, "  delivered to the device: {got:?}");
    let _ = writeln!(out, "  connections of {} around it:", v.device);
    for c in conns
        .iter()
        .filter(|c| c.device == v.device && c.from <= to && c.to.unwrap_or(f64::INFINITY) >= from)
    {
        let _ = writeln!(
            out,
            "    gw{} {:>9.3}s – {}",
            c.gateway,
            c.from,
            until(c.to)
        );
    }
    let _ = writeln!(out, "  faults around it:");
    for s in spans.iter().filter(|s| s.from <= to && s.to >= from) {
        let _ = writeln!(
            out,
            "    {:>9.3}s – {:>9.3}s {} (affects {:?})",
            s.from, s.to, s.what, s.gateways
        );
    }
    out
}

/// The rule on a made-up run (no processes): which commands qualify, and
/// that a qualifying one left to expire is reported with its history.
#[test]
fn only_commands_of_devices_on_live_gateways_qualify() {
    use super::check::FinalCommand;

    let clock = Clock {
        start_wall_ms: 1_000_000,
    };
    // Times in seconds since the run started.
    let ms = |t: f64| (1_000_000.0 + t * 1000.0) as u64;
    let cmd = |id: &str, device: &str, status: &str, issued: f64, expires: f64| FinalCommand {
        id: id.into(),
        device: device.into(),
        status: status.into(),
        tag: Some(format!("op-{id}")),
        key: None,
        output: None,
        issued_at: ms(issued),
        expires_at: ms(expires),
    };
    let conn = |device: &str, gateway: u64, from: f64, to: Option<f64>| Connection {
        device: device.into(),
        gateway,
        from,
        to,
    };
    let span = |what: &str, from: f64, to: f64, gateways: Vec<u64>| FaultSpan {
        what: what.into(),
        from,
        to,
        gateways,
    };
    let fin = Final {
        commands: vec![
            // d1 on gw1 from 5 s on, nothing affects gw1: qualifies.
            cmd("c1", "d1", "expired", 0.0, 20.0),
            cmd("c2", "d1", "succeeded", 0.0, 20.0),
            cmd("c3", "d1", "sent", 0.0, 20.0),
            // Canceled counts as finished.
            cmd("c4", "d1", "canceled", 0.0, 20.0),
            // A TTL shorter than the window: never qualifies.
            cmd("c5", "d1", "expired", 14.0, 20.0),
            // d2's connection ended 1 s before the expiry.
            cmd("c6", "d2", "expired", 0.0, 20.0),
            // d3 on gw3, affected inside the window / only before it.
            cmd("c7", "d3", "expired", 0.0, 20.0),
            cmd("c8", "d3", "expired", 0.0, 40.0),
            // A device that never connects is not checked.
            cmd("c9", "o1", "expired", 0.0, 20.0),
        ],
        ..Final::default()
    };
    let conns = vec![
        conn("d1", 1, 5.0, None),
        conn("d2", 2, 1.0, Some(19.0)),
        conn("d2", 2, 19.5, None),
        conn("d3", 3, 0.0, Some(50.0)),
    ];
    let spans = vec![
        span("isolate gw3", 15.0, 16.0, vec![3]),
        span("SIGKILL gw2", 21.0, 25.0, vec![2]),
    ];
    let devices = vec!["d1".to_string(), "d2".into(), "d3".into()];
    let r = check(&fin, &devices, &conns, &spans, clock);
    assert_eq!(r.checked, 8, "{r:?}");
    // c1–c4 (d1 on gw1), c8 (gw3 healed at 16 s, window 32–40 s).
    assert_eq!(r.qualified, 5, "{r:?}");
    let bad: Vec<&str> = r.violations.iter().map(|v| v.cid.as_str()).collect();
    assert_eq!(bad, ["c1", "c3", "c8"]);
    assert_eq!(r.expired_unqualified, 3, "c5, c6, c7: {r:?}");
    assert_eq!(r.violations[0].conn.gateway, 1);

    // The report names the command's events, the device's presence, its
    // connections and the faults around it.
    let ev = |index: u64, kind: &str, data: Value| EventRow {
        index,
        kind: kind.into(),
        data,
    };
    let events = vec![
        ev(
            10,
            "command.issued",
            serde_json::json!({ "id": "c1", "status": "queued", "updated_at": ms(0.0) }),
        ),
        ev(
            11,
            "device.presence",
            serde_json::json!({ "id": "d1", "online": true, "gateway": 1, "updated_at": ms(5.0) }),
        ),
        ev(
            12,
            "command.sent",
            serde_json::json!({ "id": "c2", "status": "sent", "updated_at": ms(5.5) }),
        ),
        ev(
            13,
            "command.expired",
            serde_json::json!({ "commands": [
                { "id": "c1", "status": "expired", "updated_at": ms(20.1) }
            ] }),
        ),
    ];
    let text = describe(&r.violations[0], &events, &[], &conns, &spans, clock);
    for want in [
        "command c1 (op-c1) of d1 is expired",
        "#10",
        "command.issued",
        "→ queued",
        "#13",
        "20.100s command.expired",
        "online on gw1",
        "gw1     5.000s – open",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    assert!(!text.contains("#12"), "another command's event:\n{text}");
}
