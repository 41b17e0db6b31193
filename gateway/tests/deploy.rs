//! The container files (`Dockerfile`, `docker-compose.yml`) follow the
//! gateway: every `ENTENTE_*` variable and flag they use is a setting of the
//! gateway, and the container stops gracefully, as a user other than root.
//! (Docker is not needed: the files are read as text.)

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;

fn repo_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The gateway's environment variables and long flags.
fn gateway_settings() -> (BTreeSet<String>, BTreeSet<String>) {
    let cmd = gateway::config::Args::command();
    let mut envs = BTreeSet::new();
    let mut flags = BTreeSet::new();
    for a in cmd.get_arguments() {
        if let Some(e) = a.get_env() {
            envs.insert(e.to_string_lossy().into_owned());
        }
        if let Some(l) = a.get_long() {
            flags.insert(format!("--{l}"));
        }
    }
    (envs, flags)
}

/// Every `ENTENTE_…` name in `text`.
fn entente_vars(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("ENTENTE_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        out.insert(name);
        rest = &rest[i + 8..];
    }
    out
}

/// Every `--flag` token in `text`.
fn flags_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '[' | ']'))
        .filter(|t| t.starts_with("--") && t.len() > 2)
        .map(|t| t.split('=').next().unwrap_or(t).to_string())
        .collect()
}

/// The blocks of docker-compose.yml: every service under `services:` and
/// every other top-level key (such as the `x-gateway` anchor), each with
/// its lines.
fn compose_blocks(text: &str) -> BTreeMap<String, String> {
    let mut blocks: BTreeMap<String, String> = BTreeMap::new();
    let mut in_services = false;
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let key = line.trim().split(':').next().unwrap_or("").to_string();
        if indent == 0 {
            in_services = key == "services";
            current = (!in_services).then_some(key);
            continue;
        }
        if in_services && indent == 2 {
            current = Some(key);
            continue;
        }
        if let Some(c) = &current {
            let b = blocks.entry(c.clone()).or_default();
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
}

#[test]
fn every_setting_the_container_files_use_exists() {
    let (envs, flags) = gateway_settings();
    let compose = repo_file("docker-compose.yml");
    let dockerfile = repo_file("Dockerfile");
    let used = entente_vars(&compose)
        .into_iter()
        .chain(entente_vars(&dockerfile))
        .collect::<BTreeSet<_>>();
    assert!(used.contains("ENTENTE_PEERS"), "{used:?}");
    for v in &used {
        assert!(envs.contains(v), "{v} is not a gateway setting ({envs:?})");
    }
    let blocks = compose_blocks(&compose);
    let gateways: Vec<&String> = blocks
        .keys()
        .filter(|k| *k == "x-gateway" || k.starts_with("gw"))
        .collect();
    assert_eq!(gateways.len(), 4, "{:?}", blocks.keys());
    for g in gateways {
        for f in flags_in(&blocks[g]) {
            assert!(flags.contains(&f), "{g} uses {f}, not a gateway flag");
        }
    }
    // The peers are found by service name, whatever the start order.
    assert!(blocks["x-gateway"].contains("1=gw1:7000"));
}

#[test]
fn the_container_stops_gracefully_and_runs_as_a_user() {
    let dockerfile = repo_file("Dockerfile");
    assert!(
        dockerfile.lines().any(|l| l.trim() == "STOPSIGNAL SIGTERM"),
        "the Dockerfile states the stop signal"
    );
    let user = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .expect("the image names its user");
    let user = user.split(':').next().unwrap_or(user).trim();
    assert!(
        user != "root" && user != "0",
        "the image runs as root ({user})"
    );

    let blocks = compose_blocks(&repo_file("docker-compose.yml"));
    let gw = &blocks["x-gateway"];
    assert!(gw.contains("stop_signal: SIGTERM"), "{gw}");
    assert!(gw.contains("stop_grace_period:"), "{gw}");
    // Both device ports serve both MQTT versions: the one published is
    // enough for MQTT 5 devices.
    for g in ["gw1", "gw2", "gw3"] {
        assert!(
            blocks[g].contains(":1883\""),
            "{g} publishes its device port"
        );
    }
    // The simulator survives a second `up`: its devices' secrets are kept
    // on a volume, and lost ones are replaced rather than fatal; SIGTERM
    // reaches it through an init.
    let sim = &blocks["devices"];
    assert!(sim.contains("init: true"), "{sim}");
    assert!(sim.contains("--devices-file /data/devices.json"), "{sim}");
    assert!(sim.contains("\"sim:/data\""), "{sim}");
    assert!(sim.contains("--rotate-existing"), "{sim}");
}
