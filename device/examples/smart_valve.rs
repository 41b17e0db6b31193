//! A smart valve: opens and closes on commands (`open`, `close`, or
//! `set` with `{"position": 0..=100}`) or on desired state
//! (`{"position": N}`), and reports its position.
//!
//! cargo run -p entente-device --example smart_valve -- DEVICE_ID SECRET HOST:PORT[,HOST:PORT...]
use entente_device::{Command, Config, Device, Error, Event};
use serde_json::{Value, json};

/// Where a command moves the valve (percent open), or why it cannot.
fn target(cmd: &Command) -> Result<u64, String> {
    match cmd.name.as_str() {
        "open" => Ok(100),
        "close" => Ok(0),
        "set" => match cmd.params.get("position").and_then(Value::as_u64) {
            Some(p) if p <= 100 => Ok(p),
            _ => Err("set needs {\"position\": 0..=100}".into()),
        },
        other => Err(format!("unknown command {other}")),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [id, secret, gateways] = &args[..] else {
        eprintln!("usage: smart_valve DEVICE_ID SECRET HOST:PORT[,HOST:PORT...]");
        std::process::exit(2);
    };
    let mut device = Device::new(Config::new(id, secret, gateways.split(','))?)?;
    let mut position = 0;
    loop {
        match device.next_event().await {
            Event::Command(cmd) => {
                device.accept(&cmd.id)?;
                match target(&cmd) {
                    Ok(p) => {
                        position = p; // drive the motor here
                        device.report(json!({ "position": position }))?;
                        device.succeed(&cmd.id, json!({ "position": position }))?;
                    }
                    Err(why) => device.fail(&cmd.id, json!({ "error": why }))?,
                }
            }
            Event::Delta(delta) => {
                if let Some(p) = delta.state.get("position").and_then(Value::as_u64) {
                    position = p.min(100);
                }
                device.report(json!({ "position": position }))?;
            }
            Event::Connected(c) => eprintln!("connected to {}", c.gateway),
            Event::Disconnected(d) if !d.error.is_transient() => {
                eprintln!("{}", d.error); // bad credentials, deleted device: give up
                return Err(d.error);
            }
            Event::Disconnected(d) => eprintln!("{} (retrying)", d.error),
            _ => {}
        }
    }
}
