//! The `gateway` binary: parse the configuration, then `gateway::run` until
//! SIGTERM or SIGINT (a second one exits at once).

use clap::Parser;

use gateway::config::LogFormat;

/// jemalloc rather than the C library's allocator. A connected device is a
/// few small, long-lived allocations (its connection task, presence task,
/// registry entries), made among many short-lived ones (packets, logins,
/// proposals, database rows). glibc keeps what those leave free between
/// the long-lived ones in per-thread arenas, resident; jemalloc groups
/// allocations by size class and its background thread gives pages unused
/// for a second back to the system (settings in `.cargo/config.toml`).
/// Measured with 10,000 idle devices: 5.4–5.6 KiB of resident memory per
/// device against 7.8–8.4 KiB with glibc's (bench/BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    // First: a signal from here on stops the gateway gracefully.
    let shutdown = shutdown_signals();
    let args = gateway::config::Args::parse();
    if let Some(gateway::config::Command::Certs(certs)) = &args.command {
        match gateway::certs::make(certs) {
            Ok(written) => {
                print!("{written}");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("gateway certs: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(gateway::config::Command::VerifyCertificate(v)) = &args.command {
        match gateway::verify::run(v) {
            Ok(report) => {
                print!("{report}");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("gateway verify-certificate: not valid: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(gateway::config::Command::Keys(keys)) = &args.command {
        match coordinator::keys::load_or_create(&keys.data_dir) {
            Ok((key, created)) => {
                if created {
                    eprintln!(
                        "gateway keys: created {}",
                        coordinator::keys::key_path(&keys.data_dir).display()
                    );
                }
                println!("{}", key.public_text());
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("gateway keys: {e}");
                std::process::exit(1);
            }
        }
    }
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
    let recover = args.recover;
    let restore = args.restore.clone();
    let config = match gateway::config::Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    if recover {
        let others = config.peers.keys().copied();
        match gateway::recover::recover(&config.data_dir, config.node_id, others) {
            Ok(r) => {
                println!("{r}");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("gateway: recovery refused: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(file) = restore {
        match gateway::backup::restore(&file, &config.data_dir, config.node_id).await {
            Ok(r) => {
                println!("{r}");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("gateway: restore refused: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = gateway::run(config, shutdown).await {
        eprintln!("gateway: {e}");
        std::process::exit(1);
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C), which stops the
/// gateway gracefully, at any time (during a start too); a second one exits
/// at once with 128 + its number.
fn shutdown_signals() -> impl std::future::Future<Output = ()> {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Registered now, before anything can take long: from here on the
        // signals are ours, not the default action's.
        let streams = signal(SignalKind::terminate())
            .and_then(|term| signal(SignalKind::interrupt()).map(|int| (term, int)));
        match streams {
            Ok((mut term, mut int)) => {
                tokio::spawn(async move {
                    let mut next = async || {
                        tokio::select! {
                            _ = term.recv() => ("SIGTERM", 143),
                            _ = int.recv() => ("SIGINT", 130),
                        }
                    };
                    let (name, _) = next().await;
                    tracing::info!(
                        signal = name,
                        "stopping gracefully (a second signal stops at once)"
                    );
                    let _ = first_tx.send(());
                    let (name, code) = next().await;
                    tracing::warn!(signal = name, "second signal: exiting at once");
                    std::process::exit(code);
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGTERM / SIGINT");
                drop(first_tx);
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stopping gracefully (a second Ctrl-C stops at once)");
        let _ = first_tx.send(());
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
    async move {
        // A sender dropped without a signal (handlers could not be set up)
        // must not stop the gateway.
        if first_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
