//! Compiles `storage.proto` with protox (pure Rust), so the workspace builds
//! with cargo alone: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=storage.proto");
    let descriptors = protox::compile(["storage.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
