//! Seccomp filters, one per thread kind, default deny. A vCPU thread installs its filter first
//! thing; the main thread installs the VMM filter once the VM is built, before the event loop runs
//! guest-driven work. A denied call traps into a handler that names it and ends the VMM.
//!
//! The lists hold what each thread does after setup, read off strace runs of every device test.
//! (There is no API thread: ironclad-vmm takes its whole configuration at start.)

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit code when a thread makes a call its filter does not allow (as Firecracker's).
pub const SECCOMP_VIOLATION_EXIT: i32 = 148;
/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, devices, the vsock muxer, exit.
    Vmm,
    /// A vCPU thread: KVM_RUN and the bus devices it calls into.
    Vcpu,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot install the {0:?} seccomp filter")]
    Apply(ThreadKind, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// Calls every thread needs: memory, locks, signals, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
];

/// The main thread's work after setup.
const VMM: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_close,
    libc::SYS_fcntl,
    // The vsock muxer: accepting host clients, connecting for the guest, moving data.
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // At exit: the metrics file, removing the vsock socket.
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_unlink,
];

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|nr| (*nr, vec![])).collect();
    let only_ioctl = |request: u64| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let condition = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
        Ok(vec![SeccompRule::new(vec![condition])?])
    };
    match kind {
        ThreadKind::Vmm => {
            rules.extend(VMM.iter().map(|nr| (*nr, vec![])));
            // Rust's set_nonblocking on accepted and connected streams.
            rules.insert(libc::SYS_ioctl, only_ioctl(libc::FIONBIO)?);
        }
        ThreadKind::Vcpu => {
            rules.insert(libc::SYS_ioctl, only_ioctl(KVM_RUN)?);
        }
    }
    Ok(rules)
}

pub fn filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let build = |e| Error::Build(kind, e);
    let filter = SeccompFilter::new(
        rules(kind).map_err(build)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs `kind`'s filter on the calling thread.
pub fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), Error> {
    apply_filter(program).map_err(|e| Error::Apply(kind, e))
}

/// On a denied call: say which, and end the VMM (from the signal handler, so async-signal-safe only).
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGSYS the syscall
    // number is the int at byte 24 (after si_signo, si_errno, si_code, padding and _call_addr).
    let syscall = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    const PREFIX: &[u8] = b"ironclad-vmm: seccomp: denied syscall ";
    let mut message = [0u8; 64];
    message[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = syscall.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, digit) in digits[..count].iter().rev().enumerate() {
        message[PREFIX.len() + i] = *digit;
    }
    let len = PREFIX.len() + count + 1;
    message[len - 1] = b'\n';
    // SAFETY: write and _exit are async-signal-safe; the buffer is a live local of the given length.
    unsafe {
        libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), len);
        libc::_exit(SECCOMP_VIOLATION_EXIT);
    }
}

/// Routes SIGSYS to [`on_sigsys`] for the whole process.
pub fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty mask with no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only calls async-signal-safe functions; the old action is not needed.
    let ret = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_build() {
        assert!(!filter(ThreadKind::Vmm).unwrap().is_empty());
        assert!(!filter(ThreadKind::Vcpu).unwrap().is_empty());
    }

    #[test]
    fn vcpu_threads_may_not_open_files_or_sockets() {
        let vcpu = rules(ThreadKind::Vcpu).unwrap();
        for denied in [libc::SYS_openat, libc::SYS_socket, libc::SYS_execve, libc::SYS_connect] {
            assert!(!vcpu.contains_key(&denied), "{denied}");
        }
        let vmm = rules(ThreadKind::Vmm).unwrap();
        assert!(!vmm.contains_key(&libc::SYS_execve));
        assert!(!vmm.contains_key(&libc::SYS_clone3), "no new threads after setup");
    }

    #[test]
    fn a_denied_call_ends_a_filtered_process() {
        // Built before forking: the child must not allocate.
        let program = filter(ThreadKind::Vcpu).unwrap();
        // SAFETY: the child only installs the prebuilt filter and makes raw syscalls before _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = if apply(ThreadKind::Vcpu, &program).is_ok() {
                    // SAFETY: getppid has no arguments; the filter denies it, which is the point.
                    unsafe { libc::syscall(libc::SYS_getppid) };
                    0
                } else {
                    3
                };
                // SAFETY: ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert!(
                    matches!(
                        status,
                        nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
                    ),
                    "{status:?}"
                );
            }
        }
    }
}
