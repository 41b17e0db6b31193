//! `loadgen report`: BENCHMARKS.md and the chart's data files from a
//! results directory written by `bench/run.sh`:
//!
//! - `machine.json` (`loadgen machine`), `samples.jsonl` (`loadgen sample`),
//!   `meta.txt` (`key=value` lines: versions, settings, the command);
//! - `*.json` with `"kind": "load"` or `"failover"` (this program);
//! - `ingest-<broker>-c<N>-i<inflight>.json` (`device-sim ingest --json`);
//! - `profile-<system>.txt` (a `perf report` excerpt), `phases.txt`
//!   (`<unix time> <phase>` lines, to attribute the CPU samples).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;

use crate::failover::FailoverResult;
use crate::load::LoadResult;
use crate::machine::Machine;
use crate::sampler::Sample;
use crate::systems::{Op, Target};

/// `loadgen report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The results directory.
    #[arg(long)]
    pub results: PathBuf,
    /// The Markdown file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the chart's data files.
    #[arg(long)]
    pub chart_data: PathBuf,
    /// The chart, as the Markdown file should link it (relative to it).
    #[arg(long, default_value = "chart.png")]
    pub chart_link: String,
    /// The PNG the generated gnuplot script (`<chart-data>/chart.gp`) draws.
    #[arg(long, default_value = "chart.png")]
    pub chart_out: PathBuf,
    /// A hand-written closing note to include, if the file exists.
    #[arg(long)]
    pub notes: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Results {
    machine: Option<Machine>,
    meta: BTreeMap<String, String>,
    loads: Vec<LoadResult>,
    failovers: Vec<FailoverResult>,
    /// (broker, clients, in flight per client) → device-sim's report.
    ingest: BTreeMap<(String, u64, u64), Value>,
    profiles: BTreeMap<String, String>,
    samples: Vec<Sample>,
    phases: Vec<(u64, String)>,
    /// `busy% waited-secs` before each pair of measurements.
    waits: Vec<(f64, f64)>,
}

