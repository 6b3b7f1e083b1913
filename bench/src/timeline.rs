//! Where an ironclad cold start's time goes: the shim's timeline line (shim/src/timeline.rs, the
//! host's wall clock) between the benchmark's own marks on the same clock (`ctr run` started,
//! `ctr run` returned), cut into phases; medians over the runs.

use ironclad_shim::timeline::Step;
use serde::Serialize;

use crate::stats::summarize;

/// A point in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    CtrStarted,
    Shim(Step),
    CtrReturned,
}

/// The phases of a cold start, each from one mark to the next.
pub const PHASES: [(&str, Mark, Mark); 12] = [
    ("ctr and containerd until the shim runs", Mark::CtrStarted, Mark::Shim(Step::ShimStarted)),
    ("shim start until Create", Mark::Shim(Step::ShimStarted), Mark::Shim(Step::CreateReceived)),
    (
        "rootfs image, network, jail and helpers",
        Mark::Shim(Step::CreateReceived),
        Mark::Shim(Step::MonitorStarted),
    ),
    ("monitor until the kernel runs", Mark::Shim(Step::MonitorStarted), Mark::Shim(Step::KernelEntered)),
    ("kernel until /init", Mark::Shim(Step::KernelEntered), Mark::Shim(Step::InitStarted)),
    ("/init until the agent is ready", Mark::Shim(Step::InitStarted), Mark::Shim(Step::AgentReady)),
    ("connect and CreateContainer", Mark::Shim(Step::AgentReady), Mark::Shim(Step::ContainerCreated)),
    ("containerd until Start", Mark::Shim(Step::ContainerCreated), Mark::Shim(Step::StartReceived)),
    ("StartContainer", Mark::Shim(Step::StartReceived), Mark::Shim(Step::Started)),
    ("the process runs until its exit is seen", Mark::Shim(Step::Started), Mark::Shim(Step::Exited)),
    ("exit until the VM is torn down", Mark::Shim(Step::Exited), Mark::Shim(Step::TornDown)),
    ("teardown until ctr returns", Mark::Shim(Step::TornDown), Mark::CtrReturned),
];

/// The phases of a warm start (a VM from ironclad-pool): the shim marks the agent ready once it has
/// taken the VM and connected to its agent; no monitor, kernel or /init step is in this start.
pub const WARM_PHASES: [(&str, Mark, Mark); 9] = [
    ("ctr and containerd until the shim runs", Mark::CtrStarted, Mark::Shim(Step::ShimStarted)),
    ("shim start until Create", Mark::Shim(Step::ShimStarted), Mark::Shim(Step::CreateReceived)),
    (
        "taking a pooled VM and connecting its agent",
        Mark::Shim(Step::CreateReceived),
        Mark::Shim(Step::AgentReady),
    ),
    (
        "rootfs into the share and CreateContainer",
        Mark::Shim(Step::AgentReady),
        Mark::Shim(Step::ContainerCreated),
    ),
    ("containerd until Start", Mark::Shim(Step::ContainerCreated), Mark::Shim(Step::StartReceived)),
    ("StartContainer", Mark::Shim(Step::StartReceived), Mark::Shim(Step::Started)),
    ("the process runs until its exit is seen", Mark::Shim(Step::Started), Mark::Shim(Step::Exited)),
    ("exit until the VM is torn down", Mark::Shim(Step::Exited), Mark::Shim(Step::TornDown)),
    ("teardown until ctr returns", Mark::Shim(Step::TornDown), Mark::CtrReturned),
];

/// One run's marks, in milliseconds since the epoch.
#[derive(Debug, Clone)]
pub struct Run {
    pub ctr_started_ms: u64,
    pub ctr_returned_ms: u64,
    pub shim: Vec<(Step, u64)>,
}

impl Run {
    fn at(&self, mark: Mark) -> Option<u64> {
        match mark {
            Mark::CtrStarted => Some(self.ctr_started_ms),
            Mark::CtrReturned => Some(self.ctr_returned_ms),
            Mark::Shim(step) => self.shim.iter().find(|(s, _)| *s == step).map(|(_, at)| *at),
        }
    }

