//! The `gateway` binary: parse the configuration, then `gateway::run`.

use clap::Parser;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = match gateway::config::Config::from_args(gateway::config::Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Err(e) = gateway::run(config, shutdown).await {
        eprintln!("gateway: {e}");
        std::process::exit(1);
    }
}