fn read(dir: &Path) -> Result<Results> {
    let mut r = Results::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let text = || std::fs::read_to_string(&p).unwrap_or_default();
        if name == "machine.json" {
            r.machine = serde_json::from_str(&text()).ok();
        } else if name == "meta.txt" {
            for line in text().lines() {
                if let Some((k, v)) = line.split_once('=') {
                    r.meta.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
        } else if name == "samples.jsonl" {
            r.samples = text()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        } else if name == "waits.txt" {
            r.waits = text()
                .lines()
                .filter_map(|l| {
                    let (b, w) = l.split_once(' ')?;
                    Some((b.parse().ok()?, w.parse().ok()?))
                })
                .collect();
        } else if name == "phases.txt" {
            r.phases = text()
                .lines()
                .filter_map(|l| {
                    let (t, p) = l.split_once(' ')?;
                    Some((t.parse().ok()?, p.to_string()))
                })
                .collect();
        } else if let Some(rest) = name.strip_prefix("ingest-")
            && let Some(rest) = rest.strip_suffix(".json")
            && let Some((rest, i)) = rest.rsplit_once("-i")
            && let Some((broker, c)) = rest.rsplit_once("-c")
            && let (Ok(c), Ok(i)) = (c.parse::<u64>(), i.parse::<u64>())
        {
            if let Ok(v) = serde_json::from_str::<Value>(&text()) {
                r.ingest.insert((broker.to_string(), c, i), v);
            }
        } else if let Some(sys) = name
            .strip_prefix("profile-")
            .and_then(|s| s.strip_suffix(".txt"))
        {
            r.profiles.insert(sys.to_string(), text());
        } else if name.ends_with(".json") {
            let Ok(v) = serde_json::from_str::<Value>(&text()) else {
                continue;
            };
            match v["kind"].as_str() {
                Some("load") => {
                    if let Ok(l) = serde_json::from_value(v) {
                        r.loads.push(l);
                    }
                }
                Some("failover") => {
                    if let Ok(f) = serde_json::from_value(v) {
                        r.failovers.push(f);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(r)
}

/// The lower of the two systems' best closed-loop write throughputs.
pub fn peak_write(dir: &Path) -> Result<f64> {
    let r = read(dir)?;
    let best = |t: Target| {
        r.loads
            .iter()
            .filter(|l| l.system == t && l.op == Op::Write && l.mode == "closed")
            .map(|l| l.throughput)
            .fold(0.0, f64::max)
    };
    Ok(best(Target::Etcd).min(best(Target::Entente)))
}

fn closed(r: &Results, t: Target, op: Op, clients: usize) -> Option<&LoadResult> {
    r.loads
        .iter()
        .find(|l| l.system == t && l.op == op && l.mode == "closed" && l.clients == clients)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{:.0}", v);
    // Thousands separators.
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn errors(l: &LoadResult) -> u64 {
    l.errors.values().sum::<u64>() + l.unsent
}

fn concurrencies(r: &Results, op: Op) -> Vec<usize> {
    let mut c: Vec<usize> = r
        .loads
        .iter()
        .filter(|l| l.op == op && l.mode == "closed")
        .map(|l| l.clients)
        .collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// The side-by-side table of a closed-loop operation.
fn closed_table(r: &Results, op: Op, out: &mut String) {
    let _ = writeln!(
        out,
        "| clients | etcd ops/s | etcd p50 ms | etcd p99 ms | Entente ops/s | Entente p50 ms | Entente p99 ms | throughput Entente/etcd | p99 Entente/etcd | errors etcd / Entente |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in concurrencies(r, op) {
        let e = closed(r, Target::Etcd, op, c);
        let n = closed(r, Target::Entente, op, c);
        let cell = |l: Option<&LoadResult>, f: &dyn Fn(&LoadResult) -> String| {
            l.map_or("–".to_string(), f)
        };
        let _ = writeln!(
            out,
            "| {c} | {} | {} | {} | {} | {} | {} | **{}** | {} | {} / {} |",
            cell(e, &|l| num(l.throughput)),
            cell(e, &|l| ms(l.latency.p50)),
            cell(e, &|l| ms(l.latency.p99)),
            cell(n, &|l| num(l.throughput)),
            cell(n, &|l| ms(l.latency.p50)),
            cell(n, &|l| ms(l.latency.p99)),
            match (e, n) {
                (Some(e), Some(n)) => ratio(n.throughput, e.throughput),
                _ => "–".into(),
            },
            match (e, n) {
                (Some(e), Some(n)) => ratio(n.latency.p99, e.latency.p99),
                _ => "–".into(),
            },
            cell(e, &|l| errors(l).to_string()),
            cell(n, &|l| errors(l).to_string()),
        );
    }
}

/// Server CPU, load generator CPU and fsyncs per operation.
fn cost_table(r: &Results, op: Op, out: &mut String) {
    let _ = writeln!(
        out,
        "| clients | server CPU µs/op etcd (leader) | server CPU µs/op Entente (leader) | load generator CPU µs/op etcd / Entente | leader log fsyncs/op etcd | leader log fsyncs/op Entente |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
    let f = |v: Option<f64>, d: usize| v.map_or("–".into(), |v| format!("{v:.d$}"));
    let cpu = |l: Option<&LoadResult>| {
        let Some(l) = l else { return "–".to_string() };
        let leader = l
            .leader
            .and_then(|i| l.server_cpu_us_per_op_each.get(i))
            .map_or(String::new(), |v| format!(" ({v:.0})"));
        format!("{}{leader}", f(l.server_cpu_us_per_op, 0))
    };
    for c in concurrencies(r, op) {
        let e = closed(r, Target::Etcd, op, c);
        let n = closed(r, Target::Entente, op, c);
        let _ = writeln!(
            out,
            "| {c} | {} | {} | {} / {} | {} | {} |",
            cpu(e),
            cpu(n),
            f(e.and_then(|l| l.loadgen_cpu_us_per_op), 0),
            f(n.and_then(|l| l.loadgen_cpu_us_per_op), 0),
            f(e.and_then(|l| l.leader_fsyncs_per_op), 3),
            f(n.and_then(|l| l.leader_fsyncs_per_op), 3),
        );
    }
}

fn meta<'a>(r: &'a Results, k: &str) -> &'a str {
    r.meta.get(k).map_or("?", String::as_str)
}

/// The CPU used by other processes, overall and per phase.
fn quiet(r: &Results, out: &mut String) {
    if r.samples.is_empty() {
        let _ = writeln!(out, "No CPU samples were recorded during the run.\n");
        return;
    }
    let n = r.samples.len() as f64;
    let mean_others = r.samples.iter().map(|s| s.others).sum::<f64>() / n;
    let max_others = r.samples.iter().map(|s| s.others).fold(0.0, f64::max);
    let mean_ours = r.samples.iter().map(|s| s.ours).sum::<f64>() / n;
    let cores = r.machine.as_ref().map_or(0, |m| m.cores).max(1) as f64;
    let verdict = if max_others < 0.1 * cores {
        "quiet"
    } else if mean_others < 0.1 * cores {
        "mostly quiet, with bursts of other work"
    } else {
        "**not quiet**: other work competed for the CPUs"
    };
    let _ = writeln!(
        out,
        "During the run, work outside the benchmark (all CPU time not idle, from `/proc/stat`, \
         less the benchmark's own processes) used on average **{mean_others:.2} cores** (max \
         {max_others:.2} over a {:.0}-second sample) of the {cores:.0}; the benchmark's own \
         processes {mean_ours:.2}. The machine was {verdict}.",
        r.samples.first().map_or(5.0, |s| s.secs)
    );
    // The busiest others.
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    for s in &r.samples {
        for (name, c) in &s.top_others {
            *by_name.entry(name.clone()).or_default() += c / n;
        }
    }
    let mut top: Vec<(String, f64)> = by_name.into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = top
        .iter()
        .take(4)
        .filter(|(_, c)| *c >= 0.01)
        .map(|(n, c)| format!("`{n}` {c:.2}"))
        .collect();
    if !top.is_empty() {
        let _ = writeln!(
            out,
            "Busiest other processes visible from here (mean cores): {}.",
            top.join(", ")
        );
    }
    if !r.waits.is_empty() {
        let limit: f64 = meta(r, "quiet_wait").parse().unwrap_or(f64::MAX);
        let gave_up: Vec<&(f64, f64)> = r.waits.iter().filter(|w| w.1 >= limit).collect();
        let waited: f64 = r.waits.iter().map(|w| w.1).sum();
        let _ = writeln!(
            out,
            "Before each of the {} pairs of measurements the script waited for the CPUs to be at \
             most 25 % busy over 2 s (up to {} s): {:.0} s in all; {} time(s) it gave up and \
             measured anyway{}.",
            r.waits.len(),
            meta(r, "quiet_wait"),
            waited,
            gave_up.len(),
            if gave_up.is_empty() {
                String::new()
            } else {
                let v: Vec<String> = gave_up.iter().map(|w| format!("{:.0} %", w.0)).collect();
                format!(" (busy then: {})", v.join(", "))
            }
        );
    }
    if !r.phases.is_empty() {
        let _ = writeln!(
            out,
            "\n| phase | other work, mean cores | max |\n|---|---:|---:|"
        );
        for (i, (t0, name)) in r.phases.iter().enumerate() {
            let t1 = r.phases.get(i + 1).map_or(u64::MAX, |p| p.0);
            let v: Vec<f64> = r
                .samples
                .iter()
                .filter(|s| s.at > *t0 && s.at <= t1)
                .map(|s| s.others)
                .collect();
            if v.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "| {name} | {:.2} | {:.2} |",
                v.iter().sum::<f64>() / v.len() as f64,
                v.iter().copied().fold(0.0, f64::max)
            );
        }
    }
    let _ = writeln!(out);
}

fn ingest_table(r: &Results, out: &mut String) {
    let mut keys: Vec<(u64, u64)> = r.ingest.keys().map(|k| (k.2, k.1)).collect();
    keys.sort_unstable();
    keys.dedup();
    let _ = writeln!(
        out,
        "| in flight per client | clients | Mosquitto msg/s | Mosquitto p50 ms | Mosquitto p99 ms | Entente msg/s | Entente p50 ms | Entente p99 ms | msg/s Entente/Mosquitto | p99 Entente/Mosquitto | connected M / E | errors M / E |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let f = |v: Option<&Value>, path: &[&str]| -> Option<f64> {
        let mut x = v?;
        for p in path {
            x = &x[*p];
        }
        x.as_f64()
    };
    let errs = |v: Option<&Value>| -> String {
        v.and_then(|v| v["errors"].as_object())
            .map_or("–".into(), |o| {
                o.values()
                    .filter_map(Value::as_u64)
                    .sum::<u64>()
                    .to_string()
            })
    };
    for (i, c) in keys {
        let m = r.ingest.get(&("mosquitto".to_string(), c, i));
        let e = r.ingest.get(&("entente".to_string(), c, i));
        let thr = |v| f(v, &["acked_per_sec"]);
        let p = |v, q| f(v, &["latency", q]);
        let _ = writeln!(
            out,
            "| {i} | {c} | {} | {} | {} | {} | {} | {} | **{}** | {} | {} / {} | {} / {} |",
            thr(m).map_or("–".into(), num),
            p(m, "p50").map_or("–".into(), ms),
            p(m, "p99").map_or("–".into(), ms),
            thr(e).map_or("–".into(), num),
            p(e, "p50").map_or("–".into(), ms),
            p(e, "p99").map_or("–".into(), ms),
            match (thr(e), thr(m)) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "–".into(),
            },
            match (p(e, "p99"), p(m, "p99")) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "–".into(),
            },
            f(m, &["connected"]).map_or("–".into(), num),
            f(e, &["connected"]).map_or("–".into(), num),
            errs(m),
            errs(e),
        );
    }
    let (rec, prop) =
        r.ingest
            .iter()
            .filter(|(k, _)| k.0 == "entente")
            .fold((0.0, 0.0), |(a, b), (_, v)| {
                (
                    a + v["gateway_reports_received"].as_f64().unwrap_or(0.0),
                    b + v["gateway_report_proposals"].as_f64().unwrap_or(0.0),
                )
            });
    if prop > 0.0 {
        let _ = writeln!(
            out,
            "\nOver these runs the Entente gateways received {} reported messages and made {} Raft \
             proposals of them ({:.0} per proposal: a device's reports are coalesced into one \
             proposal in flight at a time).",
            num(rec),
            num(prop),
            rec / prop
        );
    }
}

/// The chart's data: one file per series, `clients throughput p99`, and
/// a gnuplot script drawing the series that have points.
fn chart_data(r: &Results, dir: &Path, png: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).context("chart data dir")?;
    let series = [
        ("write", Op::Write),
        ("read-linearizable", Op::ReadLinearizable),
        ("read-local", Op::ReadLocal),
    ];
    for t in [Target::Etcd, Target::Entente] {
        for (name, op) in series {
            let mut s = String::from("# clients throughput p99_ms\n");
            for c in concurrencies(r, op) {
                if let Some(l) = closed(r, t, op, c) {
                    let _ = writeln!(s, "{c} {:.1} {:.3}", l.throughput, l.latency.p99);
                }
            }
            std::fs::write(dir.join(format!("{}-{name}.dat", t.name())), s)
                .context("chart data")?;
        }
        let mut s = String::from("# offered throughput p99_ms\n");
        let mut open: Vec<&LoadResult> = r
            .loads
            .iter()
            .filter(|l| l.system == t && l.op == Op::Write && l.mode == "open")
            .collect();
        open.sort_by(|a, b| {
            a.offered_rate
                .unwrap_or(0.0)
                .total_cmp(&b.offered_rate.unwrap_or(0.0))
        });
        for l in open {
            let _ = writeln!(
                s,
                "{:.0} {:.1} {:.3}",
                l.offered_rate.unwrap_or(0.0),
                l.throughput,
                l.latency.p99
            );
        }
        std::fs::write(dir.join(format!("{}-write-open.dat", t.name())), s)
            .context("chart data")?;
    }
    std::fs::write(dir.join("chart.gp"), gnuplot(r, dir, png)).context("chart script")?;
    Ok(())
}

/// One line of a chart panel: the operation, its data file's suffix, and
/// the label's suffix.
type Series = (Op, &'static str, &'static str);

/// gnuplot string literal.
fn quoted(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "''"))
}

/// The gnuplot script: writes and reads side by side, p99 (log scale)
/// against throughput, one line per system and mode, points labelled with
/// their client count.
fn gnuplot(r: &Results, dir: &Path, png: &Path) -> String {
    let mut g = String::new();
    let _ = writeln!(g, "set terminal pngcairo size 1500,600 font ',10'");
    let _ = writeln!(g, "set output {}", quoted(png));
    let _ = writeln!(
        g,
        "set multiplot layout 1,2 title 'Throughput against p99 latency, three members on one {}-core machine (closed loop; labels: clients)'",
        r.machine.as_ref().map_or(0, |m| m.cores)
    );
    let _ = writeln!(
        g,
        "set logscale y\nset grid\nset key top left\nset xlabel 'throughput (operations/s)'\nset ylabel 'p99 latency (ms)'\nset xrange [0:*]"
    );
    let color = |t: Target| match t {
        Target::Etcd => "#1f77b4",
        Target::Entente => "#d62728",
    };
    let panels: [(&str, &[Series]); 2] = [
        ("Replicated writes", &[(Op::Write, "write", "")]),
        (
            "Reads",
            &[
                (Op::ReadLinearizable, "read-linearizable", " linearizable"),
                (Op::ReadLocal, "read-local", " local"),
            ],
        ),
    ];
    for (title, series) in panels {
        let _ = writeln!(g, "set title '{title}'");
        let mut plots = Vec::new();
        for t in [Target::Etcd, Target::Entente] {
            for (k, (op, file, label)) in series.iter().enumerate() {
                if concurrencies(r, *op)
                    .iter()
                    .all(|&c| closed(r, t, *op, c).is_none())
                {
                    continue;
                }
                let f = quoted(&dir.join(format!("{}-{file}.dat", t.name())));
                let dash = if k == 0 { 1 } else { 2 };
                plots.push(format!(
                    "{f} using 2:3 with linespoints lw 2 dt {dash} pt 7 lc rgb '{}' title '{}{label}'",
                    color(t),
                    t.name()
                ));
                plots.push(format!(
                    "{f} using 2:3:1 with labels offset char 0,0.9 tc rgb '{}' notitle",
                    color(t)
                ));
            }
            if title == "Replicated writes"
                && r.loads
                    .iter()
                    .any(|l| l.system == t && l.op == Op::Write && l.mode == "open")
            {
                let f = quoted(&dir.join(format!("{}-write-open.dat", t.name())));
                plots.push(format!(
                    "{f} using 2:3 with points pt 5 ps 1.2 lc rgb '{}' title '{} open loop'",
                    color(t),
                    t.name()
                ));
            }
        }
        if plots.is_empty() {
            let _ = writeln!(
                g,
                "unset logscale y\nset label 1 'no data' at graph 0.45,0.5\nplot [0:1][0:1] NaN notitle\nunset label 1\nset logscale y"
            );
        } else {
            let _ = writeln!(g, "plot {}", plots.join(", \\\n     "));
        }
    }
    let _ = writeln!(g, "unset multiplot");
    g
}

/// Writes the report.
pub fn write(a: &ReportArgs) -> Result<()> {
    let r = read(&a.results)?;
    chart_data(&r, &a.chart_data, &a.chart_out)?;
    let mut o = String::new();
    let quick = meta(&r, "quick") == "1";
    let _ = writeln!(o, "# Side-by-side benchmarks: Entente, etcd, Mosquitto\n");
    let _ = writeln!(
        o,
        "Written by `{}` on {} (run took {}). Every figure below comes from **this one machine**, \
         with the servers, the load generator and the MQTT clients all on it, talking over \
         loopback: they compete for the same CPUs, so the figures rank the systems on a small \
         box rather than give their capacity on dedicated hardware.\n",
        meta(&r, "command"),
        meta(&r, "date"),
        meta(&r, "elapsed"),
    );
    if quick {
        let _ = writeln!(
            o,
            "> **Quick run** (`BENCH_QUICK=1`): fewer concurrency levels, short windows and few \
             failover trials. Use it to test the script, not to compare.\n"
        );
    }

    // Machine.
    let _ = writeln!(o, "## The machine\n");
    if let Some(m) = &r.machine {
        let _ = writeln!(o, "| | |\n|---|---|");
        let _ = writeln!(o, "| CPUs | {} × {} |", m.cores, m.cpu_model);
        let _ = writeln!(o, "| memory | {:.1} GiB |", m.mem_gib);
        let _ = writeln!(o, "| kernel | Linux {} |", m.kernel);
        let _ = writeln!(
            o,
            "| disk: `write` + `fdatasync` of {} KiB, {} times, in the benchmark directory | p50 {} ms, p99 {} ms, max {} ms |",
            m.fsync_block / 1024,
            m.fsync.count,
            ms(m.fsync.p50),
            ms(m.fsync.p99),
            ms(m.fsync.max)
        );
        let _ = writeln!(
            o,
            "| CPU busy before the start (3 s) | {:.0} % (load average {}) |\n",
            m.busy_pct_before, m.loadavg_before
        );
    }
    quiet(&r, &mut o);

    // Settings.
    let _ = writeln!(o, "## Systems and every setting that differs\n");
    let _ = writeln!(o, "| | etcd | Entente | Mosquitto |\n|---|---|---|---|");
    let rows = [
        (
            "version",
            "etcd_version",
            "entente_version",
            "mosquitto_version",
        ),
        (
            "processes",
            "etcd_processes",
            "entente_processes",
            "mosquitto_processes",
        ),
        (
            "durability",
            "etcd_durability",
            "entente_durability",
            "mosquitto_durability",
        ),
        (
            "state store",
            "etcd_store",
            "entente_store",
            "mosquitto_store",
        ),
        (
            "timings",
            "etcd_timings",
            "entente_timings",
            "mosquitto_timings",
        ),
        ("client API", "etcd_api", "entente_api", "mosquitto_api"),
        (
            "what a write is",
            "etcd_write",
            "entente_write",
            "mosquitto_write",
        ),
        ("auth", "etcd_auth", "entente_auth", "mosquitto_auth"),
        (
            "flags given",
            "etcd_flags",
            "entente_flags",
            "mosquitto_flags",
        ),
    ];
    for (label, e, n, m) in rows {
        let _ = writeln!(
            o,
            "| {label} | {} | {} | {} |",
            meta(&r, e),
            meta(&r, n),
            meta(&r, m)
        );
    }
    let _ = writeln!(
        o,
        "\nLoad: `loadgen` (this repository, `bench/loadgen`) for HTTP, the same code for etcd \
         and Entente; `device-sim ingest` for MQTT, the same code for both brokers. Latencies \
         are HdrHistogram percentiles (3 significant digits). Each HTTP client has its own \
         connections (HTTP/1.1, keep-alive). {}\n",
        meta(&r, "load_notes")
    );

    // 1. Writes.
    let _ = writeln!(
        o,
        "## 1. Replicated writes (three members, loopback, fsync on)\n"
    );
    let _ = writeln!(
        o,
        "**Closed loop**: N clients, each sends its next request when the previous one \
         answered; latency from send to answer. {} s measured after {} s of warm-up per row. \
         Requests: {}. A ratio above 1× in the throughput column means Entente is ahead; in the \
         p99 column, below 1× means Entente is faster.\n",
        meta(&r, "secs"),
        meta(&r, "warmup"),
        meta(&r, "spread_desc")
    );
    closed_table(&r, Op::Write, &mut o);
    let _ = writeln!(
        o,
        "\nWhat each write cost (CPU time of all three members, from `/proc/<pid>/stat`, \
         divided by the writes answered; fsyncs of the leader's log from its own `/metrics`):\n"
    );
    cost_table(&r, Op::Write, &mut o);
    let mut open: Vec<&LoadResult> = r
        .loads
        .iter()
        .filter(|l| l.op == Op::Write && l.mode == "open")
        .collect();
    if !open.is_empty() {
        open.sort_by(|a, b| {
            a.offered_rate
                .unwrap_or(0.0)
                .total_cmp(&b.offered_rate.unwrap_or(0.0))
                .then(a.system.name().cmp(b.system.name()))
        });
        let _ = writeln!(
            o,
            "\n**Open loop** (coordinated-omission safe): {} clients on fixed schedules offering \
             the same total rate to both systems, at fractions of the lower of the two \
             closed-loop peaks; latency from each request's *intended* send time.\n",
            open[0].clients
        );
        let _ = writeln!(
            o,
            "| offered/s | system | answered/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for l in open {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                num(l.offered_rate.unwrap_or(0.0)),
                l.system.name(),
                num(l.throughput),
                ms(l.latency.p50),
                ms(l.latency.p90),
                ms(l.latency.p99),
                ms(l.latency.p999),
                ms(l.latency.max),
                errors(l)
            );
        }
    }

    // 2. Reads.
    let _ = writeln!(o, "\n## 2. Reads (closed loop, same concurrencies)\n");
    let _ = writeln!(
        o,
        "**Linearizable**: etcd range with its default (linearizable) consistency, Entente \
         `GET /v1/devices/{{id}}` with its default consistency; both confirm leadership with a \
         ReadIndex round before answering.\n"
    );
    closed_table(&r, Op::ReadLinearizable, &mut o);
    let _ = writeln!(
        o,
        "\n**Local**: etcd range with `serializable: true`, Entente `?consistency=local`; \
         both answer from the member's own state without asking the others.\n"
    );
    closed_table(&r, Op::ReadLocal, &mut o);
    let _ = writeln!(o, "\nCost per linearizable read:\n");
    cost_table(&r, Op::ReadLinearizable, &mut o);

    // 3. Failover.
    let _ = writeln!(
        o,
        "\n## 3. Failover: kill -9 the leader, time to the first successful write\n"
    );
    let _ = writeln!(o, "{}\n", meta(&r, "failover_desc"));
    let _ = writeln!(
        o,
        "| system | settings | kills | p50 ms | p99 ms | max ms | mean ms | failed attempts |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut fo = r.failovers.clone();
    fo.sort_by(|a, b| {
        a.system
            .name()
            .cmp(b.system.name())
            .then(a.label.cmp(&b.label))
    });
    for f in &fo {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            f.system.name(),
            f.label,
            f.trials_ms.len(),
            ms(f.p50_ms),
            ms(f.p99_ms),
            ms(f.max_ms),
            ms(f.mean_ms),
            f.failed_attempts
        );
    }
    let def = |t: Target| fo.iter().find(|f| f.system == t && f.label == "defaults");
    if let (Some(e), Some(n)) = (def(Target::Etcd), def(Target::Entente)) {
        let _ = writeln!(
            o,
            "\nWith both at their defaults, Entente/etcd: p50 {}, p99 {}.",
            ratio(n.p50_ms, e.p50_ms),
            ratio(n.p99_ms, e.p99_ms)
        );
    }
    for f in &fo {
        let list: Vec<String> = f.trials_ms.iter().map(|t| format!("{t:.0}")).collect();
        let _ = writeln!(
            o,
            "\n- {} ({}), each kill in ms: {}",
            f.system.name(),
            f.label,
            list.join(", ")
        );
    }

    // 4. Ingest.
    if !r.ingest.is_empty() {
        let _ = writeln!(o, "\n## 4. MQTT ingest: QoS 1 publishes of 100-byte JSON\n");
        let _ = writeln!(o, "{}\n", meta(&r, "ingest_desc"));
        ingest_table(&r, &mut o);
    }

    // Chart.
    let _ = writeln!(o, "\n## Chart\n");
    let _ = writeln!(
        o,
        "![throughput against p99 latency]({})\n\nThroughput against p99 latency per system, \
         closed loop, one point per concurrency (1 → 256 clients, left to right as throughput \
         grows); the open-loop write points are the squares.\n",
        a.chart_link
    );

    // Verdict.
    let _ = writeln!(o, "## Against the goal\n");
    verdict(&r, &mut o);

    if !r.profiles.is_empty() {
        let _ = writeln!(o, "\n## Profiles\n");
        let _ = writeln!(o, "{}\n", meta(&r, "profile_desc"));
        for (sys, text) in &r.profiles {
            let _ = writeln!(
                o,
                "<details><summary>{sys}</summary>\n\n```\n{}\n```\n</details>\n",
                text.trim_end()
            );
        }
    }
    if let Some(p) = &a.notes
        && let Ok(text) = std::fs::read_to_string(p)
    {
        let _ = writeln!(o, "\n{}", text.trim_end());
    }
    let _ = writeln!(
        o,
        "\n## Reproduce\n\n```sh\n{}\n```\n\nRaw results (JSON per run) are in the results directory the script prints; \
         `BENCH_SECS`, `BENCH_QUICK`, `BENCH_KILLS` and the other knobs are described at the top of `bench/run.sh`.",
        meta(&r, "command")
    );
    std::fs::write(&a.out, o).with_context(|| format!("writing {}", a.out.display()))?;
    Ok(())
}