    /// Each phase's length (ms), in [`PHASES`]' order; None when a mark is missing or out of
    /// order (a run that cannot be cut into phases is left out rather than guessed at).
    pub fn phases(&self) -> Option<Vec<f64>> {
        self.phases_of(&PHASES)
    }

    /// The same for a warm start's [`WARM_PHASES`].
    pub fn warm_phases(&self) -> Option<Vec<f64>> {
        self.phases_of(&WARM_PHASES)
    }

    fn phases_of(&self, phases: &[(&'static str, Mark, Mark)]) -> Option<Vec<f64>> {
        phases
            .iter()
            .map(|(_, from, to)| {
                let (from, to) = (self.at(*from)?, self.at(*to)?);
                (to >= from).then(|| (to - from) as f64)
            })
            .collect()
    }
}

/// One phase's median over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub median_ms: f64,
}

/// The phases' medians over `runs` (each from [`Run::phases`]); empty without runs.
pub fn summarize_phases(runs: &[Vec<f64>]) -> Vec<Phase> {
    summarize_phases_of(&PHASES, runs)
}

/// The same for warm starts.
pub fn summarize_warm_phases(runs: &[Vec<f64>]) -> Vec<Phase> {
    summarize_phases_of(&WARM_PHASES, runs)
}

fn summarize_phases_of(phases: &[(&'static str, Mark, Mark)], runs: &[Vec<f64>]) -> Vec<Phase> {
    phases
        .iter()
        .enumerate()
        .filter_map(|(index, (name, _, _))| {
            let samples: Vec<f64> = runs.iter().filter_map(|run| run.get(index).copied()).collect();
            Some(Phase { name, median_ms: summarize(&samples)?.median })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shim_marks(base: u64) -> Vec<(Step, u64)> {
        Step::ALL.iter().enumerate().map(|(i, step)| (*step, base + 10 * (i as u64 + 1))).collect()
    }

    #[test]
    fn a_run_is_cut_into_consecutive_phases_that_add_up_to_the_whole() {
        let run = Run { ctr_started_ms: 1_000, ctr_returned_ms: 1_200, shim: shim_marks(1_000) };
        let phases = run.phases().unwrap();
        assert_eq!(phases.len(), PHASES.len());
        assert_eq!(phases[0], 10.0);
        assert_eq!(phases.iter().sum::<f64>(), 200.0);
        // Each phase starts where the one before it ended.
        for pair in PHASES.windows(2) {
            assert_eq!(pair[0].2, pair[1].1);
        }
    }

    #[test]
    fn a_run_with_a_missing_or_backward_mark_is_left_out() {
        let mut marks = shim_marks(1_000);
        marks.retain(|(step, _)| *step != Step::InitStarted);
        assert!(Run { ctr_started_ms: 1_000, ctr_returned_ms: 1_200, shim: marks }.phases().is_none());
        let run = Run { ctr_started_ms: 1_050, ctr_returned_ms: 1_200, shim: shim_marks(1_000) };
        assert!(run.phases().is_none());
    }

    #[test]
    fn a_warm_run_has_no_boot_steps_and_its_phases_still_add_up() {
        let mut marks = shim_marks(1_000);
        marks.retain(|(step, _)| {
            !matches!(step, Step::MonitorStarted | Step::KernelEntered | Step::InitStarted)
        });
        let run = Run { ctr_started_ms: 1_000, ctr_returned_ms: 1_200, shim: marks };
        assert!(run.phases().is_none(), "a warm run is no cold start");
        let phases = run.warm_phases().unwrap();
        assert_eq!(phases.len(), WARM_PHASES.len());
        assert_eq!(phases.iter().sum::<f64>(), 200.0);
        for pair in WARM_PHASES.windows(2) {
            assert_eq!(pair[0].2, pair[1].1);
        }
    }

    #[test]
    fn each_phase_gets_its_median_over_the_runs() {
        let phases = summarize_phases(&[vec![1.0; 12], vec![3.0; 12], vec![2.0; 12]]);
        assert_eq!(phases.len(), 12);
        assert_eq!(phases[0].median_ms, 2.0);
    }
}
