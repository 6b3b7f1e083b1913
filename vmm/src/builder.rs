//! Builds a VM from a validated [`VmConfig`] into a [`Vmm`] (memory, vCPUs, buses, the device
//! registry, the event loop), then runs it until it stops.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::x86_64::boot;
use crate::arch::x86_64::layout::{
    I8042_PORT, I8042_PORT_LEN, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN, VIRTIO_MMIO_SIZE,
};
use crate::bus::{self, Bus};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::registry::{self, DeviceCounters, DeviceRegistry};
use crate::devices::virtio::balloon::{self as virtio_balloon, Balloon, BalloonMetrics};
use crate::devices::virtio::block::{self as virtio_block, Block, BlockMetrics, Disk};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::fs::{self as virtio_fs, FsMetrics, VhostUserFs};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{self as virtio_net, Net, NetMetrics};
use crate::devices::virtio::vsock::{self as virtio_vsock, Vsock, VsockMetrics};
use crate::devices::EventFdTrigger;
use crate::seccomp::ThreadKind;
use crate::vstate::memory::{self, create_guest_memory, Sharing};
use crate::vstate::vcpu::{self, ExitReason, Vcpu, VmExit};
use crate::vstate::vm::{self, Vm};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error("unsupported configuration: {0}")]
    Unsupported(&'static str),
    #[error("cannot create guest memory")]
    Memory(#[from] memory::Error),
    #[error("cannot create the VM")]
    Vm(#[from] vm::Error),
    #[error("cannot load the guest")]
    Boot(#[from] boot::Error),
    #[error("cannot announce the vCPUs")]
    MpTable(#[from] crate::arch::x86_64::mptable::Error),
    #[error("cannot set up a vCPU")]
    Vcpu(#[from] vcpu::Error),
    #[error("cannot place a device on the bus")]
    Bus(#[from] bus::Error),
    #[error("cannot open the serial output {path}")]
    SerialOutput {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    #[error("the event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    #[error("cannot set up the disk {serial:?}")]
    Block {
        serial: String,
        #[source]
        source: virtio_block::device::Error,
    },
    #[error("cannot set up the network device on tap {tap}")]
    Net {
        tap: String,
        #[source]
        source: virtio_net::device::Error,
    },
    #[error("cannot set up the balloon for free page reporting")]
    Balloon(#[from] virtio_balloon::device::Error),
    #[error("cannot set up vsock")]
    Vsock(#[from] virtio_vsock::device::Error),
    #[error("cannot set up the shared directory {tag:?} (virtio-fs)")]
    Fs {
        tag: String,
        #[source]
        source: virtio_fs::device::Error,
    },
    #[error("cannot attach a virtio device")]
    Registry(#[from] registry::Error),
    #[error("cannot write the metrics to {path}")]
    Metrics {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Counters gathered for the metrics file.
#[derive(Default, serde::Serialize)]
struct Metrics {
    exit: String,
    block: Vec<(String, Arc<BlockMetrics>)>,
    net: Vec<(String, Arc<NetMetrics>)>,
    vsock: Option<Arc<VsockMetrics>>,
    fs: Vec<(String, Arc<FsMetrics>)>,
    balloon: Option<Arc<BalloonMetrics>>,
    /// Every virtio device by id: its slot, whether it is active, what its transport refused.
    devices: Vec<DeviceCounters>,
    pio_unclaimed: u64,
    mmio_unclaimed: u64,
}

/// Boots the VM described by `config` and returns once it has stopped.
pub fn run_vm(config: &VmConfig) -> Result<ExitReason, Error> {
    build(config)?.run()
}

/// A built VM, not yet running (Firecracker's builder hands back the same): guest memory with
/// the kernel loaded, the vCPUs set up, the buses, the device registry and the event loop.
pub struct Vmm {
    // Kept for the VM's life: the vCPUs and devices use its file descriptors.
    _vm: Vm,
    _memory: memory::GuestMemory,
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: DeviceRegistry,
    event_manager: EventManager<Subscriber>,
    exit: VmExit,
    signals: SignalFd,
    metrics: Metrics,
    metrics_file: Option<MetricsFile>,
    socket: SocketFile,
    seccomp: bool,
}

/// Builds the VM described by `config`: everything a bad configuration can fail on fails here,
/// before a vCPU runs.
pub fn build(config: &VmConfig) -> Result<Vmm, Error> {
    let vmm_start = std::time::Instant::now();
    config.validate()?;
    // Opened now: once the seccomp filters are on, no file can be opened.
    let metrics_file = config.metrics.as_deref().map(MetricsFile::create).transpose()?;
    // Signals are blocked before any thread starts, so that every thread inherits the mask and they
    // arrive only through the event loop's signalfd.
    let signals = block_stop_signals()?;
    // A vhost-user backend maps guest memory itself: it must be a memfd it can be sent.
    let sharing = if config.fs.is_empty() { Sharing::Private } else { Sharing::Shared };
    let memory = create_guest_memory(config.memory_mib, sharing)?;
    let vm = Vm::new(&memory)?;
    let kernel = boot::load_kernel(&memory, &config.kernel)?;
    let initrd = config.initrd.as_deref().map(|path| boot::load_initrd(&memory, path)).transpose()?;

    let exit = VmExit::new().map_err(Error::EventFd)?;
    let mut wiring = VirtioWiring {
        vm: &vm,
        memory: &memory,
        mmio: Bus::new(),
        devices: DeviceRegistry::default(),
        event_manager: EventManager::new().map_err(Error::EventLoop)?,
        cmdline: config.cmdline.clone(),
        metrics: Metrics::default(),
    };
    wiring.attach_block_devices(config)?;
    wiring.attach_net_devices(config)?;
    wiring.attach_fs_devices(config)?;
    wiring.attach_balloon(config)?;
    let socket = wiring.attach_vsock_device(config)?;
    let VirtioWiring { mmio, devices, event_manager, cmdline, metrics, .. } = wiring;
    crate::arch::x86_64::mptable::write(&memory, config.vcpus)?;
    boot::load_command_line(&memory, &cmdline)?;
    boot::write_zero_page(&memory, &kernel, cmdline.len(), initrd)?;

    let pio = Arc::new(legacy_pio_bus(&vm, config, &exit, vmm_start)?);
    let mmio = Arc::new(mmio);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, id, pio.clone(), mmio.clone(), exit.clone())?;
        vcpu.configure(&vm, &memory, kernel.entry, config.vcpus)?;
        vcpus.push(vcpu);
    }
    Ok(Vmm {
        _vm: vm,
        _memory: memory,
        vcpus,
        pio,
        mmio,
        devices,
        event_manager,
        exit,
        signals,
        metrics,
        metrics_file,
        socket,
        seccomp: config.seccomp,
    })
}

impl Vmm {
    /// The virtio devices, by id.
    pub fn devices(&self) -> &DeviceRegistry {
        &self.devices
    }

    /// Starts the vCPUs, puts the seccomp filters on and runs the event loop until the VM stops;
    /// then writes the metrics.
    pub fn run(self) -> Result<ExitReason, Error> {
        let Vmm {
            vcpus,
            pio,
            mmio,
            devices,
            event_manager,
            exit,
            signals,
            metrics,
            metrics_file,
            socket,
            seccomp,
            ..
        } = self;
        // Made now: once the seccomp filters are on, no timer can be made.
        let reporter = metrics_file
            .map(|file| Arc::new(Mutex::new(MetricsReporter { file, metrics, devices, pio, mmio })));
        let metrics_timer = match &reporter {
            Some(reporter) => Some(MetricsTimer::new(reporter.clone())?),
            None => None,
        };
        let filters = if seccomp {
            crate::seccomp::install_sigsys_handler()?;
            Some((crate::seccomp::filter(ThreadKind::Vmm)?, crate::seccomp::filter(ThreadKind::Vcpu)?))
        } else {
            None
        };
        for vcpu in vcpus {
            // The threads are never joined: the process ends when the VM stops, taking them along.
            vcpu.start(filters.as_ref().map(|(_, vcpu)| vcpu.clone()))?;
        }
        // The VM runs from here on: its socket stays until whoever owns the directory removes it (the
        // running VMM may not remove files).
        socket.keep();
        if let Some((vmm, _)) = &filters {
            crate::seccomp::apply(ThreadKind::Vmm, vmm)?;
        }
        log::info!("VM running");
        run_event_loop(event_manager, &exit, signals, reporter.clone(), metrics_timer)?;
        let reason = exit.reason().unwrap_or(ExitReason::Error("the VM stopped without a reason".into()));
        if let Some(reporter) = &reporter {
            let mut reporter = reporter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            reporter.write(format!("{reason:?}"))?;
        }
        Ok(reason)
    }
}

/// How often the counters are written while the VM runs.
const METRICS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The counters and the file they go to: written every METRICS_INTERVAL while the VM runs, on
/// SIGUSR1, and once more when it stops (`exit` says `running` until then).
struct MetricsReporter {
    file: MetricsFile,
    metrics: Metrics,
    devices: DeviceRegistry,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl MetricsReporter {
    fn write(&mut self, state: String) -> Result<(), Error> {
        self.metrics.exit = state;
        self.metrics.pio_unclaimed = self.pio.unclaimed_accesses();
        self.metrics.mmio_unclaimed = self.mmio.unclaimed_accesses();
        self.metrics.devices = self.devices.counters();
        self.file.write(&self.metrics)
    }

    fn write_running(reporter: &Mutex<MetricsReporter>) {
        let mut reporter = reporter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = reporter.write("running".into()) {
            log::warn!("{}", ironclad_protocol::error_chain(&err));
        }
    }
}

/// Writes the counters every METRICS_INTERVAL.
struct MetricsTimer {
    reporter: Arc<Mutex<MetricsReporter>>,
    timer: TimerFd,
}

impl MetricsTimer {
    fn new(reporter: Arc<Mutex<MetricsReporter>>) -> Result<Self, Error> {
        let timer_err =
            |e: vmm_sys_util::errno::Error| Error::EventFd(std::io::Error::from_raw_os_error(e.errno()));
        let mut timer = TimerFd::new().map_err(timer_err)?;
        timer.reset(METRICS_INTERVAL, Some(METRICS_INTERVAL)).map_err(timer_err)?;
        Ok(MetricsTimer { reporter, timer })
    }
}

impl MutEventSubscriber for MetricsTimer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        MetricsReporter::write_running(&self.reporter);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration only fails on a bad fd, which this is not.
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }
}

/// The metrics file, opened before the seccomp filters go on and rewritten in place.
struct MetricsFile {
    path: std::path::PathBuf,
    file: File,
}

impl MetricsFile {
    fn create(path: &std::path::Path) -> Result<Self, Error> {
        let file = File::create(path).map_err(|source| Error::Metrics { path: path.into(), source })?;
        Ok(MetricsFile { path: path.into(), file })
    }

    fn write(&self, metrics: &Metrics) -> Result<(), Error> {
        use std::os::unix::fs::FileExt;
        let err = |source| Error::Metrics { path: self.path.clone(), source };
        let text = serde_json::to_vec_pretty(metrics).map_err(|e| err(e.into()))?;
        self.file.set_len(0).map_err(err)?;
        self.file.write_all_at(&text, 0).map_err(err)
    }
}

/// Removes the hybrid vsock socket if the VM fails to start after it was created.
struct SocketFile(Option<std::path::PathBuf>);

impl SocketFile {
    /// The VM started: the socket stays.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What attaching virtio devices builds up: the MMIO bus, the event loop's subscribers, the
/// command line announcing the devices, and their counters.
struct VirtioWiring<'a> {
    vm: &'a Vm,
    memory: &'a memory::GuestMemory,
    mmio: Bus,
    devices: DeviceRegistry,
    event_manager: EventManager<Subscriber>,
    cmdline: String,
    metrics: Metrics,
}

impl VirtioWiring<'_> {
    /// The one path every device takes: registered under `id` in the next slot, put on the MMIO
    /// bus behind its transport, its queue kicks (ioeventfds) and interrupt (irqfd) wired, given to
    /// the event loop, and announced on the kernel command line.
    fn attach<D>(&mut self, id: String, device: D) -> Result<(), Error>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let slot = self.devices.next_slot()?;
        let (base, irq) = (slot.mmio_base, slot.irq);
        for (queue_index, event) in device.queue_events().iter().enumerate() {
            let datamatch = u32::try_from(queue_index).map_err(|_| registry::Error::TooManyDevices)?;
            self.vm.register_ioevent(event, base + REG_QUEUE_NOTIFY, datamatch)?;
        }
        self.vm.register_irqfd(device.interrupt().irqfd(), irq)?;
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(self.memory.clone(), device.clone());
        log::info!("{id}: virtio-mmio at {base:#x}, IRQ {irq}");
        self.devices.register(id, slot, device.clone(), transport.rejected_accesses())?;
        self.mmio.insert(base, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)))?;
        self.event_manager.add_subscriber(device);
        self.cmdline.push_str(&format!(" virtio_mmio.device={}K@{base:#x}:{irq}", VIRTIO_MMIO_SIZE / 1024));
        Ok(())
    }

    fn attach_block_devices(&mut self, config: &VmConfig) -> Result<(), Error> {
        for block in &config.block {
            let block_err = |source| Error::Block { serial: block.serial.clone(), source };
            let disk = Disk::open(&block.path, block.read_only, &block.serial).map_err(block_err)?;
            let device = Block::new(disk, new_irqfd()?).map_err(block_err)?;
            self.metrics.block.push((block.serial.clone(), device.metrics()));
            self.attach(format!("block:{}", block.serial), device)?;
        }
        Ok(())
    }

    fn attach_net_devices(&mut self, config: &VmConfig) -> Result<(), Error> {
        for net in &config.net {
            // Validated with the rest of the configuration; parsed again here for its bytes.
            let mac = crate::config::parse_mac(&net.mac)
                .map_err(|reason| crate::config::Error::Invalid { field: "net.mac".into(), reason })?;
            let device = Net::new(&net.tap, mac, new_irqfd()?)
                .map_err(|source| Error::Net { tap: net.tap.clone(), source })?;
            self.metrics.net.push((net.tap.clone(), device.metrics()));
            self.attach(format!("net:{}", net.tap), device)?;
        }
        Ok(())
    }

    fn attach_fs_devices(&mut self, config: &VmConfig) -> Result<(), Error> {
        for fs in &config.fs {
            let device = VhostUserFs::new(&fs.socket, &fs.tag, self.memory, new_irqfd()?)
                .map_err(|source| Error::Fs { tag: fs.tag.clone(), source })?;
            self.metrics.fs.push((fs.tag.clone(), device.metrics()));
            self.attach(format!("fs:{}", fs.tag), device)?;
        }
        Ok(())
    }

    fn attach_balloon(&mut self, config: &VmConfig) -> Result<(), Error> {
        if !config.free_page_reporting {
            return Ok(());
        }
        let device = Balloon::new(new_irqfd()?)?;
        self.metrics.balloon = Some(device.metrics());
        self.attach("balloon".into(), device)
    }

    fn attach_vsock_device(&mut self, config: &VmConfig) -> Result<SocketFile, Error> {
        let Some(vsock) = &config.vsock else {
            return Ok(SocketFile(None));
        };
        let device = Vsock::new(vsock.guest_cid, &vsock.uds_path, new_irqfd()?)?;
        let socket = SocketFile(Some(vsock.uds_path.clone()));
        self.metrics.vsock = Some(device.metrics());
        self.attach("vsock".into(), device)?;
        Ok(socket)
    }
}

fn new_irqfd() -> Result<EventFd, Error> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)
}

/// The serial console and the i8042 on the port I/O bus, with their interrupts wired as irqfds.
fn legacy_pio_bus(
    vm: &Vm,
    config: &VmConfig,
    exit: &VmExit,
    vmm_start: std::time::Instant,
) -> Result<Bus, Error> {
    let mut bus = Bus::new();
    let serial_irq = new_irqfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = SerialDevice::new(EventFdTrigger(serial_irq), serial_output(&config.serial)?);
    bus.insert(u64::from(SERIAL_PORT), u64::from(SERIAL_PORT_LEN), Arc::new(Mutex::new(serial)))?;
    let i8042 = I8042::new(exit.clone());
    bus.insert(u64::from(I8042_PORT), u64::from(I8042_PORT_LEN), Arc::new(Mutex::new(i8042)))?;
    if config.boot_timer {
        use crate::devices::legacy::boot_timer::{BootTimer, BOOT_TIMER_PORT};
        bus.insert(u64::from(BOOT_TIMER_PORT), 1, Arc::new(Mutex::new(BootTimer::new(vmm_start))))?;
    }
    Ok(bus)
}

fn serial_output(output: &SerialOutput) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| Error::SerialOutput { path: path.clone(), source })?)
        }
    })
}

