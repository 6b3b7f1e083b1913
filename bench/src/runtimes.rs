//! ironclad against runc through one private containerd, on the same locally built image, with the
//! runs of both runtimes interleaved so that they share the machine's noise.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use ironclad_tests::containerd::{
    self, Artifacts, Containerd, BUSYBOX_IMAGE, IRONCLAD_RUNTIME, RUNC_RUNTIME,
};
use serde::Serialize;

use crate::stats::{summarize, Summary};
use crate::timeline;
use ironclad_tests::pool::PoolDaemon;

/// The runtimes, in the order every figure runs them.
pub const RUNTIMES: [Runtime; 2] = [Runtime::Ironclad, Runtime::Runc];
const TASK_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a run's timeline may take to reach containerd's log after `ctr run` returned.
const TIMELINE_WAIT: Duration = Duration::from_secs(3);

/// One cold start: its times (s), and for ironclad its phases (ms, see [`timeline::PHASES`]).
struct ColdStart {
    total: f64,
    first_output: f64,
    phases: Option<Vec<f64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Containerd(#[from] containerd::Error),
    #[error("stopped by Ctrl-C; every container it made is removed")]
    Interrupted,
    #[error("{figure} with {runtime}: {message}")]
    Run { figure: &'static str, runtime: &'static str, message: String },
    #[error("the guest is not built: {0}")]
    Guest(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Ironclad,
    Runc,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Ironclad => "ironclad",
            Runtime::Runc => "runc",
        }
    }

    fn containerd_runtime(self) -> &'static str {
        match self {
            Runtime::Ironclad => IRONCLAD_RUNTIME,
            Runtime::Runc => RUNC_RUNTIME,
        }
    }
}

pub struct Settings {
    /// The backend the shim will use, and why (`auto` resolved as the shim resolves it).
    pub backend: String,
    pub runs: usize,
    /// Sandboxes started at once for the density curve.
    pub density: Vec<usize>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The directory with containerd-shim-ironclad-v2.
    pub shim_dir: PathBuf,
    pub hypervisor: String,
    /// The size of each ironclad VM (from the shim's defaults), for the memory check before density.
    pub vm_memory_mib: u64,
    /// Cold starts only (where everything runs slowly, as in the nested tier's L1).
    pub cold_start_only: bool,
}

/// One figure for both runtimes.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    pub what: &'static str,
    pub summaries: BTreeMap<Runtime, Summary>,
    /// ironclad's median over runc's.
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DensityPoint {
    pub runtime: Runtime,
    pub sandboxes: usize,
    /// From the first `ctr run -d` to every task running.
    pub start_all_s: f64,
    /// PSS of the shims, VMs and containers of the sandboxes, all together.
    pub pss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The ironclad backend, e.g. "qemu (auto: /dev/kvm opens but the CPU flags show no vmx/svm ...)".
    pub hypervisor: String,
    pub runs: usize,
    pub figures: Vec<Figure>,
    pub density: Vec<DensityPoint>,
    /// Density sizes skipped because the machine's memory would not hold them.
    pub density_skipped: Vec<usize>,
    /// Where an ironclad cold start's time goes, phase by phase (medians).
    pub timeline: Vec<timeline::Phase>,
    /// How many cold starts the timeline is of.
    pub timeline_runs: usize,
    /// Where an ironclad warm start's time goes (medians), and of how many runs.
    pub warm_timeline: Vec<timeline::Phase>,
    pub warm_timeline_runs: usize,
    /// Where an idle ironclad sandbox's PSS goes (MiB per part, largest first).
    pub idle_memory: Vec<(crate::memory::Part, f64)>,
    /// The same sandbox's parts once its jobs ran and it sat for AFTER_JOBS_SETTLE.
    pub memory_after_jobs: Vec<(crate::memory::Part, f64)>,
}

/// Figures looked up by name in the report and the charts.
pub const COLD_START: &str = "cold start";
pub const FIRST_OUTPUT: &str = "time to first output";
pub const EXEC_LATENCY: &str = "exec latency";
pub const IDLE_MEMORY: &str = "host memory per idle sandbox";
pub const MEMORY_AFTER_JOBS: &str = "host memory per sandbox after its jobs";
pub const WARM_START: &str = "warm start";
pub const WARM_FIRST_OUTPUT: &str = "warm time to first output";

/// A start the bench measures: a cold boot, or a VM taken from ironclad-pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Cold,
    Warm,
}

