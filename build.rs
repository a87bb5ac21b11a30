//! Generates the gRPC code from `proto/` with a vendored `protoc` (a fresh machine has none)
//! and writes the file descriptor set that server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lambda_imaged_descriptor.bin"))
        .compile_protos(&["proto/lambda_imaged/v1/image_builder.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
