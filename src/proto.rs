//! The generated wire types (`lambda_imaged.v1`) and the conversions between them and ours.
//! The only module that knows both sides.
//!
//! The generated code lives in the private module `generated`, re-exported here; it is the
//! only place lint allowances apply: the hand-written conversions below are checked like the rest of the crate. Every wire
//! type derives `serde::Serialize` (configured in `build.rs`); [`json`] holds the helpers that
//! print enum fields by name.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// The code `tonic-prost-build` generates from `proto/lambda_imaged/v1/image_builder.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::invalid_html_tags
)]
mod generated {
    tonic::include_proto!("lambda_imaged.v1");
}

pub use generated::*;

/// The file descriptor set served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("lambda_imaged_descriptor");

use crate::builds;
use crate::error::{Error, Result};
use crate::outcome;
use crate::resolve;

/// Parses the enums of a wire request; strings are validated by `resolve::resolve_with`.
pub fn request_from_wire(request: BuildRequest) -> Result<resolve::Request> {
    let package_type = match PackageType::try_from(request.package_type) {
        Ok(PackageType::Unspecified | PackageType::Zip) => resolve::PackageType::Zip,
        Ok(PackageType::Image) => resolve::PackageType::Image,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "package_type: unknown value {}; one of ZIP, IMAGE",
                request.package_type
            )));
        }
    };
    let arch = match Architecture::try_from(request.architecture) {
        Ok(Architecture::Unspecified | Architecture::X8664) => resolve::Arch::X86_64,
        Ok(Architecture::Arm64) => resolve::Arch::Arm64,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "architecture: unknown value {}; one of x86_64, arm64",
                request.architecture
            )));
        }
    };
    Ok(resolve::Request {
        package_type,
        runtime: request.runtime,
        image: request.image,
        arch,
        layers: request
            .layers
            .into_iter()
            .map(|layer| resolve::LayerSpec {
                name: layer.name,
                path: PathBuf::from(layer.path),
            })
            .collect(),
        invoke_images: request
            .invoke_images
            .into_iter()
            .map(|entry| resolve::InvokeImage {
                function: (!entry.function_name.is_empty()).then_some(entry.function_name),
                image: entry.image,
            })
            .collect(),
        function_name: request.function_name,
        skip_pull_image: request.skip_pull_image,
        force_image_build: request.force_image_build,
    })
}

impl From<&resolve::Plan> for BuildPlan {
    fn from(plan: &resolve::Plan) -> Self {
        BuildPlan {
            tag: plan.tag.as_str().to_owned(),
            base_image: plan.base.to_string(),
            dockerfile: plan.dockerfile.clone(),
            architecture: plan.arch.as_str().to_owned(),
            platform: plan.arch.platform().to_owned(),
            layers: plan.layers.iter().map(Layer::from).collect(),
            ignored_layers: plan.ignored_layers.iter().map(Layer::from).collect(),
            invoke_image_used: plan.invoke_image_used,
            package_type: plan.package_type.as_str().to_owned(),
            runtime: plan.runtime.clone().unwrap_or_default(),
        }
    }
}

impl From<&resolve::LayerSpec> for Layer {
    fn from(layer: &resolve::LayerSpec) -> Self {
        Layer {
            name: layer.name.clone(),
            path: layer.path.display().to_string(),
        }
    }
}

impl From<outcome::Reason> for Reason {
    fn from(reason: outcome::Reason) -> Self {
        match reason {
            outcome::Reason::UpToDate => Reason::UpToDate,
            outcome::Reason::Missing => Reason::Missing,
            outcome::Reason::Forced => Reason::Forced,
            outcome::Reason::BaseChanged => Reason::BaseChanged,
            outcome::Reason::LayerChanged => Reason::LayerChanged,
            outcome::Reason::RieChanged => Reason::RieChanged,
            outcome::Reason::DefinitionChanged => Reason::DefinitionChanged,
            outcome::Reason::RegistryHit => Reason::RegistryHit,
        }
    }
}

impl From<&outcome::Completed> for Completed {
    fn from(c: &outcome::Completed) -> Self {
        Completed {
            tag: c.tag.clone(),
            image_id: c.image_id.clone(),
            cached: c.cached,
            reason: Reason::from(c.reason) as i32,
            changed_layer: c.changed_layer.clone(),
            duration_ms: c.duration_ms,
            config: Some(ImageConfig {
                entrypoint: c.config.entrypoint.clone(),
                cmd: c.config.cmd.clone(),
                working_dir: c.config.working_dir.clone(),
                env: c.config.env.clone(),
                architecture: c.config.architecture.clone(),
            }),
            warnings: c
                .warnings
                .iter()
                .map(|(code, message)| Warning {
                    code: code.clone(),
                    message: message.clone(),
                })
                .collect(),
            pinned_tag: c.pinned_tag.clone(),
        }
    }
}

