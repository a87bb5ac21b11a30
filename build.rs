//! Generates the gRPC code from `proto/` with a vendored `protoc` (a fresh machine has none)
//! and writes the file descriptor set that server reflection serves.
//!
//! Every wire type derives `serde::Serialize` so `lambda-imagectl --json` prints the messages
//! themselves: field names as in the proto (snake_case), enum fields by name through
//! `proto::json` (prost stores them as `i32`), the `BuildEvent.event` oneof flattened beside
//! `build_id` with its kind in a `type` field.

use std::{env, path::PathBuf};

const PACKAGE: &str = ".lambda_imaged.v1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lambda_imaged_descriptor.bin"))
        .type_attribute(PACKAGE, "#[derive(serde::Serialize)]")
        .type_attribute(
            format!("{PACKAGE}.BuildEvent.event"),
            r#"#[serde(tag = "type", rename_all = "snake_case")]"#,
        )
        // No leading dot: a suffix match, so the attribute lands on the `event` field only, not
        // (as the prefix `.lambda_imaged.v1.BuildEvent.event` would) on every oneof variant.
        .field_attribute("lambda_imaged.v1.BuildEvent.event", "#[serde(flatten)]")
        // Completed's copy of the build's warnings: the JSON lines already carry each warning
        // as its own event, so an empty list is left out (the CLI's output stays as it was).
        .field_attribute(
            "lambda_imaged.v1.Completed.warnings",
            r#"#[serde(skip_serializing_if = "Vec::is_empty")]"#,
        )
        // Keep-warm off: no `keep_warm` key (the CLI's output stays as it was).
        .field_attribute(
            "lambda_imaged.v1.GetInfoResponse.keep_warm",
            r#"#[serde(skip_serializing_if = "Option::is_none")]"#,
        );
    // (message.field, helper in src/proto.rs `json`): enum fields by name, and optional
    // messages the CLI always printed as an object (their defaults when absent).
    for (field, helper) in [
        ("BuildRequest.package_type", "package_type"),
        ("BuildRequest.architecture", "architecture"),
        ("Log.kind", "log_kind"),
        ("Completed.reason", "reason"),
        ("Completed.config", "or_default"),
        ("BuildSummary.state", "build_state"),
        ("GetInfoResponse.engine", "or_default"),
    ] {
        config = config.field_attribute(
            format!("{PACKAGE}.{field}"),
            format!(r#"#[serde(serialize_with = "crate::proto::json::{helper}")]"#),
        );
    }
    config.compile_protos(&["proto/lambda_imaged/v1/image_builder.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
