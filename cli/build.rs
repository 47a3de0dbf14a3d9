//! Generates the client of the few etcd v3 calls `tandem bench compare` makes, from
//! cli/bench/etcd.proto. Uses $PROTOC when set, else the protoc binary vendored by
//! `protoc-bin-vendored` (as replica/build.rs does), so a plain `cargo build` needs
//! nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "cli/bench/etcd.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = prost_build::Config::new();
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => path.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(protoc);
    config.bytes(["."]);
    tonic_prost_build::configure().build_server(false).compile_with_config(
        config,
        &[proto],
        &["cli/bench"],
    )?;
    Ok(())
}
