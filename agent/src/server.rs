//! The agent's ttrpc server: health and sandbox services over vsock (or a Unix socket in tests).

use std::sync::Arc;

use async_trait::async_trait;
use ironclad_protocol::agent::{
    health_check_response::ServingStatus, CheckRequest, DestroySandboxRequest, Empty, HealthCheckResponse,
    VersionCheckResponse,
};
use ironclad_protocol::{agent_ttrpc, API_VERSION};
use tokio::sync::mpsc;
use tracing::info;
use ttrpc::r#async::{Server, TtrpcContext};

use crate::clock::uptime_ms;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {address}")]
    Listen {
        address: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("ttrpc server failed to start")]
    Start(#[source] ttrpc::Error),
    #[error("cannot install the SIGCHLD handler")]
    Signal(#[source] std::io::Error),
}

/// The one line the host waits for on the console; its format is part of the harness contract.
pub fn ready_line(uptime_ms: u64) -> String {
    format!("ironclad-agent ready version={AGENT_VERSION} uptime_ms={uptime_ms}")
}

struct HealthService;

#[async_trait]
impl agent_ttrpc::Health for HealthService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<HealthCheckResponse> {
        let mut resp = HealthCheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<VersionCheckResponse> {
        let mut resp = VersionCheckResponse::new();
        resp.agent_version = AGENT_VERSION.to_string();
        resp.api_version = API_VERSION;
        resp.uptime_ms = uptime_ms();
        Ok(resp)
    }
}

struct AgentService {
    destroy: mpsc::Sender<()>,
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        info!("sandbox destroy requested");
        // A full channel means a destroy is already under way, which is what the caller wants.
        let _ = self.destroy.try_send(());
        Ok(Empty::new())
    }
}

/// Serves until DestroySandbox is called, then stops the server (letting the reply go out first).
pub async fn serve(address: &str) -> Result<(), Error> {
    let (destroy_tx, mut destroy_rx) = mpsc::channel(1);
    let health: Arc<dyn agent_ttrpc::Health + Send + Sync> = Arc::new(HealthService);
    let agent: Arc<dyn agent_ttrpc::Agent + Send + Sync> = Arc::new(AgentService { destroy: destroy_tx });
    let mut server = Server::new()
        .bind(address)
        .map_err(|source| Error::Listen {
            address: address.to_string(),
            source,
        })?
        .register_service(agent_ttrpc::create_health(health))
        .register_service(agent_ttrpc::create_agent(agent));
    server.start().await.map_err(Error::Start)?;
    println!("{}", ready_line(uptime_ms()));
    info!("serving the agent API on {address}");
    destroy_rx.recv().await;
    // Graceful: in-flight replies, the DestroySandbox answer among them, are written before we return.
    let _ = server.shutdown().await;
    info!("agent server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_carries_version_and_uptime() {
        assert_eq!(
            ready_line(42),
            format!("ironclad-agent ready version={AGENT_VERSION} uptime_ms=42")
        );
    }
}
