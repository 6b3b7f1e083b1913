//! Builds a VM from a validated [`VmConfig`] and runs it until it stops.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot;
use crate::arch::x86_64::layout::{I8042_PORT, I8042_PORT_LEN, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN};
use crate::bus::{self, Bus};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::EventFdTrigger;
use crate::vstate::memory::{self, create_guest_memory};
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
}

/// Boots the VM described by `config` and returns once it has stopped.
pub fn run_vm(config: &VmConfig) -> Result<ExitReason, Error> {
    config.validate()?;
    refuse_unsupported(config)?;
    // Signals are blocked before any thread starts, so that every thread inherits the mask and they
    // arrive only through the event loop's signalfd.
    let signals = block_stop_signals()?;
    let memory = create_guest_memory(config.memory_mib)?;
    let vm = Vm::new(&memory)?;
    let kernel = boot::load_kernel(&memory, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| boot::load_initrd(&memory, path))
        .transpose()?;
    boot::load_command_line(&memory, &config.cmdline)?;
    boot::write_zero_page(&memory, &kernel, config.cmdline.len(), initrd)?;

    let exit = VmExit::new().map_err(Error::EventFd)?;
    let pio = Arc::new(legacy_pio_bus(&vm, config, &exit)?);
    let mmio = Arc::new(Bus::new());
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, id, pio.clone(), mmio.clone(), exit.clone())?;
        vcpu.configure(&vm, &memory, kernel.entry, config.vcpus)?;
        vcpus.push(vcpu);
    }
    for vcpu in vcpus {
        // The threads are never joined: the process ends when the VM stops, taking them along.
        vcpu.start()?;
    }
    run_event_loop(&exit, signals)?;
    Ok(exit
        .reason()
        .unwrap_or(ExitReason::Error("the VM stopped without a reason".into())))
}

fn refuse_unsupported(config: &VmConfig) -> Result<(), Error> {
    if config.vcpus > 1 {
        return Err(Error::Unsupported(
            "more than one vCPU (the MP table that announces them is not written yet)",
        ));
    }
    if !config.block.is_empty() || !config.net.is_empty() || config.vsock.is_some() {
        return Err(Error::Unsupported(
            "virtio devices (block, net, vsock) are not built yet",
        ));
    }
    Ok(())
}

/// The serial console and the i8042 on the port I/O bus, with their interrupts wired as irqfds.
fn legacy_pio_bus(vm: &Vm, config: &VmConfig, exit: &VmExit) -> Result<Bus, Error> {
    let mut bus = Bus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = SerialDevice::new(EventFdTrigger(serial_irq), serial_output(&config.serial)?);
    bus.insert(
        u64::from(SERIAL_PORT),
        u64::from(SERIAL_PORT_LEN),
        Arc::new(Mutex::new(serial)),
    )?;
    let i8042 = I8042::new(exit.clone());
    bus.insert(
        u64::from(I8042_PORT),
        u64::from(I8042_PORT_LEN),
        Arc::new(Mutex::new(i8042)),
    )?;
    Ok(bus)
}

fn serial_output(output: &SerialOutput) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(File::create(path).map_err(|source| Error::SerialOutput {
            path: path.clone(),
            source,
        })?),
    })
}

fn block_stop_signals() -> Result<SignalFd, Error> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(Error::Signals)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(Error::Signals)
}

/// Watches the VM exit and the stop signals.
struct ExitWatcher {
    exit: VmExit,
    signals: SignalFd,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.signals.as_raw_fd() {
            while let Ok(Some(info)) = self.signals.read_signal() {
                self.exit
                    .record(ExitReason::Signal(i32::try_from(info.ssi_signo).unwrap_or(0)));
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

fn run_event_loop(exit: &VmExit, signals: SignalFd) -> Result<(), Error> {
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(Error::EventLoop)?;
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
        exit: exit.clone(),
        signals,
    })));
    while exit.reason().is_none() {
        manager.run().map_err(Error::EventLoop)?;
    }
    Ok(())
}