impl Start {
    /// The figure whose runs these are.
    fn figure(self) -> &'static str {
        match self {
            Start::Cold => COLD_START,
            Start::Warm => WARM_START,
        }
    }

    /// The word in the run's task id.
    fn task_word(self) -> &'static str {
        match self {
            Start::Cold => "start",
            Start::Warm => "warm",
        }
    }

    /// The phases of `run` that this start has: a warm start boots no kernel.
    fn phases(self, run: &timeline::Run) -> Option<Vec<f64>> {
        match self {
            Start::Cold => run.phases(),
            Start::Warm => run.warm_phases(),
        }
    }
}
/// How long the sandboxes sit after their jobs before their memory is read again: the guest kernel
/// reports freed memory in passes two seconds apart, all of it within about 20 s here.
const AFTER_JOBS_SETTLE: Duration = Duration::from_secs(20);
/// How many VMs the benchmark's pool keeps.
const POOL_SIZE: u32 = 1;

/// The CPU-bound job: a fixed amount of hashing.
const CPU_JOB: &str = "dd if=/dev/zero bs=1M count=8 2>/dev/null | sha256sum >/dev/null";
/// The memory-bound job: a 32 MiB buffer filled and copied 8 times.
const MEMORY_JOB: &str = "dd if=/dev/zero of=/dev/null bs=32M count=8 2>/dev/null";
/// Sequential writes to the container's root file system, then fsync.
const SEQ_WRITE_JOB: &str = "dd if=/dev/zero of=/seq.bin bs=1M count=16 conv=fsync 2>/dev/null; rm /seq.bin";
/// 64 writes of 4 KiB at pseudo-random offsets of a 16 MiB file, each synced.
const RANDOM_WRITE_JOB: &str = "i=0; while [ $i -lt 64 ]; do \
    dd if=/dev/zero of=/rand.bin bs=4k count=1 seek=$(( (i * 2654435761) % 4096 )) conv=notrunc,fsync 2>/dev/null; \
    i=$((i+1)); done; rm /rand.bin";

struct Bench<'a> {
    containerd: &'a Containerd,
    stop: &'a AtomicBool,
    progress: &'a ProgressBar,
    shim_config: String,
    next_id: usize,
}

