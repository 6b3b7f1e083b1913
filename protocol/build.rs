use std::fs;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &["protos/agent.proto", "protos/runtimeoptions.proto"];
const GENERATED: &[&str] = &["agent.rs", "agent_ttrpc.rs", "runtimeoptions.rs"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize { async_all: true, ..Default::default() })
        .run()?;
    for file in GENERATED {
        strip_inner_attributes(&out_dir.join(file))?;
    }
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}

/// Generated files start with crate-level `#![...]` attributes and `//!` docs, which `include!`
/// inside a module rejects; lib.rs puts the equivalent `#[allow]`s on the including module.
fn strip_inner_attributes(path: &Path) -> std::io::Result<()> {
    let text = fs::read_to_string(path)?;
    let kept: Vec<&str> =
        text.lines().filter(|line| !(line.starts_with("#![") || line.starts_with("//!"))).collect();
    fs::write(path, kept.join("\n"))
}
