//! lambda-imagectl: the companion CLI. Thin: parse flags, call the daemon, render events.
//!
//! Exit codes: 0 ok, 1 the daemon answered with an error, 2 usage, 3 daemon unreachable.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lambda_imaged::client::{self, proto};
use proto::build_event::Event;
use serde_json::{Value, json};

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
    invoke_images: Vec<String>,
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
                print_json(&json!({"type": "error", "code": "UNAVAILABLE", "message": message}));
            }
            ExitCode::from(3)
        }
        Err(Failure::Status(status)) => {
            let code = code_name(status.code());
            eprintln!("error: {code}: {}", status.message());
            if json_errors {
                print_json(&json!({"type": "error", "code": code, "message": status.message()}));
            }
            ExitCode::from(1)
        }
    }
}

/// Connects, retrying while the daemon is not up yet when `wait` is set.
async fn connect(
    socket: &Path,
    wait: bool,
    timeout: Option<std::time::Duration>,
) -> Result<tonic::transport::Channel, Failure> {
    let deadline =
        tokio::time::Instant::now() + timeout.unwrap_or(std::time::Duration::from_secs(60));
    loop {
        match client::channel(socket).await {
            Ok(channel) => return Ok(channel),
            Err(err) if !wait || tokio::time::Instant::now() >= deadline => return Err(err.into()),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let socket = cli.socket.unwrap_or_else(client::default_socket);
    let channel = connect(&socket, cli.wait, cli.timeout).await?;
    match cli.command {
        Command::Resolve { request, json } => {
            let request = build_request(&request, false, false)?;
            let mut daemon = client::ImageBuilderClient::new(channel);
            let plan = daemon.resolve(request).await?.into_inner();
            if json {
                print_json(&plan_json(&plan));
            } else {
                println!("tag:        {}", plan.tag);
                println!("base image: {}", plan.base_image);
                println!("platform:   {}", plan.platform);
                for layer in &plan.layers {
                    println!("layer:      {} = {}", layer.name, layer.path);
                }
                println!("Dockerfile:");
                for line in plan.dockerfile.lines() {
                    println!("  {line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Build {
            request,
            skip_pull_image,
            force_image_build,
            json,
            quiet,
        } => {
            let request = build_request(&request, skip_pull_image, force_image_build)?;
            let mut daemon = client::ImageBuilderClient::new(channel);
            let mut events = daemon.build(request).await?.into_inner();
            let mut render = Render::new(json, quiet);
            while let Some(event) = events.message().await? {
                render.event(&event);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { json } => {
            let mut daemon = client::ImageBuilderClient::new(channel);
            let list = daemon
                .list_builds(proto::ListBuildsRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&json!({
                    "in_flight": list.in_flight.iter().map(summary_json).collect::<Vec<_>>(),
                    "recent": list.recent.iter().map(summary_json).collect::<Vec<_>>(),
                }));
            } else {
                println!("{:<10} {:<36} {:>4} TAG", "STATE", "BUILD ID", "SUBS");
                for summary in list.in_flight.iter().chain(&list.recent) {
                    println!(
                        "{:<10} {:<36} {:>4} {}",
                        state_name(summary.state),
                        summary.build_id,
                        summary.subscribers,
                        summary.tag
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Info { json } => {
            let mut daemon = client::ImageBuilderClient::new(channel);
            let info = daemon
                .get_info(proto::GetInfoRequest {})
                .await?
                .into_inner();
            let engine = info.engine.clone().unwrap_or_default();
            let value = json!({
                "version": info.version,
                "engine": {
                    "host": engine.host, "reachable": engine.reachable, "name": engine.name,
                    "version": engine.version, "api_version": engine.api_version,
                    "distribution_api": engine.distribution_api, "error": engine.error,
                },
                "socket_path": info.socket_path,
                "cache_dir": info.cache_dir,
                "cache_bytes": info.cache_bytes,
                "rie": info.rie.iter().map(|r| json!({
                    "architecture": r.architecture, "path": r.path, "sha256": r.sha256, "present": r.present,
                })).collect::<Vec<_>>(),
                "capabilities": info.capabilities,
                "limits": info.limits,
                "stats": info.stats.map(|s| json!({
                    "requests": s.requests, "joined": s.joined, "cache_hits": s.cache_hits,
                    "engine_builds": s.engine_builds, "failures": s.failures,
                    "files_hashed": s.files_hashed, "bytes_hashed": s.bytes_hashed,
                })),
            });
            if json {
                print_json(&value);
            } else {
                println!("lambda-imaged {}", info.version);
                if engine.reachable {
                    println!(
                        "engine:  {} {} (API {}) at {}",
                        engine.name, engine.version, engine.api_version, engine.host
                    );
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
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Health => {
            use tonic_health::pb::{
                HealthCheckRequest, health_check_response::ServingStatus,
                health_client::HealthClient,
            };
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
            println!("{}", status.as_str_name());
            Ok(if status == ServingStatus::Serving {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Prune {
            older_than,
            keep_storage,
            dry_run,
        } => {
            let older_than_seconds = match older_than {
                Some(text) => parse_duration(&text).map_err(Failure::Usage)?,
                None => 0,
            };
            let keep_storage_bytes = match keep_storage {
                Some(text) => parse_size(&text).map_err(Failure::Usage)?,
                None => 0,
            };
            let mut daemon = client::ImageBuilderClient::new(channel);
            let response = daemon
                .prune(proto::PruneRequest {
                    older_than_seconds,
                    keep_storage_bytes,
                    dry_run,
                })
                .await?
                .into_inner();
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
    }
}

fn parse_duration(text: &str) -> Result<u64, String> {
    humantime::parse_duration(text)
        .map(|d| d.as_secs())
        .map_err(|err| format!("--older-than {text:?}: {err}; e.g. 30m, 12h, 7d"))
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|err| format!("--keep-storage {text:?}: {err}; e.g. 500MB, 10GiB"))
}

/// Builds the wire request from flags; paths become absolute (the daemon's cwd means nothing).
fn build_request(
    args: &RequestArgs,
    skip_pull_image: bool,
    force_image_build: bool,
) -> Result<proto::BuildRequest, Failure> {
    let cwd = std::env::current_dir()
        .map_err(|err| Failure::Usage(format!("cannot read the current directory: {err}")))?;
    let mut layers = Vec::new();
    for text in &args.layers {
        let (name, path) = match text.split_once('=') {
            Some((name, path)) => (name.to_owned(), PathBuf::from(path)),
            None => {
                let path = PathBuf::from(text);
                let name = base_name(&path).ok_or_else(|| {
                    Failure::Usage(format!(
                        "--layer {text:?}: cannot derive a name from the path; use NAME=PATH"
                    ))
                })?;
                (name, path)
            }
        };
        if path.as_os_str().is_empty() {
            return Err(Failure::Usage(format!(
                "--layer {text:?}: the path is empty"
            )));
        }
        layers.push(proto::Layer {
            name,
            path: cwd.join(path).display().to_string(),
        });
    }
    let invoke_images = args
        .invoke_images
        .iter()
        .map(|text| match text.split_once('=') {
            Some((function, image)) => proto::InvokeImage {
                function_name: function.to_owned(),
                image: image.to_owned(),
            },
            None => proto::InvokeImage {
                function_name: String::new(),
                image: text.clone(),
            },
        })
        .collect();
    Ok(proto::BuildRequest {
        package_type: match args.package_type {
            PackageTypeArg::Zip => proto::PackageType::Zip,
            PackageTypeArg::Image => proto::PackageType::Image,
        } as i32,
        runtime: args.runtime.clone().unwrap_or_default(),
        image: args.image.clone().unwrap_or_default(),
        architecture: match args.arch {
            ArchArg::X86_64 => proto::Architecture::X8664,
            ArchArg::Arm64 => proto::Architecture::Arm64,
        } as i32,
        layers,
        invoke_images,
        function_name: args.function_name.clone().unwrap_or_default(),
        skip_pull_image,
        force_image_build,
    })
}

fn base_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    Some(name.strip_suffix(".zip").unwrap_or(name).to_owned())
}

fn print_json(value: &Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not worth a panic.
    let _ = writeln!(out, "{value}");
}

fn plan_json(plan: &proto::BuildPlan) -> Value {
    json!({
        "tag": plan.tag,
        "base_image": plan.base_image,
        "dockerfile": plan.dockerfile,
        "architecture": plan.architecture,
        "platform": plan.platform,
        "layers": plan.layers.iter().map(|l| json!({"name": l.name, "path": l.path})).collect::<Vec<_>>(),
        "invoke_image_used": plan.invoke_image_used,
        "package_type": plan.package_type,
        "runtime": plan.runtime,
    })
}

fn state_name(state: i32) -> &'static str {
    match proto::BuildState::try_from(state) {
        Ok(proto::BuildState::Queued) => "queued",
        Ok(proto::BuildState::Running) => "running",
        Ok(proto::BuildState::Succeeded) => "succeeded",
        Ok(proto::BuildState::Failed) => "failed",
        _ => "unknown",
    }
}

fn summary_json(s: &proto::BuildSummary) -> Value {
    json!({
        "build_id": s.build_id, "tag": s.tag, "started_unix_ms": s.started_unix_ms,
        "finished_unix_ms": s.finished_unix_ms, "subscribers": s.subscribers,
        "state": state_name(s.state), "image_id": s.image_id, "error": s.error,
    })
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Renders build events: JSON Lines, plain lines, or on a TTY engine output scrolling above a
/// live status line (elapsed time, build step, bytes of context sent; `indicatif`).
struct Render {
    json: bool,
    quiet: bool,
    /// The live status line, on a TTY only.
    bar: Option<indicatif::ProgressBar>,
    step: String,
    transfer: String,
}

impl Render {
    fn new(json: bool, quiet: bool) -> Render {
        let bar = (!json && !quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            let style = indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Render {
            json,
            quiet,
            bar,
            step: String::new(),
            transfer: String::new(),
        }
    }

    /// A line of output: above the status line on a TTY, else on stderr.
    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn status(&self) {
        if let Some(bar) = &self.bar {
            let parts: Vec<&str> = [self.step.as_str(), self.transfer.as_str()]
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect();
            bar.set_message(parts.join(" · "));
        }
    }

    fn event(&mut self, event: &proto::BuildEvent) {
        let Some(kind) = &event.event else { return };
        if self.json {
            print_json(&event_json(&event.build_id, kind));
            return;
        }
        match kind {
            Event::Completed(done) => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                let why = match (proto::reason_name(done.reason), done.changed_layer.as_str()) {
                    (reason, "") => reason.to_owned(),
                    (reason, layer) => format!("{reason}: {layer}"),
                };
                if done.cached {
                    println!("{} is up to date ({})", done.tag, short_id(&done.image_id));
                } else {
                    println!(
                        "built {} ({}) in {:.1} s, because {why}",
                        done.tag,
                        short_id(&done.image_id),
                        done.duration_ms as f64 / 1000.0
                    );
                }
            }
            _ if self.quiet => {}
            Event::Accepted(accepted) => {
                let how = if accepted.joined {
                    "joined the build in progress"
                } else {
                    "accepted"
                };
                self.line(format!("{} {how} (build {})", accepted.tag, event.build_id));
            }
            Event::Queued(queued) => {
                self.step = format!("queued at position {}", queued.position);
                self.line(format!(
                    "queued: position {} waiting for a build slot",
                    queued.position
                ));
                self.status();
            }
            Event::Log(log) => {
                if log.step > 0 {
                    self.step = format!("step {}", log.step);
                }
                self.line(format!("  {}", shorten(&log.text, 160)));
                self.status();
            }
            Event::PullProgress(pull) => {
                self.transfer = format!(
                    "pulling {}: {}/{}",
                    pull.image,
                    human_bytes(pull.current),
                    human_bytes(pull.total)
                );
                self.status();
            }
            Event::ContextProgress(progress) => {
                self.transfer = format!("context {} sent", human_bytes(progress.bytes_sent));
                if progress.bytes_total > 0 {
                    self.line(format!(
                        "context: {} sent",
                        human_bytes(progress.bytes_sent)
                    ));
                }
                self.status();
            }
            Event::Warning(warning) => {
                self.line(format!("warning [{}]: {}", warning.code, warning.message))
            }
        }
    }
}

impl Drop for Render {
    fn drop(&mut self) {
        // A failed build ends here: clear the status line before the error is printed.
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// At most `max` characters (engine lines such as our LABEL step can be very long).
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn event_json(build_id: &str, event: &Event) -> Value {
    match event {
        Event::Accepted(a) => {
            json!({"type": "accepted", "build_id": build_id, "tag": a.tag, "joined": a.joined})
        }
        Event::Queued(q) => json!({"type": "queued", "build_id": build_id, "position": q.position}),
        Event::Log(l) => json!({
            "type": "log", "build_id": build_id, "text": l.text, "step": l.step,
            "kind": match proto::LogKind::try_from(l.kind) {
                Ok(proto::LogKind::Status) => "status",
                Ok(proto::LogKind::Error) => "error",
                _ => "stream",
            },
        }),
        Event::PullProgress(p) => json!({
            "type": "pull_progress", "build_id": build_id, "image": p.image, "layer": p.layer,
            "current": p.current, "total": p.total,
        }),
        Event::ContextProgress(c) => json!({
            "type": "context_progress", "build_id": build_id, "bytes_sent": c.bytes_sent, "bytes_total": c.bytes_total,
        }),
        Event::Warning(w) => {
            json!({"type": "warning", "build_id": build_id, "code": w.code, "message": w.message})
        }
        Event::Completed(c) => {
            let config = c.config.clone().unwrap_or_default();
            json!({
                "type": "completed", "build_id": build_id, "tag": c.tag, "image_id": c.image_id,
                "cached": c.cached, "reason": proto::reason_name(c.reason), "changed_layer": c.changed_layer,
                "duration_ms": c.duration_ms,
                "config": {
                    "entrypoint": config.entrypoint, "cmd": config.cmd, "working_dir": config.working_dir,
                    "env": config.env, "architecture": config.architecture,
                },
            })
        }
    }
}
