//! The `gateway` binary: parse the configuration, then `gateway::run`.

use clap::Parser;

use gateway::config::LogFormat;

/// The log on stdout: `RUST_LOG` (default `info`) in the chosen format.
/// Text is coloured only on a terminal (and not with `NO_COLOR` set), so a
/// log collected from a pipe or file holds no escape codes.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() {
    let args = gateway::config::Args::parse();
    let format = match args.log_format() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    init_logging(format);
    // Every device is a socket: take as many open files as the system allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 20_000 => tracing::warn!(
            limit = n,
            "the open-file limit allows fewer than 10,000 device connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    // A command line is visible to every local user (ps, /proc).
    let on_command_line = std::env::args_os().any(|a| {
        a == "--cluster-secret"
            || a.to_str()
                .is_some_and(|a| a.starts_with("--cluster-secret="))
    });
    if on_command_line {
        tracing::warn!(
            "--cluster-secret on the command line can be read by every local user; \
             use --cluster-secret-file or ENTENTE_CLUSTER_SECRET"
        );
    }
    let config = match gateway::config::Config::from_args(args) {
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
