//! The outcome vocabulary of a build, shared by the steps that produce it (`pipeline`), the
//! table that fans it out (`builds`), the wire (`proto`) and the metrics: the events a build
//! emits, why it ran, where it is, and what it produced. Plain data; no I/O.

use crate::engine::RunConfig;

/// Kind of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// The engine's own output (`stream` in its JSON messages).
    Stream,
    /// What the daemon says it is doing.
    Status,
}

/// Why a build ran, or why none did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    UpToDate,
    Missing,
    Forced,
    BaseChanged,
    LayerChanged,
    RieChanged,
    DefinitionChanged,
    /// Pulled from the registry cache: another daemon had built the same fingerprint.
    RegistryHit,
}

impl Reason {
    /// The reason's one name, `snake_case` as the proto's enum values without their prefix
    /// (`layer_changed`): the CLI prints it, the metrics label it, JSON carries it.
    pub fn name(self) -> &'static str {
        match self {
            Reason::UpToDate => "up_to_date",
            Reason::Missing => "missing",
            Reason::Forced => "forced",
            Reason::BaseChanged => "base_changed",
            Reason::LayerChanged => "layer_changed",
            Reason::RieChanged => "rie_changed",
            Reason::DefinitionChanged => "definition_changed",
            Reason::RegistryHit => "registry_hit",
        }
    }
}

/// A successful outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    pub tag: String,
    pub image_id: String,
    pub cached: bool,
    pub reason: Reason,
    pub changed_layer: String,
    pub duration_ms: u64,
    pub config: RunConfig,
    /// `(code, message)` of every `Warning` event of the build, in order: filled in when the
    /// build finishes (`builds.rs`), so a client that reads only the outcome sees them too.
    pub warnings: Vec<(String, String)>,
    /// With layers: the image's pinned tag (`retire::pin_of`), empty otherwise.
    pub pinned_tag: String,
}

/// One event of a build (the wire's `BuildEvent` minus `Accepted`, which is per client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Queued {
        position: u32,
    },
    Log {
        kind: LogKind,
        text: String,
        step: u32,
    },
    PullProgress {
        image: String,
        layer: String,
        current: u64,
        total: u64,
    },
    ContextProgress {
        bytes_sent: u64,
        bytes_total: u64,
    },
    Warning {
        code: String,
        message: String,
    },
    Completed(Completed),
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Checking the base and whether the existing image is current.
    Checking,
    /// Waiting for a build slot.
    Queued,
    /// The engine is building.
    Running,
    Succeeded,
    Failed,
}
