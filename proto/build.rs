//! Compiles the `.proto` files under `proto/` into Rust with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/inference/grpc_service.proto",
        "proto/inference/model_config.proto",
        "proto/fulcrum/v1/node.proto",
        "proto/fulcrum/v1/policy.proto",
        "proto/fulcrum/v1/routing.proto",
        "proto/fulcrum/v1/admin.proto",
        "proto/fulcrum/v1/sim.proto",
        "proto/fulcrum/v1/registration.proto",
        "proto/fulcrum/v1/tasks.proto",
    ];
    tonic_prost_build::configure()
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