impl Bench<'_> {
    fn id(&mut self, runtime: Runtime, what: &str) -> String {
        self.next_id += 1;
        format!("bench-{what}-{}-{}", runtime.name(), self.next_id)
    }

    fn check_stop(&self) -> Result<(), Error> {
        if self.stop.load(Ordering::SeqCst) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    fn run_args(&self, runtime: Runtime, flags: &[&str], id: &str, cmd: &[&str]) -> Vec<String> {
        let mut args: Vec<String> =
            vec!["run".into(), "--runtime".into(), runtime.containerd_runtime().into()];
        if runtime == Runtime::Ironclad {
            args.extend(["--runtime-config-path".to_string(), self.shim_config.clone()]);
        }
        args.extend(flags.iter().map(|f| f.to_string()));
        args.extend([BUSYBOX_IMAGE.to_string(), id.to_string()]);
        args.extend(cmd.iter().map(|c| c.to_string()));
        args
    }

    /// `ctr run --rm` to exit, and to the first byte of output, and for ironclad the run's phases
    /// (`timeline`); fails unless it exits 0.
    fn cold_start(&mut self, runtime: Runtime) -> Result<ColdStart, Error> {
        self.start_run(runtime, Start::Cold)
    }

    /// The same run as [`Bench::cold_start`], measured as a `start` (its task's name, the phases
    /// its timeline splits into, the figure its errors count against).
    fn start_run(&mut self, runtime: Runtime, start: Start) -> Result<ColdStart, Error> {
        let figure = start.figure();
        let id = self.id(runtime, start.task_word());
        let args = self.run_args(runtime, &["--rm"], &id, &["echo", "ready"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ctr_started_ms = ironclad_shim::timeline::now_ms();
        let started = Instant::now();
        let mut child = self
            .containerd
            .ctr_command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| run_err(figure, runtime, e.to_string()))?;
        let mut first = [0u8; 1];
        let mut stdout = child.stdout.take().ok_or_else(|| run_err(figure, runtime, "no stdout".into()))?;
        let first_output = match stdout.read(&mut first) {
            Ok(1) => started.elapsed().as_secs_f64(),
            _ => f64::NAN,
        };
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        let output = child.wait_with_output().map_err(|e| run_err(figure, runtime, e.to_string()))?;
        let total = started.elapsed().as_secs_f64();
        let ctr_returned_ms = ironclad_shim::timeline::now_ms();
        if !output.status.success() || first_output.is_nan() {
            return Err(run_err(figure, runtime, String::from_utf8_lossy(&output.stderr).into_owned()));
        }
        let phases = match runtime {
            Runtime::Ironclad => self
                .shim_timeline(&id)
                .and_then(|shim| start.phases(&timeline::Run { ctr_started_ms, ctr_returned_ms, shim })),
            Runtime::Runc => None,
        };
        Ok(ColdStart { total, first_output, phases })
    }

    /// The timeline the shim logged for task `id` (shim/src/timeline.rs), which reaches
    /// containerd's log through the shim's log pipe a moment after the task is gone.
    fn shim_timeline(&self, id: &str) -> Option<Vec<(ironclad_shim::timeline::Step, u64)>> {
        let log = self.containerd.dir().join("containerd.log");
        let deadline = Instant::now() + TIMELINE_WAIT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(marks) = ironclad_shim::timeline::find_task_line(&text, id) {
                return Some(marks);
            }
            if Instant::now() > deadline {
                self.progress.println(format!("no start timeline for {id} in {}", log.display()));
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a detached task that idles, for exec and job figures.
    fn start_idle(&mut self, runtime: Runtime, what: &str) -> Result<String, Error> {
        let id = self.id(runtime, what);
        let args = self.run_args(runtime, &["-d"], &id, &["sleep", "100000"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.containerd.ctr_ok(&args)?;
        Ok(id)
    }

    fn remove(&self, id: &str) {
        let _ = self.containerd.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let deleted =
                self.containerd.ctr(&["tasks", "delete", id]).map(|o| o.status.success()).unwrap_or(false);
            if deleted {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.containerd.ctr(&["containers", "delete", id]);
    }

    /// Wall time of `ctr task exec` running `script` in task `id`.
    fn exec(&mut self, figure: &'static str, runtime: Runtime, id: &str, script: &str) -> Result<f64, Error> {
        self.next_id += 1;
        let exec_id = format!("x{}", self.next_id);
        let started = Instant::now();
        let output = self
            .containerd
            .ctr(&["tasks", "exec", "--exec-id", &exec_id, id, "sh", "-c", script])
            .map_err(|e| run_err(figure, runtime, e.to_string()))?;
        let took = started.elapsed().as_secs_f64();
        if !output.status.success() {
            return Err(run_err(figure, runtime, String::from_utf8_lossy(&output.stderr).into_owned()));
        }
        Ok(took)
    }

    fn step(&self, message: String) {
        self.progress.set_message(message);
        self.progress.inc(1);
    }
}

fn run_err(figure: &'static str, runtime: Runtime, message: String) -> Error {
    Error::Run { figure, runtime: runtime.name(), message: message.trim().to_string() }
}

pub fn figure(
    name: &'static str,
    unit: &'static str,
    what: &'static str,
    samples: &BTreeMap<Runtime, Vec<f64>>,
) -> Figure {
    let summaries: BTreeMap<Runtime, Summary> =
        samples.iter().filter_map(|(runtime, values)| Some((*runtime, summarize(values)?))).collect();
    let ratio = match (summaries.get(&Runtime::Ironclad), summaries.get(&Runtime::Runc)) {
        (Some(ironclad), Some(runc)) if runc.median > 0.0 => Some(ironclad.median / runc.median),
        _ => None,
    };
    Figure { name, unit, what, summaries, ratio }
}

/// Names the backend a `hypervisor` setting means on this host, as the shim will choose it.
pub fn describe_backend(hypervisor: &str) -> String {
    use ironclad_shim::hypervisor::{HostVirtualization, HypervisorKind};
    let host = HostVirtualization::detect();
    let Ok(kind) = hypervisor.parse::<HypervisorKind>() else { return hypervisor.to_string() };
    match (kind, kind.resolve(host)) {
        (HypervisorKind::Auto, HypervisorKind::Ironclad) => {
            format!("ironclad-vmm (auto: {})", host.explain())
        }
        (HypervisorKind::Auto, _) => format!("qemu, TCG (auto: {})", host.explain()),
        (_, HypervisorKind::Ironclad) => "ironclad-vmm".to_string(),
        _ => hypervisor.to_string(),
    }
}

/// The host processes making up task `id`: its shim, and for ironclad the VM processes, for runc
/// the container's processes (children of the shim).
fn task_processes(containerd: &Containerd, id: &str) -> Vec<i32> {
    let marker = format!("-id {id} ");
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let all: Vec<(i32, i32, String)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?)
                .replace('\0', " ");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, cmdline))
        })
        .collect();
    let shims: Vec<i32> = all
        .iter()
        .filter(|(_, _, c)| {
            c.contains("containerd-shim") && c.contains(&marker) && c.contains(containerd.namespace())
        })
        .map(|(pid, _, _)| *pid)
        .collect();
    let task_dir = containerd.task_dir(id).display().to_string();
    let mut pids = shims.clone();
    // Descendants of the shims (runc's container, ironclad's VM) and anything naming the task dir.
    let mut frontier = shims;
    while let Some(parent) = frontier.pop() {
        for (pid, ppid, _) in &all {
            if *ppid == parent && !pids.contains(pid) {
                pids.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    for (pid, _, cmdline) in &all {
        if cmdline.contains(&task_dir) && !pids.contains(pid) {
            pids.push(*pid);
        }
    }
    pids
}

pub fn pss_mib_of_tasks(containerd: &Containerd, ids: &[String]) -> f64 {
    let kib: u64 =
        ids.iter().flat_map(|id| task_processes(containerd, id)).map(crate::memory::rollup_pss_kib).sum();
    kib as f64 / 1024.0
}

fn mem_available_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// How many progress steps a run takes: setup, warm-up, cold starts, idle sandboxes, jobs, memory
/// after them, density.
fn total_steps(settings: &Settings) -> u64 {
    let runtimes = RUNTIMES.len();
    if settings.cold_start_only {
        return (2 + settings.runs * runtimes) as u64;
    }
    (2 + 2 * settings.runs * runtimes + runtimes + settings.runs * 5 + 1 + settings.density.len() * runtimes)
        as u64
}

pub fn measure(settings: &Settings, stop: Arc<AtomicBool>) -> Result<Results, Error> {
    let progress = ProgressBar::new(total_steps(settings));
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_message("starting a private containerd");
    let artifacts = Artifacts {
        kernel: settings.kernel.clone(),
        initrd: settings.initrd.clone(),
        shim_dir: settings.shim_dir.clone(),
        hypervisor: settings.hypervisor.clone(),
    };
    for path in [&artifacts.kernel, &artifacts.initrd] {
        if !path.is_file() {
            return Err(Error::Guest(format!("{} is missing: run `make guest`", path.display())));
        }
    }
    let containerd = Containerd::start(&artifacts)?;
    containerd.import_busybox()?;
    progress.inc(1);
    let mut bench = Bench {
        containerd: &containerd,
        stop: &stop,
        progress: &progress,
        shim_config: containerd.shim_config.display().to_string(),
        next_id: 0,
    };
    // The first ironclad start builds the image's rootfs disk; it is not a cold start to count.
    bench.step("warming the rootfs image cache".into());
    bench.cold_start(Runtime::Ironclad)?;

    let results = measure_figures(&mut bench, settings);
    progress.finish_and_clear();
    results
}

fn measure_figures(bench: &mut Bench<'_>, settings: &Settings) -> Result<Results, Error> {
    let mut start = BTreeMap::<Runtime, Vec<f64>>::new();
    let mut first_output = BTreeMap::<Runtime, Vec<f64>>::new();
    let mut phases = Vec::new();
    for run in 0..settings.runs {
        for runtime in RUNTIMES {
            bench.check_stop()?;
            bench.step(format!("cold start {}/{} ({})", run + 1, settings.runs, runtime.name()));
            let cold = bench.cold_start(runtime)?;
            start.entry(runtime).or_default().push(cold.total);
            first_output.entry(runtime).or_default().push(cold.first_output);
            phases.extend(cold.phases);
        }
    }
    let timeline = timeline::summarize_phases(&phases);
    let timeline_runs = phases.len();
    let cold_figures = |start: &BTreeMap<Runtime, Vec<f64>>, first_output: &BTreeMap<Runtime, Vec<f64>>| {
        [
            figure(COLD_START, "s", "`ctr run --rm IMAGE ID echo ready`, from exec to exit", start),
            figure(FIRST_OUTPUT, "s", "the same runs, from exec to the first byte of output", first_output),
        ]
    };
    if settings.cold_start_only {
        return Ok(Results {
            hypervisor: settings.backend.clone(),
            runs: settings.runs,
            figures: cold_figures(&start, &first_output).into(),
            density: Vec::new(),
            density_skipped: Vec::new(),
            timeline,
            timeline_runs,
            warm_timeline: Vec::new(),
            warm_timeline_runs: 0,
            idle_memory: Vec::new(),
            memory_after_jobs: Vec::new(),
        });
    }

    let (warm_start, warm_first_output, warm_phases) = measure_warm(bench, settings)?;

    let mut idle = BTreeMap::new();
    let mut pss = BTreeMap::<Runtime, Vec<f64>>::new();
    let mut idle_memory = Vec::new();
    let images = [settings.kernel.as_path(), settings.initrd.as_path()];
    for runtime in RUNTIMES {
        bench.check_stop()?;
        bench.step(format!("idle sandbox ({})", runtime.name()));
        let id = bench.start_idle(runtime, "idle")?;
        // Let the guest settle before its memory is read.
        std::thread::sleep(Duration::from_secs(1));
        pss.entry(runtime).or_default().push(pss_mib_of_tasks(bench.containerd, std::slice::from_ref(&id)));
        if runtime == Runtime::Ironclad {
            idle_memory = crate::memory::breakdown(&task_processes(bench.containerd, &id), &images);
        }
        idle.insert(runtime, id);
    }
    let jobs: [(&'static str, &str); 5] = [
        ("exec", "true"),
        ("cpu", CPU_JOB),
        ("memory", MEMORY_JOB),
        ("seq-write", SEQ_WRITE_JOB),
        ("random-write", RANDOM_WRITE_JOB),
    ];
    let mut job_samples: BTreeMap<&str, BTreeMap<Runtime, Vec<f64>>> = BTreeMap::new();
    let mut after_jobs = BTreeMap::<Runtime, Vec<f64>>::new();
    let mut memory_after_jobs = Vec::new();
    let measured = (|| {
        for run in 0..settings.runs {
            for (job, script) in jobs {
                bench.step(format!("{job} {}/{}", run + 1, settings.runs));
                for runtime in RUNTIMES {
                    bench.check_stop()?;
                    let id = idle.get(&runtime).cloned().unwrap_or_default();
                    let took = bench.exec("exec", runtime, &id, script)?;
                    job_samples.entry(job).or_default().entry(runtime).or_default().push(took);
                }
            }
        }
        bench.step("memory after the jobs".to_string());
        std::thread::sleep(AFTER_JOBS_SETTLE);
        for (runtime, id) in &idle {
            let mib = pss_mib_of_tasks(bench.containerd, std::slice::from_ref(id));
            after_jobs.entry(*runtime).or_default().push(mib);
            if *runtime == Runtime::Ironclad {
                memory_after_jobs = crate::memory::breakdown(&task_processes(bench.containerd, id), &images);
            }
        }
        Ok::<(), Error>(())
    })();
    for id in idle.values() {
        bench.remove(id);
    }
    measured?;

    let mut density = Vec::new();
    let mut density_skipped = Vec::new();
    for &n in &settings.density {
        let needed_mib = n as u64 * (settings.vm_memory_mib + 64);
        if needed_mib * 10 > mem_available_mib() * 7 {
            density_skipped.push(n);
            continue;
        }
        for runtime in RUNTIMES {
            bench.check_stop()?;
            bench.step(format!("density: {n} sandboxes ({})", runtime.name()));
            density.push(measure_density(bench, runtime, n)?);
        }
    }

    let get = |job: &str| job_samples.get(job).cloned().unwrap_or_default();
    let [cold, first] = cold_figures(&start, &first_output);
    let figures = vec![
        cold,
        first,
        figure(
            WARM_START,
            "s",
            "`ctr run --rm IMAGE ID echo ready` with a VM from ironclad-pool (runc: the same cold run)",
            &warm_start,
        ),
        figure(
            WARM_FIRST_OUTPUT,
            "s",
            "the same warm runs, from exec to the first byte of output",
            &warm_first_output,
        ),
        figure(EXEC_LATENCY, "s", "`ctr task exec` of `true` in a running task", &get("exec")),
        figure("CPU-bound job", "s", "sha256 of 8 MiB (busybox), through `ctr task exec`", &get("cpu")),
        figure(
            "memory-bound job",
            "s",
            "a 32 MiB buffer copied 8 times (dd), through `ctr task exec`",
            &get("memory"),
        ),
        figure(
            "sequential write + fsync",
            "s",
            "16 MiB to the container's root file system",
            &get("seq-write"),
        ),
        figure(
            "random 4 KiB writes + fsync",
            "s",
            "64 writes, one dd each, on the container's root file system",
            &get("random-write"),
        ),
        figure(
            IDLE_MEMORY,
            "MiB",
            "PSS of the shim and its VM (touched guest memory included) or container",
            &pss,
        ),
        figure(
            MEMORY_AFTER_JOBS,
            "MiB",
            "the same sandbox's PSS 20 s after the jobs above ran in it (what the guest freed goes back through free page reporting)",
            &after_jobs,
        ),
    ];
    Ok(Results {
        hypervisor: settings.backend.clone(),
        runs: settings.runs,
        figures,
        density,
        density_skipped,
        timeline,
        timeline_runs,
        warm_timeline: timeline::summarize_warm_phases(&warm_phases),
        warm_timeline_runs: warm_phases.len(),
        idle_memory,
        memory_after_jobs,
    })
}

type Samples = BTreeMap<Runtime, Vec<f64>>;

/// Warm starts: with ironclad-pool keeping one VM, each ironclad run waits until the pool has a
/// VM ready, then takes it; runc runs interleaved as before. A run the shim did not start warm
/// fails the benchmark.
fn measure_warm(
    bench: &mut Bench<'_>,
    settings: &Settings,
) -> Result<(Samples, Samples, Vec<Vec<f64>>), Error> {
    let program = settings.shim_dir.join("ironclad-pool");
    let pool_err = |err: ironclad_tests::pool::Error| run_err(WARM_START, Runtime::Ironclad, err.to_string());
    let pool = PoolDaemon::start(&program, bench.containerd, POOL_SIZE).map_err(pool_err)?;
    let mut start = Samples::new();
    let mut first_output = Samples::new();
    let mut phases = Vec::new();
    for run in 0..settings.runs {
        for runtime in RUNTIMES {
            bench.check_stop()?;
            bench.step(format!("warm start {}/{} ({})", run + 1, settings.runs, runtime.name()));
            if runtime == Runtime::Ironclad {
                pool.wait_ready(run + 1).map_err(pool_err)?;
            }
            let warm = bench.start_run(runtime, Start::Warm)?;
            let taken = ironclad_tests::pool::taken_ids(&bench.containerd.log()).len();
            if runtime == Runtime::Ironclad && taken != run + 1 {
                let message = format!("run {} booted cold: {taken} VMs taken from the pool", run + 1);
                return Err(run_err(WARM_START, runtime, message));
            }
            start.entry(runtime).or_default().push(warm.total);
            first_output.entry(runtime).or_default().push(warm.first_output);
            phases.extend(warm.phases);
        }
    }
    pool.stop().map_err(pool_err)?;
    Ok((start, first_output, phases))
}

/// Starts `n` idle sandboxes at once, times until all run, reads their memory, removes them.
fn measure_density(bench: &mut Bench<'_>, runtime: Runtime, n: usize) -> Result<DensityPoint, Error> {
    let ids: Vec<String> = (0..n).map(|_| bench.id(runtime, "density")).collect();
    let started = Instant::now();
    let containerd = bench.containerd;
    let commands: Vec<Vec<String>> =
        ids.iter().map(|id| bench.run_args(runtime, &["-d"], id, &["sleep", "100000"])).collect();
    let outcomes: Vec<Result<String, containerd::Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = commands
            .iter()
            .map(|args| {
                scope.spawn(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    containerd.ctr_ok(&args)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Ok(String::new()))).collect()
    });
    let start_all_s = started.elapsed().as_secs_f64();
    let failed = outcomes.into_iter().find_map(Result::err);
    let pss_mib = pss_mib_of_tasks(containerd, &ids);
    for id in &ids {
        bench.remove(id);
    }
    if let Some(err) = failed {
        return Err(run_err("density", runtime, err.to_string()));
    }
    if started.elapsed() > TASK_TIMEOUT {
        return Err(run_err("density", runtime, format!("took over {TASK_TIMEOUT:?}")));
    }
    Ok(DensityPoint { runtime, sandboxes: n, start_all_s, pss_mib })
}
