//! Generates the `tandem.v1` gRPC code from proto/. Uses $PROTOC when set (e.g. Debian's
//! protobuf-compiler), else the protoc binary vendored by `protoc-bin-vendored`, so a plain
//! `cargo build` needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["tandem", "detector", "manager"].map(|name| format!("../proto/tandem/v1/{name}.proto"));
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = prost_build::Config::new();
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => path.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(protoc);
    // Values travel as `bytes::Bytes`, so log entries and checkpoints share buffers
    // instead of copying them.
    config.bytes([".tandem.v1"]);
    // Our codec: a malformed message is INVALID_ARGUMENT, not prost's INTERNAL.
    tonic_prost_build::configure().codec_path("crate::wire::ProtoCodec").compile_with_config(
        config,
        &protos,
        &["../proto".to_owned()],
    )?;
    Ok(())
}