/// Wraps one of our events for the wire.
pub fn event_to_wire(build_id: &str, event: &outcome::Event) -> BuildEvent {
    use build_event::Event as E;
    let event = match event {
        outcome::Event::Queued { position } => E::Queued(Queued {
            position: *position,
        }),
        outcome::Event::Log { kind, text, step } => E::Log(Log {
            kind: match kind {
                outcome::LogKind::Stream => LogKind::Stream,
                outcome::LogKind::Status => LogKind::Status,
            } as i32,
            text: text.clone(),
            step: *step,
        }),
        outcome::Event::PullProgress {
            image,
            layer,
            current,
            total,
        } => E::PullProgress(PullProgress {
            image: image.clone(),
            layer: layer.clone(),
            current: *current,
            total: *total,
        }),
        outcome::Event::ContextProgress {
            bytes_sent,
            bytes_total,
        } => E::ContextProgress(ContextProgress {
            bytes_sent: *bytes_sent,
            bytes_total: *bytes_total,
        }),
        outcome::Event::Warning { code, message } => E::Warning(Warning {
            code: code.clone(),
            message: message.clone(),
        }),
        outcome::Event::Completed(completed) => E::Completed(completed.into()),
    };
    BuildEvent {
        build_id: build_id.to_owned(),
        event: Some(event),
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    u64::try_from(
        time.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0)
}

impl From<&builds::Summary> for BuildSummary {
    fn from(s: &builds::Summary) -> Self {
        BuildSummary {
            build_id: s.build_id.clone(),
            tag: s.tag.clone(),
            started_unix_ms: unix_ms(s.started),
            finished_unix_ms: s.finished.map(unix_ms).unwrap_or(0),
            subscribers: s.subscribers,
            state: match s.phase {
                outcome::Phase::Checking | outcome::Phase::Running => BuildState::Running,
                outcome::Phase::Queued => BuildState::Queued,
                outcome::Phase::Succeeded => BuildState::Succeeded,
                outcome::Phase::Failed => BuildState::Failed,
            } as i32,
            image_id: s.image_id.clone(),
            error: s.error.clone(),
            background: s.background,
        }
    }
}

/// snake_case name of a reason, as the CLI prints it (`layer_changed`; `unspecified` for 0 and
/// values this build does not know).
pub fn reason_name(reason: i32) -> &'static str {
    use outcome::Reason as R;
    let known = match Reason::try_from(reason) {
        Ok(Reason::UpToDate) => R::UpToDate,
        Ok(Reason::Missing) => R::Missing,
        Ok(Reason::Forced) => R::Forced,
        Ok(Reason::BaseChanged) => R::BaseChanged,
        Ok(Reason::LayerChanged) => R::LayerChanged,
        Ok(Reason::RieChanged) => R::RieChanged,
        Ok(Reason::DefinitionChanged) => R::DefinitionChanged,
        Ok(Reason::RegistryHit) => R::RegistryHit,
        Ok(Reason::Unspecified) | Err(_) => return "unspecified",
    };
    known.name()
}

/// Lowercase name of a build state, as the CLI prints it (`running`; `unknown` for 0 and values
/// this build does not know).
pub fn state_name(state: i32) -> &'static str {
    match BuildState::try_from(state) {
        Ok(BuildState::Queued) => "queued",
        Ok(BuildState::Running) => "running",
        Ok(BuildState::Succeeded) => "succeeded",
        Ok(BuildState::Failed) => "failed",
        Ok(BuildState::Unspecified) | Err(_) => "unknown",
    }
}

/// Lowercase name of a log line's kind, as the CLI prints it; anything but `status` and `error`
/// is engine output, `stream`.
pub fn log_kind_name(kind: i32) -> &'static str {
    match LogKind::try_from(kind) {
        Ok(LogKind::Status) => "status",
        Ok(LogKind::Error) => "error",
        Ok(LogKind::Stream | LogKind::Unspecified) | Err(_) => "stream",
    }
}

/// `serialize_with` helpers named in `build.rs`: prost keeps enum fields as `i32`, which JSON
/// readers should not have to decode.
pub mod json {
    use serde::{Serialize, Serializer};

    use super::{Architecture, PackageType};

    /// A `Reason` by [`reason_name`](super::reason_name).
    pub fn reason<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(super::reason_name(*value))
    }

    /// A `BuildState` by [`state_name`](super::state_name).
    pub fn build_state<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(super::state_name(*value))
    }

    /// A `LogKind` by [`log_kind_name`](super::log_kind_name).
    pub fn log_kind<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(super::log_kind_name(*value))
    }

    /// A `PackageType` by its proto name (`PACKAGE_TYPE_ZIP`), or the number if unknown.
    pub fn package_type<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
        match PackageType::try_from(*value) {
            Ok(known) => serializer.serialize_str(known.as_str_name()),
            Err(_) => serializer.serialize_i32(*value),
        }
    }

    /// An `Architecture` by its proto name (`ARCHITECTURE_ARM64`), or the number if unknown.
    pub fn architecture<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
        match Architecture::try_from(*value) {
            Ok(known) => serializer.serialize_str(known.as_str_name()),
            Err(_) => serializer.serialize_i32(*value),
        }
    }

    /// An optional message as its defaults when absent (an object, never `null`).
    pub fn or_default<T, S>(value: &Option<T>, serializer: S) -> Result<S::Ok, S::Error>
    where
        T: Serialize + Default,
        S: Serializer,
    {
        match value {
            Some(value) => value.serialize(serializer),
            None => T::default().serialize(serializer),
        }
    }
}
