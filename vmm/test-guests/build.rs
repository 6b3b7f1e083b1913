//! Compiles every `guests/*.c` into a freestanding ELF guest with gcc. The flags matter: no SSE
//! (`-mgeneral-regs-only`), no red zone, no PIE, no CET `endbr64`, nothing from libc.

use std::path::{Path, PathBuf};
use std::process::Command;

const FLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-nostdlib",
    "-static",
    "-Wall",
    "-Werror",
    "-Wl,--build-id=none",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let guests = Path::new("guests");
    println!("cargo:rerun-if-changed=guests");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(guests)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "c") {
            let name = path.file_stem().and_then(|s| s.to_str()).ok_or("bad guest file name")?.to_string();
            build_guest(&path, &out_dir.join(format!("{name}.elf")))?;
            names.push(name);
        }
    }
    names.sort();
    let mut index = String::new();
    for name in names {
        index.push_str(&format!(
            "/// The `{name}` test guest (guests/{name}.c).\npub const {}: &str = concat!(env!(\"OUT_DIR\"), \"/{name}.elf\");\n",
            name.to_uppercase()
        ));
    }
    std::fs::write(out_dir.join("guests.rs"), index)?;
    Ok(())
}

fn build_guest(source: &Path, output: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "gcc".to_string());
    let status = Command::new(&compiler)
        .args(FLAGS)
        .arg("-Wl,-T,guests/link.ld")
        .arg("-Iguests")
        .arg("-o")
        .arg(output)
        .arg("guests/start.S")
        .arg(source)
        .status()
        .map_err(|e| format!("cannot run {compiler} to build the test guests: {e}"))?;
    if !status.success() {
        return Err(format!("{compiler} failed to build {} ({status})", source.display()).into());
    }
    Ok(())
}
