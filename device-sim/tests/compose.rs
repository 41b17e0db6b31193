//! The fleet that `docker-compose.yml` runs is a valid `device-sim run`
//! command line, and it survives a second `docker compose up`: the devices'
//! secrets are kept in a devices file (on a volume), and a device whose
//! secret was lost gets a new one instead of stopping the simulator.

use clap::Parser;
use device_sim::cli::{Cli, Command};

#[test]
fn the_compose_fleet_is_a_valid_run_command() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker-compose.yml");
    let compose = std::fs::read_to_string(&path).expect("docker-compose.yml");
    let start = compose
        .find("exec device-sim run")
        .expect("the devices service runs the fleet")
        + "exec ".len();
    // The folded command runs on over the lines indented below it.
    let mut lines = compose[start..].lines();
    let mut text = lines.next().unwrap_or_default().to_string();
    for l in lines.take_while(|l| l.starts_with("        ")) {
        text.push(' ');
        text.push_str(l.trim());
    }
    // The shell finds the admin token file.
    let text = match (text.find("\"$$("), text.find(")\"")) {
        (Some(a), Some(b)) if a < b => format!("{}/gw1/admin-token{}", &text[..a], &text[b + 2..]),
        _ => text,
    };
    let cli = Cli::try_parse_from(text.split_whitespace())
        .unwrap_or_else(|e| panic!("`{text}` does not parse: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("not `run`: {text}");
    };
    assert_eq!(
        run.common.devices_file.as_deref(),
        Some(std::path::Path::new("/data/devices.json"))
    );
    assert!(run.common.rotate_existing);
}
