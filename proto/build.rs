//! Compiles the .proto files with protox (a pure-Rust protobuf compiler), so a
//! fresh machine needs no `protoc` and no generated code is checked in.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/frame.proto", "proto/internal.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // Frames are shared, not copied: every `bytes` field of the internal services is a `bytes::Bytes`.
    tonic_prost_build::configure().bytes(".switchboard.internal").compile_fds(fds)?;
    Ok(())
}
