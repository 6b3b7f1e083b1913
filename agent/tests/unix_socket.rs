#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! The agent run by hand (not PID 1) on a Unix socket, driven with the generated ttrpc clients.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironclad_protocol::agent::{health_check_response::ServingStatus, CheckRequest, DestroySandboxRequest};
use ironclad_protocol::agent_ttrpc::{AgentClient, HealthClient};

struct Agent {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let address = format!("unix://{}", socket.display());
    let child = Command::new(env!("CARGO_BIN_EXE_ironclad-agent"))
        .args(["--listen", &address])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent did not create its socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    Agent { child, address, _dir: dir }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test]
async fn answers_health_and_version_then_exits_on_destroy_sandbox() {
    let mut agent = start_agent();
    let client = ttrpc::r#async::Client::connect(&agent.address).await.unwrap();
    let health = HealthClient::new(client.clone());
    let resp = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value_or_default(), ServingStatus::SERVING);
    let version = health.version(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, ironclad_protocol::API_VERSION);

    AgentClient::new(client.clone()).destroy_sandbox(ctx(), &DestroySandboxRequest::new()).await.unwrap();
    // The client keeps its connection open: the agent must not wait for it to go.
    let status = wait_exit(&mut agent.child, Duration::from_secs(10)).expect("agent did not exit");
    assert!(status.success(), "{status}");
    drop(client);
}

#[test]
fn rejects_a_bad_listen_address_with_the_reason() {
    let output = Command::new(env!("CARGO_BIN_EXE_ironclad-agent"))
        .args(["--listen", "tcp://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("neither vsock:// nor unix://"), "{stderr}");
}