/// One line per goal: ahead or behind, by how much.
fn verdict(r: &Results, o: &mut String) {
    let pct = |x: f64| (x - 1.0) * 100.0;
    let mut lines = Vec::new();
    for c in concurrencies(r, Op::Write) {
        if let (Some(e), Some(n)) = (
            closed(r, Target::Etcd, Op::Write, c),
            closed(r, Target::Entente, Op::Write, c),
        ) && e.throughput > 0.0
        {
            let x = n.throughput / e.throughput;
            lines.push(format!(
                "- Replicated writes, {c} client{}: Entente has {} etcd's throughput ({:+.0} %) — **{}**; p99 {} ms against {} ms ({}).",
                if c == 1 { "" } else { "s" },
                ratio(n.throughput, e.throughput),
                pct(x),
                if x >= 1.0 { "ahead" } else { "behind" },
                ms(n.latency.p99),
                ms(e.latency.p99),
                if n.latency.p99 <= e.latency.p99 {
                    "lower"
                } else {
                    "higher"
                }
            ));
        }
    }
    let def = |t: Target| {
        r.failovers
            .iter()
            .find(|f| f.system == t && f.label == "defaults")
    };
    if let (Some(e), Some(n)) = (def(Target::Etcd), def(Target::Entente)) {
        lines.push(format!(
            "- Failover at defaults: Entente p50 {} ms vs etcd {} ms, p99 {} vs {} ms — {}.",
            ms(n.p50_ms),
            ms(e.p50_ms),
            ms(n.p99_ms),
            ms(e.p99_ms),
            if n.p50_ms <= e.p50_ms && n.p99_ms <= e.p99_ms {
                "**ahead**"
            } else {
                "**behind**"
            }
        ));
    }
    let mut keys: Vec<(u64, u64)> = r.ingest.keys().map(|k| (k.2, k.1)).collect();
    keys.sort_unstable();
    keys.dedup();
    for (i, c) in keys {
        let get = |b: &str| {
            r.ingest
                .get(&(b.to_string(), c, i))
                .and_then(|v| v["acked_per_sec"].as_f64())
        };
        if let (Some(m), Some(e)) = (get("mosquitto"), get("entente"))
            && m > 0.0
        {
            let x = e / m;
            lines.push(format!(
                "- MQTT ingest, {c} clients, {i} in flight each: Entente has {} Mosquitto's msg/s ({:+.0} %) — **{}**.",
                ratio(e, m),
                pct(x),
                if x >= 1.1 {
                    "ahead"
                } else if x >= 0.9 {
                    "at parity (within 10 %)"
                } else {
                    "behind"
                }
            ));
        }
    }
    if lines.is_empty() {
        let _ = writeln!(o, "No pairs of results to compare.");
    }
    for l in lines {
        let _ = writeln!(o, "{l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_separators() {
        assert_eq!(num(1234567.4), "1,234,567");
        assert_eq!(num(999.0), "999");
        assert_eq!(num(-1000.0), "-1,000");
        assert_eq!(ms(0.1234), "0.12");
        assert_eq!(ms(12.34), "12.3");
        assert_eq!(ms(1234.0), "1234");
    }
}
