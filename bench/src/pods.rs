//! Kubernetes pods through CRI, ironclad next to runc in one private containerd (its CRI plugin
//! with both runtime handlers), runs interleaved: pod start (RunPodSandbox to the first container
//! running), a second container's start in the running pod, the PSS of the idle two-container
//! pod; then the pod's network from a peer on its CNI bridge: TCP connect round trip to the pod,
//! and a bulk transfer from it, checksummed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ironclad_tests::containerd::{Artifacts, CRI_HANDLER};
use ironclad_tests::cri::api::NamespaceMode;
use ironclad_tests::cri::{self, container, Kubelet, RUNC_HANDLER};
use serde::Serialize;

use crate::runtimes::{figure, pss_mib_of_tasks, Figure, Runtime, RUNTIMES};

/// How long a pod sits idle before its memory is read: the guest's boot-time work is over.
const SETTLE: Duration = Duration::from_secs(2);
/// The pod's ports: one that accepts and closes (connect round trip), one that serves the blob.
const CONNECT_PORT: u16 = 7000;
const BLOB_PORT: u16 = 7001;
/// Connects timed per pod; the pod's figure is their median.
const CONNECTS: usize = 20;
/// The bulk transfer: random bytes the pod's third container writes, then serves.
const BLOB_MIB: usize = 32;
const NETWORK_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cri(#[from] cri::Error),
    #[error("stopped by Ctrl-C; every pod it made is removed")]
    Interrupted,
    #[error("the pod's network with {runtime}: {message}")]
    Network { runtime: &'static str, message: String },
}

pub struct Settings {
    /// The backend the shim will use, and why.
    pub backend: String,
    pub runs: usize,
    pub artifacts: Artifacts,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub hypervisor: String,
    pub runs: usize,
    pub figures: Vec<Figure>,
}

fn handler(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Ironclad => CRI_HANDLER,
        Runtime::Runc => RUNC_HANDLER,
    }
}

/// One pod's figures: seconds to the first container running, seconds for the second, MiB;
/// the median connect round trip (ms) and the transfer's throughput (MiB/s).
struct PodRun {
    start_s: f64,
    second_s: f64,
    pss_mib: f64,
    connect_ms: f64,
    transfer_mib_s: f64,
}

pub fn measure(settings: &Settings, stop: Arc<AtomicBool>) -> Result<Results, Error> {
    let kubelet = Kubelet::start(&settings.artifacts, "icbench")?;
    let mut samples: [BTreeMap<Runtime, Vec<f64>>; 5] = Default::default();
    for run in 0..settings.runs {
        for runtime in RUNTIMES {
            if stop.load(Ordering::SeqCst) {
                return Err(Error::Interrupted);
            }
            eprintln!("ironclad-bench pods: run {}/{} with {}", run + 1, settings.runs, runtime.name());
            let measured = pod_run(&kubelet, runtime, run)?;
            samples[0].entry(runtime).or_default().push(measured.start_s);
            samples[1].entry(runtime).or_default().push(measured.second_s);
            samples[2].entry(runtime).or_default().push(measured.pss_mib);
            samples[3].entry(runtime).or_default().push(measured.connect_ms);
            samples[4].entry(runtime).or_default().push(measured.transfer_mib_s);
        }
    }
    let [start, second, pss, connect, transfer] = samples;
    Ok(Results {
        hypervisor: settings.backend.clone(),
        runs: settings.runs,
        figures: vec![
            figure("pod start", "s", "RunPodSandbox, CreateContainer and StartContainer of the first container", &start),
            figure("second container start", "s", "CreateContainer and StartContainer of a second container in the running pod", &second),
            figure(
                "idle two-container pod",
                "MiB",
                "PSS of the pod's host processes (shim, VM and helpers; or shim, pause and containers) with both containers idle",
                &pss,
            ),
            figure(
                "TCP connect round trip",
                "ms",
                "connect() from a peer on the pod's CNI bridge to a listener in the pod, median of 20 per pod",
                &connect,
            ),
            figure(
                "bulk transfer from the pod",
                "MiB/s",
                "32 MiB of random bytes served by the pod to that peer, from connect to the last byte; its sha256 checked against the pod's",
                &transfer,
            ),
        ],
    })
}