fn block_stop_signals() -> Result<SignalFd, Error> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Not a stop: a request to write the counters now.
    set.add(Signal::SIGUSR1);
    set.thread_block().map_err(Error::Signals)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(Error::Signals)
}

/// Watches the VM exit and the signals: SIGTERM and SIGINT stop the VM, SIGUSR1 writes the
/// counters.
struct ExitWatcher {
    exit: VmExit,
    signals: SignalFd,
    reporter: Option<Arc<Mutex<MetricsReporter>>>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.signals.as_raw_fd() {
            while let Ok(Some(info)) = self.signals.read_signal() {
                let signal = i32::try_from(info.ssi_signo).unwrap_or(0);
                if signal == libc::SIGUSR1 {
                    if let Some(reporter) = &self.reporter {
                        MetricsReporter::write_running(reporter);
                    }
                } else {
                    self.exit.record(ExitReason::Signal(signal));
                }
            }
        } else {
            self.exit.consume_event();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration only fails on a bad fd, which these are not; the loop would then never wake.
        let _ = ops.add(Events::new(self.exit.event(), EventSet::IN));
        let _ = ops.add(Events::new(&self.signals, EventSet::IN));
    }
}

fn run_event_loop(
    mut manager: EventManager<Subscriber>,
    exit: &VmExit,
    signals: SignalFd,
    reporter: Option<Arc<Mutex<MetricsReporter>>>,
    metrics_timer: Option<MetricsTimer>,
) -> Result<(), Error> {
    if let Some(timer) = metrics_timer {
        manager.add_subscriber(Arc::new(Mutex::new(timer)));
    }
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone(), signals, reporter })));
    while exit.reason().is_none() {
        manager.run().map_err(Error::EventLoop)?;
    }
    Ok(())
}
