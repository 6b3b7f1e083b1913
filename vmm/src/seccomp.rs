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

/// Calls every thread needs: memory, locks, signals, thread exit. `mmap` and `mprotect` are
/// allowed only without PROT_EXEC (below): nothing executable is mapped after setup.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
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

/// The main thread's work after setup. No call opens or removes a file: the metrics file is
/// opened before the filter goes on, and the vsock socket is removed by whoever owns its directory.
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
    libc::SYS_ftruncate,
    libc::SYS_close,
    libc::SYS_fcntl,
    // The vsock muxer: accepting host clients, connecting for the guest (socket() is narrowed to
    // AF_UNIX below), moving data.
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
];

/// The only socket the running VMM makes: a non-blocking Unix stream for a guest's connection.
const VSOCK_SOCKET_TYPE: u64 = (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|nr| (*nr, vec![])).collect();
    let rule = |conditions: Vec<SeccompCondition>| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(conditions)?])
    };
    let never_exec = || SeccompCondition::new(2, Dword, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    rules.insert(libc::SYS_mmap, rule(vec![never_exec()?])?);
    rules.insert(libc::SYS_mprotect, rule(vec![never_exec()?])?);
    let only_ioctl = |request: u64| rule(vec![SeccompCondition::new(1, Dword, SeccompCmpOp::Eq, request)?]);
    match kind {
        ThreadKind::Vmm => {
            rules.extend(VMM.iter().map(|nr| (*nr, vec![])));
            rules.insert(
                libc::SYS_socket,
                rule(vec![
                    SeccompCondition::new(0, Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?,
                    SeccompCondition::new(1, Dword, SeccompCmpOp::Eq, VSOCK_SOCKET_TYPE)?,
                    SeccompCondition::new(2, Qword, SeccompCmpOp::Eq, 0)?,
                ])?,
            );
            // The balloon gives memory back: a hole in the memfd shared with vhost-user backends.
            rules.insert(
                libc::SYS_fallocate,
                rule(vec![SeccompCondition::new(
                    1,
                    Dword,
                    SeccompCmpOp::Eq,
                    (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
                )?])?,
            );
            // Rust's set_nonblocking on accepted streams.
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

    /// Runs `call` in a forked child under `kind`'s filter with the SIGSYS handler installed, as
    /// the VMM runs; returns how the child ended and what it wrote to stderr.
    fn run_filtered(kind: ThreadKind, call: fn() -> i64) -> (nix::sys::wait::WaitStatus, String) {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        // Built before forking: the child must not allocate.
        let program = filter(kind).unwrap();
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only makes raw syscalls (dup2, sigaction, prctl, seccomp, the call
        // under test) before _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: dup2 on two descriptors this process owns.
                unsafe { libc::dup2(write_end.as_raw_fd(), libc::STDERR_FILENO) };
                let code = if install_sigsys_handler().is_ok() && apply(kind, &program).is_ok() {
                    if call() >= 0 {
                        0
                    } else {
                        2
                    }
                } else {
                    3
                };
                // SAFETY: ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(write_end);
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                let mut stderr = String::new();
                std::fs::File::from(read_end).read_to_string(&mut stderr).unwrap();
                (status, stderr)
            }
        }
    }

    fn exited_with(status: nix::sys::wait::WaitStatus, code: i32) -> bool {
        matches!(status, nix::sys::wait::WaitStatus::Exited(_, c) if c == code)
    }

    #[test]
    fn a_denied_call_exits_148_and_names_the_syscall() {
        // SAFETY: getppid takes no arguments.
        let (status, stderr) = run_filtered(ThreadKind::Vcpu, || unsafe { libc::syscall(libc::SYS_getppid) });
        assert!(exited_with(status, SECCOMP_VIOLATION_EXIT), "{status:?}");
        assert_eq!(stderr, format!("ironclad-vmm: seccomp: denied syscall {}\n", libc::SYS_getppid));
    }

    #[test]
    fn the_vmm_thread_makes_unix_stream_sockets_only() {
        let unix = || socket_of(libc::AF_UNIX, VSOCK_SOCKET_TYPE as i32);
        let (status, stderr) = run_filtered(ThreadKind::Vmm, unix);
        assert!(exited_with(status, 0), "{status:?}: {stderr}");
        fn socket_of(family: i32, kind: i32) -> i64 {
            // SAFETY: socket takes three integers.
            unsafe { libc::socket(family, kind, 0) as i64 }
        }
        type Call = fn() -> i64;
        let others: [(&str, Call); 4] = [
            ("AF_INET", || socket_of(libc::AF_INET, VSOCK_SOCKET_TYPE as i32)),
            ("AF_INET6", || socket_of(libc::AF_INET6, libc::SOCK_STREAM)),
            ("AF_NETLINK", || socket_of(libc::AF_NETLINK, libc::SOCK_RAW)),
            ("AF_PACKET", || socket_of(libc::AF_PACKET, libc::SOCK_RAW)),
        ];
        for (family, call) in others {
            let (status, stderr) = run_filtered(ThreadKind::Vmm, call);
            assert!(exited_with(status, SECCOMP_VIOLATION_EXIT), "{family}: {status:?}");
            assert!(stderr.contains(&format!("denied syscall {}", libc::SYS_socket)), "{stderr}");
        }
        // A blocking Unix socket is not what the muxer makes either.
        let blocking = || socket_of(libc::AF_UNIX, libc::SOCK_STREAM);
        assert!(exited_with(run_filtered(ThreadKind::Vmm, blocking).0, SECCOMP_VIOLATION_EXIT));
    }

    #[test]
    fn the_vmm_thread_punches_holes_and_allocates_nothing() {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::{AtomicI32, Ordering};
        // The call cannot capture: the file it works on is handed over in a static.
        static FILE: AtomicI32 = AtomicI32::new(-1);
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        FILE.store(file.as_raw_fd(), Ordering::SeqCst);
        fn fallocate(mode: i32) -> i64 {
            // SAFETY: fallocate on a descriptor the test keeps open, with integer arguments.
            unsafe { libc::fallocate(FILE.load(Ordering::SeqCst), mode, 0, 4096) as i64 }
        }
        let punch = || fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
        let (status, stderr) = run_filtered(ThreadKind::Vmm, punch);
        assert!(exited_with(status, 0), "{status:?}: {stderr}");
        for (what, call) in [
            ("allocate", (|| fallocate(0)) as fn() -> i64),
            ("zero range", || fallocate(libc::FALLOC_FL_ZERO_RANGE)),
        ] {
            let (status, stderr) = run_filtered(ThreadKind::Vmm, call);
            assert!(exited_with(status, SECCOMP_VIOLATION_EXIT), "{what}: {status:?}");
            assert!(stderr.contains(&format!("denied syscall {}", libc::SYS_fallocate)), "{stderr}");
        }
        assert!(exited_with(run_filtered(ThreadKind::Vcpu, punch).0, SECCOMP_VIOLATION_EXIT), "vCPU threads");
    }

    #[test]
    fn no_thread_opens_or_removes_files_after_setup() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            // SAFETY: a NUL-terminated path and flags.
            let open =
                || unsafe { libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY) as i64 };
            let (status, stderr) = run_filtered(kind, open);
            assert!(exited_with(status, SECCOMP_VIOLATION_EXIT), "{kind:?}: {status:?}");
            assert!(stderr.contains(&format!("denied syscall {}", libc::SYS_openat)), "{stderr}");
            // SAFETY: a NUL-terminated path.
            let unlink = || unsafe { libc::unlink(c"/nonexistent/ironclad".as_ptr()) as i64 };
            assert!(exited_with(run_filtered(kind, unlink).0, SECCOMP_VIOLATION_EXIT), "{kind:?}");
        }
    }

    #[test]
    fn no_thread_maps_executable_memory_after_setup() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            let map_exec = || {
                // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if addr == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            };
            let (status, stderr) = run_filtered(kind, map_exec);
            assert!(exited_with(status, SECCOMP_VIOLATION_EXIT), "{kind:?}: {status:?}");
            assert!(stderr.contains(&format!("denied syscall {}", libc::SYS_mmap)), "{stderr}");
            let protect_exec = || {
                // SAFETY: an anonymous mapping without PROT_EXEC (allowed), then mprotect asking for it.
                unsafe {
                    let addr = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    libc::mprotect(addr, 4096, libc::PROT_READ | libc::PROT_EXEC) as i64
                }
            };
            let (status, stderr) = run_filtered(kind, protect_exec);
            assert!(exited_with(status, SECCOMP_VIOLATION_EXIT), "{kind:?}: {status:?}");
            assert!(stderr.contains(&format!("denied syscall {}", libc::SYS_mprotect)), "{stderr}");
            let map_data = || {
                // SAFETY: an anonymous read-write mapping, as allocators make.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if addr == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            };
            assert!(exited_with(run_filtered(kind, map_data).0, 0), "{kind:?}");
        }
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
