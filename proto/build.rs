//! Compiles `proto/warren/control/v1/control.proto` with a vendored `protoc`, so a fresh machine
//! needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_env_set(&protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::Codec")
        .compile_protos(&["proto/warren/control/v1/control.proto"], &["proto"])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_env_set(protoc: &std::path::Path) {
    // SAFETY: the build script has no other threads that could read the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
}
