//! Kubernetes pods through CRI, ironclad next to runc in one private containerd (its CRI plugin
//! with both runtime handlers), runs interleaved: pod start (RunPodSandbox to the first container
//! running), a second container's start in the running pod, and the PSS of the idle two-container
//! pod.

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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cri(#[from] cri::Error),
    #[error("stopped by Ctrl-C; every pod it made is removed")]
    Interrupted,
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

/// One pod's figures: seconds to the first container running, seconds for the second, MiB.
struct PodRun {
    start_s: f64,
    second_s: f64,
    pss_mib: f64,
}

pub fn measure(settings: &Settings, stop: Arc<AtomicBool>) -> Result<Results, Error> {
    let kubelet = Kubelet::start(&settings.artifacts, "icbench")?;
    let mut samples: [BTreeMap<Runtime, Vec<f64>>; 3] = Default::default();
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
        }
    }
    let [start, second, pss] = samples;
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
        ],
    })
}

/// Starts a pod and two idle containers in it, measures, and removes it all (also on failure).
fn pod_run(kubelet: &Kubelet, runtime: Runtime, run: usize) -> Result<PodRun, Error> {
    let config = kubelet.pod_config(&format!("bench-{}-{run}", runtime.name()), NamespaceMode::Pod)?;
    let started = Instant::now();
    let pod = kubelet.run_pod(&config, handler(runtime))?;
    let measured = (|| {
        let first =
            kubelet.create_container(&pod, &config, container("first", &["sleep", "3600"], vec![]))?;
        kubelet.start_container(&first)?;
        let start_s = started.elapsed().as_secs_f64();
        let second_started = Instant::now();
        let second =
            kubelet.create_container(&pod, &config, container("second", &["sleep", "3600"], vec![]))?;
        kubelet.start_container(&second)?;
        let second_s = second_started.elapsed().as_secs_f64();
        std::thread::sleep(SETTLE);
        let pss_mib = pss_mib_of_tasks(&kubelet.containerd, std::slice::from_ref(&pod));
        Ok::<_, cri::Error>(PodRun { start_s, second_s, pss_mib })
    })();
    // StopPodSandbox stops its containers; RemovePodSandbox removes them with it.
    let removed = kubelet.stop_and_remove_pod(&pod);
    let measured = measured?;
    removed?;
    Ok(measured)
}