/// Starts a pod and two idle containers in it, measures, and removes it all (also on failure).
fn pod_run(kubelet: &Kubelet, runtime: Runtime, run: usize) -> Result<PodRun, Error> {
    let config = kubelet.pod_config(&format!("bench-{}-{run}", runtime.name()), NamespaceMode::Pod)?;
    let started = Instant::now();
    let pod = kubelet.run_pod(&config, handler(runtime))?;
    let measured = (|| {
        let listener = ["nc", "-ll", "-p", "7000", "-e", "true"];
        let first = kubelet.create_container(&pod, &config, container("first", &listener, vec![]))?;
        kubelet.start_container(&first)?;
        let start_s = started.elapsed().as_secs_f64();
        let second_started = Instant::now();
        let second =
            kubelet.create_container(&pod, &config, container("second", &["sleep", "3600"], vec![]))?;
        kubelet.start_container(&second)?;
        let second_s = second_started.elapsed().as_secs_f64();
        std::thread::sleep(SETTLE);
        let pss_mib = pss_mib_of_tasks(&kubelet.containerd, std::slice::from_ref(&pod));
        Ok::<_, Error>((start_s, second_s, pss_mib))
    })()
    .and_then(|(start_s, second_s, pss_mib)| {
        let (connect_ms, transfer_mib_s) = measure_network(kubelet, runtime, &pod, &config)?;
        Ok(PodRun { start_s, second_s, pss_mib, connect_ms, transfer_mib_s })
    });
    // StopPodSandbox stops its containers; RemovePodSandbox removes them with it.
    let removed = kubelet.stop_and_remove_pod(&pod);
    let measured = measured?;
    removed?;
    Ok(measured)
}

/// The pod's network from a peer on its bridge: the connect round trip to the first container's
/// listener, then a third container that writes a random blob and serves it.
fn measure_network(
    kubelet: &Kubelet,
    runtime: Runtime,
    pod: &str,
    config: &cri::api::PodSandboxConfig,
) -> Result<(f64, f64), Error> {
    let fail = |message: String| Error::Network { runtime: runtime.name(), message };
    let ip: std::net::IpAddr = kubelet
        .pod_status(pod)?
        .network
        .map(|n| n.ip)
        .unwrap_or_default()
        .parse()
        .map_err(|_| fail("the pod has no CNI address".into()))?;
    let serve = format!(
        "head -c {} /dev/urandom > /blob && sha256sum /blob > /blob.sha256 && nc -ll -p {BLOB_PORT} -e cat /blob",
        BLOB_MIB << 20
    );
    let server = kubelet.create_container(pod, config, container("blob", &["sh", "-c", &serve], vec![]))?;
    kubelet.start_container(&server)?;
    let expected = wait_for_checksum(kubelet, &server).map_err(fail)?;
    let peer = kubelet.in_network(move || -> Result<(f64, f64, String), String> {
        let connect_ms = median_connect_ms(std::net::SocketAddr::new(ip, CONNECT_PORT))?;
        let (seconds, bytes, sha256) = receive(std::net::SocketAddr::new(ip, BLOB_PORT))?;
        if bytes != (BLOB_MIB << 20) as u64 {
            return Err(format!("received {bytes} bytes, not {BLOB_MIB} MiB"));
        }
        Ok((connect_ms, (bytes as f64 / f64::from(1 << 20)) / seconds, sha256))
    });
    let (connect_ms, mib_s, sha256) =
        peer.join().map_err(|_| fail("the peer thread panicked".into()))?.map_err(fail)?;
    if sha256 != expected {
        return Err(fail(format!("the blob arrived with sha256 {sha256}, the pod's is {expected}")));
    }
    Ok((connect_ms, mib_s))
}

/// The blob's sha256 as the pod computed it, once it has.
fn wait_for_checksum(kubelet: &Kubelet, server: &str) -> Result<String, String> {
    let deadline = Instant::now() + NETWORK_TIMEOUT;
    loop {
        let response = kubelet.exec(server, &["cat", "/blob.sha256"]).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response.stdout);
        if let Some(sum) = text.split_whitespace().next().filter(|s| s.len() == 64) {
            return Ok(sum.to_string());
        }
        if Instant::now() > deadline {
            return Err(format!("the blob was not ready within {NETWORK_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The median of CONNECTS timed connects; the first ones may wait for the listener to be up.
fn median_connect_ms(address: std::net::SocketAddr) -> Result<f64, String> {
    let mut samples = Vec::with_capacity(CONNECTS);
    let deadline = Instant::now() + NETWORK_TIMEOUT;
    while samples.len() < CONNECTS {
        let started = Instant::now();
        match std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10)) {
            Ok(stream) => {
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
                drop(stream);
            }
            Err(_) if samples.is_empty() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(err) => return Err(format!("connect to {address}: {err}")),
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Reads everything the server sends: seconds from connect to the last byte, bytes, sha256.
fn receive(address: std::net::SocketAddr) -> Result<(f64, u64, String), String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10))
        .map_err(|e| format!("connect to {address}: {e}"))?;
    stream.set_read_timeout(Some(NETWORK_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = stream.read(&mut buffer).map_err(|e| format!("reading from {address}: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((seconds, bytes, sha256))
}
