//! The task table: the containers this shim runs, by id, each with its processes and the sandbox
//! (VM) it runs in. Outside a pod that is one container; in a pod, the sandbox (pause) container,
//! which booted the VM, and the containers that joined it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::io::ProcessIo;
use crate::process::Process;
use crate::resources::network::Attachment;
use crate::sandbox::Sandbox;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no task {0:?} in this shim")]
    NoTask(String),
    #[error("task {task} has no exec process {exec_id:?}")]
    NoProcess { task: String, exec_id: String },
    #[error("exec {0:?} already exists")]
    ExecExists(String),
    #[error(
        "this shim already runs task {0}: ironclad runs one task per microVM outside a pod (a pod's \
         containers name their sandbox with the CRI annotations)"
    )]
    ShimBusy(String),
    #[error("no pod sandbox {0:?} runs in this shim")]
    NoSandbox(String),
}

/// One container: a task to containerd.
pub struct Container {
    pub id: String,
    pub bundle: String,
    pub sandbox: Arc<Sandbox>,
    /// The sandbox's network, configured in the guest once its CNI interface is there.
    pub network: Option<Arc<Attachment>>,
    /// This container booted the VM (and the VM ends with it); else it joined a pod's VM.
    pub owns_vm: bool,
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn new(id: &str, bundle: &str, sandbox: Arc<Sandbox>, init: Arc<Process>) -> Self {
        Container {
            id: id.to_string(),
            bundle: bundle.to_string(),
            sandbox,
            network: None,
            owns_vm: true,
            processes: Mutex::new(HashMap::from([(String::new(), init)])),
        }
    }

    /// A container that joined the VM of its pod's sandbox container.
    pub fn joining_pod(mut self) -> Self {
        self.owns_vm = false;
        self
    }

    pub fn with_network(mut self, network: Option<Arc<Attachment>>) -> Self {
        self.network = network;
        self
    }

    fn processes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        // Nothing panics while holding the lock; a poisoned table is still consistent.
        self.processes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, Error> {
        self.processes()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NoProcess { task: self.id.clone(), exec_id: exec_id.to_string() })
    }

    pub fn init(&self) -> Result<Arc<Process>, Error> {
        self.process("")
    }

    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        self.processes().values().cloned().collect()
    }

    pub fn add_exec(&self, process: Arc<Process>) -> Result<(), Error> {
        let mut processes = self.processes();
        if processes.contains_key(&process.exec_id) {
            return Err(Error::ExecExists(process.exec_id.clone()));
        }
        processes.insert(process.exec_id.clone(), process);
        Ok(())
    }

    pub fn remove_exec(&self, exec_id: &str) {
        self.processes().remove(exec_id);
    }

    /// Where a relay of one of this container's processes reads and writes.
    pub fn io(&self, exec_id: &str) -> ProcessIo {
        ProcessIo {
            agent: self.sandbox.agent.clone(),
            container_id: self.id.clone(),
            exec_id: exec_id.to_string(),
            vm_gone: self.sandbox.gone(),
        }
    }

    /// The task's pid on the host, as Kata reports it: the VM monitor's.
    pub fn host_pid(&self) -> u32 {
        self.sandbox.monitor_pid
    }

    /// The pid containerd sees: the VM's for the init process, the guest's for an exec.
    pub fn visible_pid(&self, process: &Process) -> u32 {
        if process.is_init() {
            self.host_pid()
        } else {
            process.pid()
        }
    }
}

/// Containers by id.
#[derive(Default)]
pub struct TaskTable {
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl TaskTable {
    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>, Error> {
        self.containers().get(id).cloned().ok_or_else(|| Error::NoTask(id.to_string()))
    }

    /// Whether the guest may speak of `id`: a container of this shim.
    pub fn owns(&self, id: &str) -> bool {
        self.containers().contains_key(id)
    }

    /// One VM per task: a shim holding a container takes no other.
    pub fn check_room(&self) -> Result<(), Error> {
        match self.containers().keys().next() {
            Some(existing) => Err(Error::ShimBusy(existing.clone())),
            None => Ok(()),
        }
    }

    /// The pod sandbox `id`: a container of this shim that booted its VM.
    pub fn sandbox(&self, id: &str) -> Result<Arc<Container>, Error> {
        self.containers()
            .get(id)
            .filter(|c| c.owns_vm)
            .cloned()
            .ok_or_else(|| Error::NoSandbox(id.to_string()))
    }

    pub fn insert(&self, container: Arc<Container>) {
        self.containers().insert(container.id.clone(), container);
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Container>> {
        self.containers().remove(id)
    }

    pub fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }
}
