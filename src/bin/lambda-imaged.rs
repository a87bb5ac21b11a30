//! The daemon: parse flags and config, set up logging and signals, serve until SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use lambda_imaged::config::{self, Settings};
use lambda_imaged::listener::Listener;
use lambda_imaged::server::Daemon;
use tokio::signal::unix::{SignalKind, signal};

/// Default config file, read when present.
const DEFAULT_CONFIG: &str = "/etc/lambda-imaged/config.toml";

/// Builds AWS Lambda local-emulation images for every emulator on this machine.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file with any of the settings below (flags override it)
    /// [default: /etc/lambda-imaged/config.toml if present]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = match &args.config {
        Some(path) => Settings::from_file(path).map_err(anyhow::Error::msg)?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Settings::from_file(std::path::Path::new(DEFAULT_CONFIG)).map_err(anyhow::Error::msg)?
        }
        None => Settings::default(),
    };
    let settings = file.overridden_by(args.settings);
    let log_format = settings.log_format.clone().unwrap_or_else(|| "text".into());
    let config = settings
        .into_config()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    if args.print_config {
        print!("{}", config::effective_toml(&config, &log_format));
        return Ok(());
    }

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    if log_format == "json" {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    std::fs::create_dir_all(&config.cache_dir)
        .with_context(|| format!("creating cache dir {}", config.cache_dir.display()))?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener =
            Listener::open(&config.socket, config.socket_gid, config.socket_reach()).await?;
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
