//! Events for containerd. Every event of the shim leaves through one channel and one forwarder
//! task, in the order it was sent, so a task's TaskStart always reaches containerd before its
//! TaskExit. OOM events come from the guest: only those naming a container of this shim pass,
//! at a bounded rate.

use std::time::{Duration, Instant};

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::TaskOOM;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::{topics, ttrpc};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::guest_text;

type Event = (&'static str, Box<dyn MessageDyn>);

/// The sending end: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<Event>,
}

impl Events {
    pub fn channel() -> (Events, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Events { tx }, rx)
    }

    pub fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        // Only fails once the forwarder is gone, when the shim is exiting and nobody listens.
        let _ = self.tx.send((topic, event));
    }
}

/// Publishes the events to containerd one after the other, until every sender is gone.
pub async fn forward(mut rx: mpsc::UnboundedReceiver<Event>, publisher: RemotePublisher, namespace: String) {
    while let Some((topic, event)) = rx.recv().await {
        let ctx = ttrpc::context::Context::default();
        if let Err(err) = publisher.publish(ctx, topic, &namespace, event).await {
            warn!("cannot publish {topic}: {err}");
        }
    }
}

/// Where OOM kills are reported from: the agent, or a stand-in in tests.
#[async_trait::async_trait]
pub trait OomSource: Send + Sync {
    /// The container the next OOM kill happened in; an error ends the forwarding.
    async fn next_oom(&self) -> Result<String, crate::agent_client::Error>;
}

#[async_trait::async_trait]
impl OomSource for crate::agent_client::AgentClient {
    async fn next_oom(&self) -> Result<String, crate::agent_client::Error> {
        self.get_oom_event().await
    }
}

/// At most this many OOM events at once, then one per OOM_EVENT_INTERVAL: a guest cannot flood
/// containerd's event bus.
pub const OOM_EVENT_BURST: u32 = 10;
pub const OOM_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// A token bucket: `capacity` events at once, one more each `interval`.
#[derive(Debug)]
pub struct RateLimit {
    capacity: u32,
    tokens: u32,
    interval: Duration,
    last_refill: Instant,
}

impl RateLimit {
    pub fn new(capacity: u32, interval: Duration, now: Instant) -> Self {
        RateLimit { capacity, tokens: capacity, interval, last_refill: now }
    }

    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last_refill);
        let earned = (elapsed.as_nanos() / self.interval.as_nanos().max(1)) as u64;
        if earned > 0 {
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(self.capacity)) as u32;
            self.last_refill += self.interval * u32::try_from(earned).unwrap_or(u32::MAX);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Passes the guest's OOM kills on as TaskOOM until the source fails or the VM goes. Only
/// containers `owns` knows are reported. Every report the guest sends, true or not, spends from
/// the rate limit, and past it the shim waits before it asks again: a guest answering at once,
/// forever, can neither flood containerd's event bus or log nor keep the shim busy.
pub async fn forward_oom_events(
    source: &dyn OomSource,
    owns: impl Fn(&str) -> bool,
    events: Events,
    mut gone: watch::Receiver<bool>,
) {
    let mut limit = RateLimit::new(OOM_EVENT_BURST, OOM_EVENT_INTERVAL, Instant::now());
    let (mut dropped, mut foreign): (u64, u64) = (0, 0);
    loop {
        let container_id = tokio::select! {
            event = source.next_oom() => match event {
                Ok(id) => id,
                Err(_) => return,
            },
            _ = gone.wait_for(|gone| *gone) => return,
        };
        if !limit.allow(Instant::now()) {
            dropped += 1;
            if dropped.is_power_of_two() {
                warn!("{dropped} OOM events of this sandbox dropped: more than the guest may send");
            }
            tokio::time::sleep(OOM_EVENT_INTERVAL).await;
            continue;
        }
        if !owns(&container_id) {
            foreign += 1;
            if foreign.is_power_of_two() {
                warn!(
                    "the guest reported an OOM kill in {:?}, which is not a container of this sandbox: \
                     ignored ({foreign} such reports so far)",
                    guest_text::escape(&container_id, 128)
                );
            }
            continue;
        }
        events.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(TaskOOM { container_id, ..Default::default() }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_rate_limit_allows_a_burst_then_one_per_interval() {
        let start = Instant::now();
        let mut limit = RateLimit::new(3, Duration::from_secs(1), start);
        assert_eq!((0..10).filter(|_| limit.allow(start)).count(), 3);
        assert!(!limit.allow(start + Duration::from_millis(999)));
        assert!(limit.allow(start + Duration::from_millis(1000)));
        assert!(!limit.allow(start + Duration::from_millis(1001)));
        // A long pause refills no more than the capacity.
        let later = start + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| limit.allow(later)).count(), 3);
    }

    /// A guest that reports whatever it likes, as fast as it likes, then hangs up.
    struct ForgingGuest(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl OomSource for ForgingGuest {
        async fn next_oom(&self) -> Result<String, crate::agent_client::Error> {
            let next = self.0.lock().unwrap().pop();
            next.ok_or(crate::agent_client::Error::NotServing {
                status: ironclad_protocol::agent::health_check_response::ServingStatus::NOT_SERVING,
            })
        }
    }

    // Paused time: the pauses the flood earns pass at once.
    #[tokio::test(start_paused = true)]
    async fn forged_and_flooding_oom_events_do_not_reach_containerd() {
        let mut reports: Vec<String> = Vec::new();
        for i in 0..1000 {
            reports.push(format!("other-pod-{i}"));
            reports.push("c1".into());
        }
        let guest = ForgingGuest(Mutex::new(reports));
        let (events, mut rx) = Events::channel();
        let (_gone_tx, gone) = watch::channel(false);
        forward_oom_events(&guest, |id| id == "c1", events, gone).await;
        let mut published = Vec::new();
        while let Ok((topic, event)) = rx.try_recv() {
            assert_eq!(topic, topics::TASK_OOM_EVENT_TOPIC);
            let event = event.downcast_box::<TaskOOM>().unwrap();
            published.push(event.container_id.clone());
        }
        assert!(published.iter().all(|id| id == "c1"), "{published:?}");
        // The whole flood arrived well within a second: no more than the burst, forged reports
        // spending from it too.
        assert!(!published.is_empty() && published.len() <= OOM_EVENT_BURST as usize, "{published:?}");
    }
}
