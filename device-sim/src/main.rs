//! `device-sim`: see `device-sim --help`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = device_sim::cli::Cli::parse();
    if let Err(e) = device_sim::cli::main(cli).await {
        eprintln!("device-sim: {e:#}");
        std::process::exit(1);
    }
}
