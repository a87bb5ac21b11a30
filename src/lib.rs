//! lambda-imaged: one daemon that builds AWS Lambda local-emulation images for every emulator
//! on a machine, with SAM CLI's tags, at most one build per tag, streaming what happens.
//!
//! # Layout
//! A request flows top to bottom:
//! - [`proto`]: the generated wire types and conversions; the only home of wire types.
//! - [`service`]: the gRPC service; the only code that sees `tonic::Request` and streams.
//! - [`access`]: who may use the daemon; reading layers with the peer's own rights.
//! - [`resolve`]: pure: request -> plan (tag, base, layers, Dockerfile); SAM's rules.
//! - [`reference`]: image reference parsing that keeps the user's spelling.
//! - [`archive`]: zip layers extracted once, safely, into the content-addressed cache.
//! - [`layers`]: walking layer sources into one merged /opt tree; per-layer content digests.
//! - [`stat_cache`]: file identity (stat key), content hashing, the persisted stat cache.
//! - [`fingerprint`]: pure: the digests that determine an image, its labels, rebuild or not.
//! - [`pipeline`]: one build from plan to image: walk, base, fingerprint, cache check, engine.
//! - [`context`]: the build context as a tar stream produced while the engine reads it.
//! - [`engine`]: the few engine calls we make, over one shared bollard client; image index.
//! - [`builds`]: the in-flight table: one build per tag, events replayed to late joiners.
//! - [`prune`]: removing our images and unused layers, least recently used first.
//! - [`server`]: serve on a listener with health and reflection until shutdown.
//! - [`listener`]: bind the Unix socket or adopt a systemd-passed one.
//! - [`h2_compat`]: an `:authority` h2 refuses (grpcio's socket path) rewritten on the way in.
//! - [`config`]: the daemon's settings, validated once.
//! - [`error`]: the one error enum and its mapping to gRPC statuses.
//! - [`client`]: connect to the daemon; used by the CLI, the tests and Rust emulators.

pub mod access;
pub mod archive;
pub mod builds;
pub mod client;
pub mod config;
pub mod context;
pub mod engine;
pub mod error;
pub mod fingerprint;
pub mod h2_compat;
pub mod layers;
pub mod listener;
pub mod pipeline;
pub mod proto;
pub mod prune;
pub mod reference;
pub mod resolve;
pub mod server;
pub mod service;
pub mod stat_cache;
