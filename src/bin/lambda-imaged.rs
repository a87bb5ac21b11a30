//! The daemon: parse flags, set up logging and signals, serve until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lambda_imaged::config::{self, Config};
use lambda_imaged::listener::Listener;
use lambda_imaged::server::Daemon;
use tokio::signal::unix::{SignalKind, signal};

/// Builds AWS Lambda local-emulation images for every emulator on this machine.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Unix socket to serve on [default: /run/lambda-imaged/lambda-imaged.sock as root,
    /// $XDG_RUNTIME_DIR/lambda-imaged.sock otherwise]
    #[arg(long, env = "LAMBDA_IMAGED_SOCKET")]
    socket: Option<PathBuf>,
    /// Layer cache and records [default: /var/cache/lambda-imaged as root,
    /// $XDG_CACHE_HOME/lambda-imaged otherwise]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Directory holding aws-lambda-rie-x86_64 and aws-lambda-rie-arm64 [default: <cache-dir>/rie]
    #[arg(long, env = "LAMBDA_IMAGED_RIE_DIR")]
    rie_dir: Option<PathBuf>,
    /// Longest one engine build may take, in seconds
    #[arg(long, default_value_t = 900)]
    build_timeout: u64,
    /// Most engine builds at once [default: number of CPUs]
    #[arg(long)]
    max_parallel_builds: Option<usize>,
    /// How long SIGTERM waits for builds in flight, in seconds
    #[arg(long, default_value_t = 60)]
    shutdown_timeout: u64,
    /// Log format
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    let socket = args.socket.unwrap_or_else(config::default_socket);
    let mut config = Config::new(
        socket,
        args.cache_dir.unwrap_or_else(config::default_cache_dir),
    );
    if let Some(rie_dir) = args.rie_dir {
        config.rie_dir = rie_dir;
    }
    config.build_timeout = Duration::from_secs(args.build_timeout);
    config.shutdown_timeout = Duration::from_secs(args.shutdown_timeout);
    if let Some(max) = args.max_parallel_builds {
        anyhow::ensure!(max > 0, "--max-parallel-builds must be at least 1");
        config.max_parallel_builds = max;
    }
    std::fs::create_dir_all(&config.cache_dir)
        .with_context(|| format!("creating cache dir {}", config.cache_dir.display()))?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = Listener::open(&config.socket).await?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        };
        Daemon::new(config).serve(listener, shutdown).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
