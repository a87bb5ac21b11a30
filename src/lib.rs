//! lambda-imaged: one daemon that builds AWS Lambda local-emulation images for every emulator
//! on a machine, with SAM CLI's tags, at most one build per tag, streaming what happens.
//!
//! # Layout
//! A code map, in the order one `Build` request meets the modules. Public, for emulators and
//! the binaries: [`client`], [`proto`], [`server`], [`listener`], [`config`], [`error`],
//! [`metrics`] (and [`unix_client`], for the benchmarks); the rest is internal (`pub(crate)`),
//! so it can change without breaking anyone.
//! No module imports another that imports it back, at any distance (`tests/architecture.rs`).
//!
//! - [`listener`]: bind the Unix socket or adopt a systemd-passed one.
//! - `h2_compat`: an `:authority` h2 refuses (grpcio's socket path) rewritten on the way in;
//!   a connection that starts with a valid one passes through unread.
//! - `service`: the gRPC service; the only code that sees `tonic::Request` and streams.
//! - `access`: who may use the daemon; reading layers with the peer's own rights. The only
//!   module that changes thread credentials.
//! - [`proto`]: the generated wire types and conversions; the only home of wire types.
//! - `resolve`: request -> plan (tag, base, layers, Dockerfile); SAM's rules. Pure.
//! - `reference`: image reference parsing that keeps the user's spelling. Pure.
//! - `builds`: the in-flight table: one build per tag, events replayed to late joiners.
//! - `outcome`: the vocabulary of a build's story: events, reasons, phases, the result.
//! - `pipeline`: one build's table of contents, step by step: walk, base, fingerprint, cache
//!   check, assembly, load, after the build.
//! - `layers`: step 1, walking layer sources into one merged /opt tree; per-layer digests.
//! - `archive`: zip layers extracted once, safely, into the content-addressed cache.
//! - `lambda_rules`: Lambda's rules that warn, never refuse (unreadable files, more than five
//!   layers, more than 250 MB unzipped, executables of another architecture). Pure.
//! - `atomic_file`: the one way a cache file is replaced (temp, fsync, rename, fsync dir).
//! - `stat_cache`: file identity (stat key), content hashing, the persisted stat cache.
//! - `base`: step 2, the base image: present, pulled (one pull per base), fresh (one
//!   background registry check per base per TTL, shared); its identity and the archive format
//!   over it on this engine.
//! - `fingerprint`: step 3, the digests that determine an image, its labels, rebuild or not.
//!   Pure.
//! - `registry_cache`: the fleet's registry cache: look a fingerprint up and pull it before a
//!   cold build, push after a build; credentials from the docker config; what may be shared.
//!   A pull is adopted only when its rootfs and config are exactly what the request's files
//!   build.
//! - `registry_policy`: whether to look in the registry cache at all: a local build's and a
//!   pull's estimated cost, from rates learned from this daemon's loads and pulls. Pure but for
//!   those rates.
//! - `assembly`: step 4's plan, what to send the engine: full, delta or squash, from the
//!   image store. No engine I/O.
//! - `image_store`: diff IDs by content, chains the engine holds, image listings for deltas.
//! - `assemble`: the image archive (layer tars, config, manifest) produced while the engine
//!   loads it: a `docker save` archive whose held layers are zero-size entries, or (its
//!   `oci_layout`, Docker's containerd store) an OCI layout naming the blobs the store holds.
//! - `engine`: the few engine calls we make, over one shared bollard client; image index; its
//!   `content`: an image's manifest facts (config digest, layer descriptors) read from its
//!   export. The only module that talks to the engine.
//! - `keep_warm`: after a request, the layer sources of the images served within the
//!   `--keep-warm` window are watched (inotify through `notify`, bounded, a stat walk past the
//!   bound); a change rebuilds the image in the background through `builds` (debounced; a
//!   request joins it). Never writes; rebuilds read layers as the request's peer.
//! - `prune`: removing our images and unused layers, least recently used first.
//! - `sync`: the one poison-recovering `lock()` (and `read`, `write`).
//! - [`tasks`]: the daemon's background work, named, awaited at shutdown (none is dropped
//!   silently).
//! - `tag_hints`: bounded per-tag hints that only save work.
//! - [`server`]: serve on a listener with health and reflection until shutdown.
//! - [`metrics`]: Prometheus series and the opt-in `/metrics` HTTP listener.
//! - [`config`]: the daemon's settings, validated once.
//! - [`error`]: the one error enum and its mapping to gRPC statuses.
//! - [`client`]: the typed client (connect or wait, build to completion, the other RPCs,
//!   `[NAME=]PATH` layer arguments, a request builder); the CLI, tests and bench use it.

pub(crate) mod access;
pub(crate) mod archive;
pub(crate) mod assemble;
pub(crate) mod assembly;
pub(crate) mod atomic_file;
pub(crate) mod base;
pub(crate) mod builds;
pub mod client;
pub mod config;
pub(crate) mod engine;
pub mod error;
pub(crate) mod fingerprint;
pub(crate) mod h2_compat;
pub(crate) mod image_store;
pub(crate) mod keep_warm;
pub(crate) mod lambda_rules;
pub(crate) mod layers;
pub mod listener;
pub mod metrics;
pub(crate) mod outcome;
pub(crate) mod pipeline;
pub mod proto;
pub(crate) mod prune;
pub(crate) mod reference;
pub(crate) mod registry_cache;
pub(crate) mod registry_policy;
pub(crate) mod resolve;
pub mod retire;
pub mod server;
pub(crate) mod service;
pub(crate) mod stat_cache;
pub(crate) mod sync;
pub(crate) mod tag_hints;
pub mod tasks;

/// The engine client the daemon makes for a `unix://` engine (`engine.rs`), public for the
/// benchmarks: `warm_hit` times the engine's own inspect over a client made the same way.
pub use engine::unix_client;
