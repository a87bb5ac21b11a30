//! lambda-imagectl: the companion CLI. Thin: parse flags, call the daemon, render events.
//!
//! Exit codes: 0 ok, 1 the daemon answered with an error, 2 usage, 3 daemon unreachable.

mod render;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lambda_imaged::client::{self, Client, InvokeImageArg, LayerArg, RequestBuilder, proto};
use lambda_imaged::error::code_name;
use serde::Serialize;
use tonic_health::pb::health_check_response::ServingStatus;

/// Talk to lambda-imaged, the shared Lambda emulation image builder.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The daemon's socket [default: $LAMBDA_IMAGED_SOCKET, /run/lambda-imaged/lambda-imaged.sock
    /// as root, $XDG_RUNTIME_DIR/lambda-imaged.sock otherwise]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Give up after this long (e.g. 30s, 10m); the command then fails with exit code 1
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// If the daemon is not up yet, keep trying to connect (until --timeout, default 60s)
    #[arg(long, global = true)]
    wait: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the tag, base image and Dockerfile a request resolves to (no engine I/O).
    Resolve {
        #[command(flatten)]
        request: RequestArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Build the image if it is missing or stale, streaming what happens.
    Build {
        #[command(flatten)]
        request: RequestArgs,
        /// Do not pull a missing base image.
        #[arg(long)]
        skip_pull_image: bool,
        /// Rebuild even if the image is up to date.
        #[arg(long)]
        force_image_build: bool,
        /// Print one JSON object per event (JSON Lines).
        #[arg(long)]
        json: bool,
        /// Print only the outcome.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List builds in flight and recently finished.
    Ls {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show the daemon's version, engine, paths and limits.
    Info {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Ask the daemon's health service (SERVING while the engine answers).
    Health,
    /// Remove images this daemon built and unused cached layers.
    Prune {
        /// Only what was last used longer ago than this (e.g. 7d, 12h).
        #[arg(long)]
        older_than: Option<String>,
        /// Keep up to this much cache (e.g. 10GB).
        #[arg(long)]
        keep_storage: Option<String>,
        /// Report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PackageTypeArg {
    Zip,
    Image,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ArchArg {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "arm64")]
    Arm64,
}

#[derive(Debug, Args)]
struct RequestArgs {
    /// How the function is packaged.
    #[arg(long, value_enum, default_value = "zip")]
    package_type: PackageTypeArg,
    /// Lambda runtime of a zip function, e.g. python3.12.
    #[arg(long)]
    runtime: Option<String>,
    /// Image of an image function, e.g. myrepo/fn:v1.
    #[arg(long)]
    image: Option<String>,
    /// Function architecture.
    #[arg(long, value_enum, default_value = "x86_64")]
    arch: ArchArg,
    /// A layer, [NAME=]PATH (a directory or a .zip); repeat in the function's order. NAME defaults to the
    /// path's base name.
    #[arg(long = "layer", value_name = "[NAME=]PATH")]
    layers: Vec<String>,
    /// An emulation image, [FUNCTION=]REF; without FUNCTION it is the global default.
    #[arg(long = "invoke-image", value_name = "[FUNCTION=]REF")]
    invoke_images: Vec<InvokeImageArg>,
    /// The function's name (selects a per-function invoke image).
    #[arg(long)]
    function_name: Option<String>,
}

/// How a command ended.
enum Failure {
    /// Bad flags (exit 2).
    Usage(String),
    /// The daemon answered with an error (exit 1).
    Status(tonic::Status),
    /// The daemon could not be reached (exit 3).
    Unreachable(String),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure::Status(status)
    }
}

impl From<client::ConnectError> for Failure {
    fn from(err: client::ConnectError) -> Self {
        Failure::Unreachable(err.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_errors = matches!(cli.command, Command::Build { json: true, .. });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let timeout = cli.timeout;
    let outcome = runtime.block_on(async move {
        match timeout {
            Some(limit) => tokio::time::timeout(limit, run(cli))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::Status(tonic::Status::deadline_exceeded(format!(
                        "no answer within --timeout {}",
                        humantime::format_duration(limit)
                    ))))
                }),
            None => run(cli).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Unreachable(message)) => {
            eprintln!("error: {message}");
            if json_errors {
                print_json(&ErrorLine::new("UNAVAILABLE", &message));
            }
            ExitCode::from(3)
        }
        Err(Failure::Status(status)) => {
            let code = code_name(status.code());
            eprintln!("error: {code}: {}", status.message());
            if json_errors {
                print_json(&ErrorLine::new(code, status.message()));
            }
            ExitCode::from(1)
        }
    }
}

/// The object `build --json` ends a failed build with (`{"code":..,"message":..,"type":"error"}`).
#[derive(Serialize)]
struct ErrorLine<'a> {
    r#type: &'static str,
    code: &'a str,
    message: &'a str,
}

impl<'a> ErrorLine<'a> {
    fn new(code: &'a str, message: &'a str) -> ErrorLine<'a> {
        ErrorLine {
            r#type: "error",
            code,
            message,
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let socket = cli.socket.unwrap_or_else(client::default_socket);
    let client = if cli.wait {
        let deadline = tokio::time::Instant::now() + cli.timeout.unwrap_or(Duration::from_secs(60));
        Client::connect_waiting(&socket, deadline).await?
    } else {
        Client::connect(&socket).await?
    };
    match cli.command {
        Command::Resolve { request, json } => resolve(client, &request, json).await,
        Command::Build {
            request,
            skip_pull_image,
            force_image_build,
            json,
            quiet,
        } => {
            let request = request_builder(&request)?
                .skip_pull_image(skip_pull_image)
                .force_image_build(force_image_build);
            build(client, request, json, quiet).await
        }
        Command::Ls { json } => ls(client, json).await,
        Command::Info { json } => info(client, json).await,
        Command::Health => health(client).await,
        Command::Prune {
            older_than,
            keep_storage,
            dry_run,
        } => {
            prune(
                client,
                older_than.as_deref(),
                keep_storage.as_deref(),
                dry_run,
            )
            .await
        }
    }
}

/// The request the flags describe (layers in flag order; paths made absolute on `finish`).
fn request_builder(args: &RequestArgs) -> Result<RequestBuilder, Failure> {
    let mut builder = RequestBuilder::default()
        .package_type(match args.package_type {
            PackageTypeArg::Zip => proto::PackageType::Zip,
            PackageTypeArg::Image => proto::PackageType::Image,
        })
        .architecture(match args.arch {
            ArchArg::X86_64 => proto::Architecture::X8664,
            ArchArg::Arm64 => proto::Architecture::Arm64,
        });
    if let Some(runtime) = &args.runtime {
        builder = builder.runtime(runtime.as_str());
    }
    if let Some(image) = &args.image {
        builder = builder.image_ref(image.as_str());
    }
    if let Some(name) = &args.function_name {
        builder = builder.function_name(name.as_str());
    }
    for text in &args.layers {
        let layer: LayerArg = text
            .parse()
            .map_err(|err| Failure::Usage(format!("--layer {err}")))?;
        builder = builder.layer(layer);
    }
    for invoke in &args.invoke_images {
        builder = builder.invoke_image(invoke.clone());
    }
    Ok(builder)
}

fn finish(builder: RequestBuilder) -> Result<proto::BuildRequest, Failure> {
    builder
        .finish()
        .map_err(|err| Failure::Usage(format!("cannot read the current directory: {err}")))
}

async fn resolve(mut client: Client, args: &RequestArgs, json: bool) -> Result<ExitCode, Failure> {
    let plan = client.resolve(finish(request_builder(args)?)?).await?;
    if json {
        print_json(&plan);
        return Ok(ExitCode::SUCCESS);
    }
    println!("tag:        {}", plan.tag);
    println!("base image: {}", plan.base_image);
    println!("platform:   {}", plan.platform);
    for layer in &plan.layers {
        println!("layer:      {} = {}", layer.name, layer.path);
    }
    for layer in &plan.ignored_layers {
        println!(
            "ignored:    {} = {} (an IMAGE function has no layers)",
            layer.name, layer.path
        );
    }
    println!("Dockerfile:");
    for line in plan.dockerfile.lines() {
        println!("  {line}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn build(
    mut client: Client,
    request: RequestBuilder,
    json: bool,
    quiet: bool,
) -> Result<ExitCode, Failure> {
    let request = finish(request)?;
    let mut render = render::Render::new(json, quiet);
    client
        .build_with(request, |event| render.event(event))
        .await?;
    Ok(ExitCode::SUCCESS)
}

async fn ls(mut client: Client, json: bool) -> Result<ExitCode, Failure> {
    let list = client.list_builds().await?;
    if json {
        print_json(&list);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<10} {:<36} {:>4} TAG", "STATE", "BUILD ID", "SUBS");
    for summary in list.in_flight.iter().chain(&list.recent) {
        println!(
            "{:<10} {:<36} {:>4} {}",
            proto::state_name(summary.state),
            summary.build_id,
            summary.subscribers,
            summary.tag
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn info(mut client: Client, json: bool) -> Result<ExitCode, Failure> {
    let info = client.info().await?;
    if json {
        print_json(&info);
        return Ok(ExitCode::SUCCESS);
    }
    let engine = info.engine.clone().unwrap_or_default();
    println!("lambda-imaged {}", info.version);
    if engine.reachable {
        println!(
            "engine:  {} {} (API {}) at {}",
            engine.name, engine.version, engine.api_version, engine.host
        );
        println!("store:   {}", engine.image_store);
        println!("runs:    {}", engine.architectures.join(" "));
    } else {
        println!("engine:  unreachable at {}: {}", engine.host, engine.error);
    }
    println!("socket:  {}", info.socket_path);
    println!("cache:   {} ({} bytes)", info.cache_dir, info.cache_bytes);
    for rie in &info.rie {
        let state = if rie.present {
            rie.sha256.as_str()
        } else {
            "MISSING"
        };
        println!("rie:     {} {} {}", rie.architecture, rie.path, state);
    }
    let mut limits: Vec<_> = info.limits.iter().collect();
    limits.sort();
    for (name, value) in limits {
        println!("limit:   {name} = {value}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn health(mut client: Client) -> Result<ExitCode, Failure> {
    let status = client.health().await?;
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn prune(
    mut client: Client,
    older_than: Option<&str>,
    keep_storage: Option<&str>,
    dry_run: bool,
) -> Result<ExitCode, Failure> {
    let older_than_seconds = match older_than {
        Some(text) => humantime::parse_duration(text)
            .map_err(|err| {
                Failure::Usage(format!("--older-than {text:?}: {err}; e.g. 30m, 12h, 7d"))
            })?
            .as_secs(),
        None => 0,
    };
    let keep_storage_bytes = match keep_storage {
        Some(text) => text
            .parse::<ByteSize>()
            .map_err(|err| {
                Failure::Usage(format!("--keep-storage {text:?}: {err}; e.g. 500MB, 10GiB"))
            })?
            .as_u64(),
        None => 0,
    };
    let response = client
        .prune(proto::PruneRequest {
            older_than_seconds,
            keep_storage_bytes,
            dry_run,
        })
        .await?;
    for image in &response.images_removed {
        println!("image  {image}");
    }
    for layer in &response.layers_removed {
        println!("layer  {layer}");
    }
    println!(
        "{} {} bytes",
        if dry_run { "would free" } else { "freed" },
        response.bytes_freed
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints one JSON object on a line. It goes through `serde_json::Value`, whose maps keep keys
/// sorted: the CLI has always printed sorted keys, and scripts may compare its output.
fn print_json(value: &impl Serialize) {
    // Cannot fail: every type printed is a struct of strings, numbers, lists and maps with
    // string keys.
    let value = serde_json::to_value(value).expect("wire types serialise to JSON");
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not worth a panic.
    let _ = writeln!(out, "{value}");
}
