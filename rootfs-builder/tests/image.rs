#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ironclad_rootfs_builder::{build_image, image_nodes, sha256_hex, Error, ImageSpec};

fn fake_executable(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// (name, mode, rdev major, data) of every member, read back with a real cpio reader.
fn unpack(image: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
    let mut members = Vec::new();
    let mut cursor: &[u8] = image;
    loop {
        let mut reader = cpio::NewcReader::new(cursor).unwrap();
        if reader.entry().is_trailer() {
            break;
        }
        let entry = reader.entry();
        let (name, mode, major) = (entry.name().to_string(), entry.mode(), entry.rdev_major());
        let mut data = Vec::new();
        reader.read_to_end(&mut data).unwrap();
        members.push((name, mode, major, data));
        cursor = reader.finish().unwrap();
    }
    members
}

#[test]
fn image_holds_the_agent_as_init_and_the_skeleton() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_executable(dir.path(), "agent", b"\x7fELF agent");
    let image = build_image(&image_nodes(&ImageSpec { agent, debug_shell: None }).unwrap()).unwrap();
    let members = unpack(&image.bytes);
    let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(names, ["dev", "dev/console", "etc", "init", "proc", "root", "run", "sys", "tmp"]);
    let init = members.iter().find(|m| m.0 == "init").unwrap();
    assert_eq!(init.1, 0o100755);
    assert_eq!(init.3, b"\x7fELF agent");
    let console = members.iter().find(|m| m.0 == "dev/console").unwrap();
    assert_eq!((console.1, console.2), (0o020600, 5));
    assert!(!names.contains(&"bin/busybox"), "the default image holds the agent alone");
}

#[test]
fn same_inputs_give_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_executable(dir.path(), "agent", b"agent bytes");
    let spec = ImageSpec { agent: agent.clone(), debug_shell: None };
    let first = build_image(&image_nodes(&spec).unwrap()).unwrap();
    // A later mtime on the input must not change the output.
    std::fs::write(&agent, b"agent bytes").unwrap();
    let second = build_image(&image_nodes(&spec).unwrap()).unwrap();
    assert_eq!(first.bytes, second.bytes);
    assert_eq!(first.manifest.sha256, sha256_hex(&first.bytes));
}

#[test]
fn debug_shell_adds_busybox_and_sh() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_executable(dir.path(), "agent", b"agent");
    let busybox = fake_executable(dir.path(), "busybox", b"busybox");
    let image = build_image(&image_nodes(&ImageSpec { agent, debug_shell: Some(busybox) }).unwrap()).unwrap();
    let members = unpack(&image.bytes);
    let sh = members.iter().find(|m| m.0 == "bin/sh").unwrap();
    assert_eq!((sh.1, sh.3.as_slice()), (0o120777, b"busybox".as_slice()));
    let manifest_busybox = image.manifest.entries.iter().find(|e| e.path == "/bin/busybox").unwrap();
    assert_eq!(manifest_busybox.sha256.as_deref(), Some(sha256_hex(b"busybox").as_str()));
    assert_eq!(manifest_busybox.size, 7);
}

#[test]
fn missing_or_non_executable_agent_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = image_nodes(&ImageSpec { agent: missing.clone(), debug_shell: None }).unwrap_err();
    assert!(matches!(&err, Error::ReadInput { path, .. } if *path == missing), "{err}");
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"x").unwrap();
    let err = image_nodes(&ImageSpec { agent: plain, debug_shell: None }).unwrap_err();
    assert!(matches!(err, Error::NotExecutable { .. }), "{err}");
}

#[test]
fn cli_prints_the_same_sha256_twice_and_writes_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_executable(dir.path(), "agent", b"cli agent");
    let run = |out: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_ironclad-rootfs"))
            .arg("--agent")
            .arg(&agent)
            .arg("--output")
            .arg(dir.path().join(out))
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let (first, second) = (run("a.img"), run("b.img"));
    assert_eq!(first, second);
    assert_eq!(first.len(), 64);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("a.img.manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["sha256"], first.as_str());
    assert!(manifest["entries"].as_array().unwrap().iter().any(|e| e["path"] == "/init"));
}

#[test]
fn cli_names_the_missing_agent() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ironclad-rootfs"))
        .args(["--agent", "/nonexistent/agent", "--output"])
        .arg(dir.path().join("x.img"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/agent"), "{stderr}");
    assert!(!dir.path().join("x.img").exists());
}
