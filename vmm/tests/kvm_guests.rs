#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! ironclad-vmm on this machine's KVM with the freestanding test guests, through the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_ironclad-vmm");

/// A test without KVM fails, naming it (or skips where IRONCLAD_ALLOW_SKIP=1 says so).
fn kvm_available() -> bool {
    ironclad_test_prereq::needs().kvm().ready()
}

/// A VMM the test started, killed if the test fails before it ends.
struct Running(Option<std::process::Child>);

impl Running {
    fn new(child: std::process::Child) -> Self {
        Running(Some(child))
    }

    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().unwrap()
    }

    fn into_output(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for the VMM to end by itself, failing the test after `within`.
fn wait_for_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "ironclad-vmm did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_vmm(args: &[&str]) -> Output {
    let child = Command::new(VMM).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut vmm = Running::new(child);
    wait_for_exit(vmm.child(), Duration::from_secs(60));
    vmm.into_output()
}

#[test]
fn serial_output_and_reset_exit() {
    if !kvm_available() {
        return;
    }
    let output =
        run_vmm(&["--kernel", ironclad_test_guests::SERIAL_HELLO, "--cmdline", "console=ttyS0 marker=42"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "status {:?}, stderr {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout, "ironclad test guest: hello\ncmdline: console=ttyS0 marker=42\n");
}

#[test]
fn serial_output_to_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let serial = format!("file:{}", log.display());
    let output = run_vmm(&["--kernel", ironclad_test_guests::SERIAL_HELLO, "--serial", &serial]);
    assert!(output.status.success());
    assert!(output.stdout.is_empty());
    assert!(std::fs::read_to_string(&log).unwrap().starts_with("ironclad test guest: hello\n"));
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    if !kvm_available() {
        return;
    }
    let mut guard = Running::new(
        Command::new(VMM)
            .args(["--kernel", ironclad_test_guests::SPIN_FOREVER])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = guard.child();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "spinning\n");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_for_exit(child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
}

/// The counters are written every second while the VM runs, and at once on SIGUSR1.
#[test]
fn counters_are_readable_while_the_vm_runs() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let metrics_path = dir.path().join("metrics.json");
    let mut guard = Running::new(
        Command::new(VMM)
            .args([
                "--kernel",
                ironclad_test_guests::SPIN_FOREVER,
                "--metrics",
                metrics_path.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = guard.child();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let read =
        || -> Option<serde_json::Value> { serde_json::from_slice(&std::fs::read(&metrics_path).ok()?).ok() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while read().is_none_or(|m| m["exit"] != "running") {
        assert!(Instant::now() < deadline, "no counters while the VM runs: {:?}", read());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Emptied in place (the VMM holds the file open), then asked for the counters now.
    std::fs::OpenOptions::new().write(true).truncate(true).open(&metrics_path).unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let asked = Instant::now();
    while read().is_none_or(|m| m["exit"] != "running") {
        assert!(asked.elapsed() < Duration::from_secs(5), "SIGUSR1 wrote no counters");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(child.try_wait().unwrap().is_none(), "SIGUSR1 is no stop");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_for_exit(child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(read().is_some_and(|m| m["exit"].as_str().unwrap_or("").contains("Signal")), "{:?}", read());
}

#[test]
fn a_bad_configuration_names_the_field_and_touches_no_kvm() {
    let output = run_vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid configuration: kernel: /nonexistent/vmlinux"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(&config, format!(r#"{{"kernel": "{}", "vcpus": 0}}"#, ironclad_test_guests::SERIAL_HELLO))
        .unwrap();
    let output = run_vmm(&["--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid configuration: vcpus"));
}

#[test]
fn a_kernel_that_is_not_one_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("garbage");
    std::fs::write(&kernel, vec![0x42u8; 64 * 1024]).unwrap();
    let output = run_vmm(&["--kernel", kernel.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("neither a loadable ELF vmlinux nor a bzImage"), "{stderr}");
}

#[test]
fn every_vcpu_is_announced_in_the_mp_table() {
    if !kvm_available() {
        return;
    }
    for vcpus in ["1", "2", "4"] {
        let output = run_vmm(&["--kernel", ironclad_test_guests::MPTABLE_PROBE, "--vcpus", vcpus]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{vcpus} vCPUs: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("mp table checksum: ok"), "{stdout}");
        assert!(stdout.contains(&format!("cpus: 0x{:016x}", vcpus.parse::<u64>().unwrap())), "{stdout}");
        assert!(stdout.contains("boot cpu: 0x0000000000000000"), "{stdout}");
    }
}

/// A disk image whose sector 0 carries a marker the guest prints.
fn disk_image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let mut contents = vec![0u8; 8 * 512];
    let marker = b"IRONCLAD SECTOR ZERO: hello from the host";
    contents[..marker.len()].copy_from_slice(marker);
    std::fs::write(&path, contents).unwrap();
    path
}

fn metrics(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn virtio_blk_read_write_flush_and_get_id() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let metrics_path = dir.path().join("metrics.json");
    let block = format!("path={},serial=ironclad-disk-7", disk.display());
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::VIRTIO_BLK,
        "--block",
        &block,
        "--metrics",
        metrics_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    for line in [
        "capacity: 0x0000000000000008",
        "id: ironclad-disk-7",
        "sector 0 says: IRONCLAD SECTOR ZERO: hello from the hos",
        "write sector 1: ok",
        "flush: ok",
        "read back: same",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    let contents = std::fs::read(&disk).unwrap();
    assert!(contents[512..].starts_with(b"written by the ironclad test guest"), "the write reached the file");
    let counters = &metrics(&metrics_path)["block"][0][1];
    assert_eq!(counters["write_requests"], 1);
    assert_eq!(counters["invalid_requests"], 0);
}

#[test]
fn virtio_balloon_free_page_reporting_gives_memory_back() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let metrics_path = dir.path().join("metrics.json");
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::VIRTIO_BALLOON,
        "--free-page-reporting",
        "--metrics",
        metrics_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for line in [
        "num_pages: 0x0000000000000000",
        "report: used",
        "reported block: zero",
        "report outside memory: used",
        "inflate: used",
        "inflated page: zero",
        "deflate: used",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(stderr.contains("balloon: the guest sent a malformed free page report"), "{stderr}");
    let counters = &metrics(&metrics_path)["balloon"];
    assert_eq!(counters["reported_bytes"], 65536);
    assert_eq!(counters["reports"], 1);
    assert_eq!(counters["invalid_requests"], 1);
    assert_eq!(counters["inflated_pages"], 1);
    assert_eq!(counters["deflate_requests"], 1);
    assert_eq!(counters["discard_errors"], 0);
}

#[test]
fn virtio_blk_read_only_disk_refuses_the_guest_write() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let before = std::fs::read(&disk).unwrap();
    let block = format!("path={},serial=ro,ro", disk.display());
    let output = run_vmm(&["--kernel", ironclad_test_guests::VIRTIO_BLK, "--block", &block]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("write sector 1: error"), "{stdout}");
    assert_eq!(std::fs::read(&disk).unwrap(), before, "a read-only disk is not written");
}

#[test]
fn a_hostile_guest_gets_errors_and_cannot_crash_the_vmm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let metrics_path = dir.path().join("metrics.json");
    let block = format!("path={},serial=junk", disk.display());
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::VIRTIO_GARBAGE,
        "--block",
        &block,
        "--metrics",
        metrics_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the VMM must survive: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ioerr = "0x0000000000000001";
    for (what, expected) in [
        ("status after abuse", "0x0000000000000000"),
        ("data outside guest memory", ioerr),
        ("data in the MMIO hole", ioerr),
        ("past the end of the disk", ioerr),
        ("unaligned length", ioerr),
        ("unknown request type", "0x0000000000000002"),
        ("writable header", ioerr),
        ("looping chain used length", "0x0000000000000000"),
        ("next past the queue used length", "0x0000000000000000"),
        ("honest read", "0x0000000000000000"),
    ] {
        assert!(
            stdout.contains(&format!("{what}: {expected}\n")),
            "{what}: expected {expected} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("garbage done"), "{stdout}");
    let metrics = metrics(&metrics_path);
    let counters = &metrics["block"][0][1];
    assert!(counters["invalid_requests"].as_u64().unwrap() >= 8, "{counters}");
    assert!(counters["unanswerable_chains"].as_u64().unwrap() >= 2, "{counters}");
    let disk = &metrics["devices"][0];
    assert_eq!(disk["id"], "block:junk", "{metrics}");
    assert!(disk["rejected_accesses"].as_u64().unwrap() >= 4, "{metrics}");
    // The VMM said how it set the disk up, and logged the guest's malformed requests within its
    // budget: fewer lines than requests.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ironclad-vmm: INFO block:junk: virtio-mmio at 0xd0000000"), "{stderr}");
    let malformed =
        stderr.lines().filter(|l| l.contains("disk junk: the guest sent a malformed request")).count();
    let invalid = counters["invalid_requests"].as_u64().unwrap();
    assert!(malformed >= 1, "no guest error logged: {stderr}");
    assert!(malformed <= ironclad_vmm::logger::GUEST_ERROR_BURST as usize, "{malformed} lines: {stderr}");
    assert!((malformed as u64) < invalid, "{malformed} lines for {invalid} bad requests");
}

/// The VMM may not remove files once it runs (seccomp): its socket stays, but nobody answers on it.
fn assert_socket_is_dead(uds: &std::path::Path) {
    let err = std::os::unix::net::UnixStream::connect(uds).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

/// The next connection on `listener`, or a failed test after `within`.
fn accept_within(
    listener: &std::os::unix::net::UnixListener,
    within: Duration,
) -> std::os::unix::net::UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {within:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

fn read_line(stream: &mut std::os::unix::net::UnixStream) -> String {
    use std::io::Read;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn virtio_vsock_connections_both_ways_through_the_hybrid_socket() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let metrics_path = dir.path().join("metrics.json");
    // Guest -> host port 5000 arrives at <uds>_5000.
    let port_listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut vmm = Running::new(
        Command::new(VMM)
            .args(["--kernel", ironclad_test_guests::VIRTIO_VSOCK, "--vsock", &vsock])
            .args(["--metrics", metrics_path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let timeout = Some(Duration::from_secs(30));

    let mut from_guest = accept_within(&port_listener, Duration::from_secs(30));
    from_guest.set_read_timeout(timeout).unwrap();
    assert_eq!(read_line(&mut from_guest), "ping from the guest\n");
    from_guest.write_all(b"pong from the host\n").unwrap();
    let mut rest = Vec::new();
    from_guest.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the guest's shutdown closes the stream");

    // Host -> guest port 1024, Firecracker's handshake.
    let mut to_guest = UnixStream::connect(&uds).unwrap();
    to_guest.set_read_timeout(timeout).unwrap();
    to_guest.write_all(b"CONNECT 1024\n").unwrap();
    assert_eq!(read_line(&mut to_guest), "OK 1073741824\n");
    to_guest.write_all(b"hello guest\n").unwrap();
    assert_eq!(read_line(&mut to_guest), "hello host\n");
    drop(to_guest);

    let status = wait_for_exit(vmm.child(), Duration::from_secs(30));
    let mut stdout = String::new();
    vmm.child().stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(status.success(), "{status}\n{stdout}");
    for line in [
        "guest->host: connected",
        "guest got: pong from the host",
        "guest->host: closed",
        "host->guest: accepted from port 0x0000000040000000",
        "guest got: hello guest",
        "host->guest: closed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert_socket_is_dead(&uds);
    let counters = &metrics(&metrics_path)["vsock"];
    assert_eq!(counters["host_connections"], 1);
    assert_eq!(counters["guest_connections"], 1);
    assert_eq!(counters["bad_tx_packets"], 0);
}

#[test]
fn a_bad_vsock_handshake_is_dropped_and_the_vmm_goes_on() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut vmm = Running::new(
        Command::new(VMM)
            .args(["--kernel", ironclad_test_guests::SPIN_FOREVER, "--vsock", &vsock])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !uds.exists() {
        assert!(Instant::now() < deadline, "no vsock socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    for junk in [&b"GET / HTTP/1.1\r\n"[..], &[0xffu8; 64][..], b"CONNECT abc\n"] {
        let mut client = UnixStream::connect(&uds).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.write_all(junk).unwrap();
        let mut buf = [0u8; 16];
        // Closed without an answer: EOF, or a reset when junk was left unread in the socket.
        match client.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "answered {:?}", &buf[..n]),
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
        }
    }
    assert!(vmm.child().try_wait().unwrap().is_none(), "the VMM is still running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(vmm.child().id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(vmm.child().wait().unwrap().success());
    assert_socket_is_dead(&uds);
}

/// A network namespace made for one test, deleted (with its tap) when the test ends.
struct NetNs(String);

impl NetNs {
    fn with_tap(tap: &str) -> Option<Self> {
        if !ironclad_test_prereq::needs().root().program("ip").ready() {
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ironclad-t{}-{n}", std::process::id());
        let ip = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
        assert!(ip(&["netns", "add", &name]), "cannot create network namespace {name}");
        let ns = NetNs(name);
        assert!(ip(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"]), "tap in {}", ns.0);
        assert!(ip(&["-n", &ns.0, "link", "set", tap, "up"]));
        Some(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

const ETHERTYPE: u16 = 0x88b5;

/// A raw AF_PACKET socket on `tap` inside the namespace, for frames of our ethertype only.
fn packet_socket(ns: &str, tap: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let netns = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // Only this thread moves into the namespace; the socket stays bound to it.
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let protocol = i32::from(ETHERTYPE.to_be());
    // SAFETY: a plain socket(2) call; the returned fd is checked and then owned by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a freshly created, valid socket that nothing else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: name is a valid NUL-terminated string for the duration of the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0, "no {tap} in {ns}");
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = ETHERTYPE.to_be();
    address.sll_ifindex = i32::try_from(ifindex).unwrap();
    // SAFETY: address is a properly initialised sockaddr_ll and its exact size is passed.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::addr_of!(address).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval { tv_sec: 30, tv_usec: 0 };
    // SAFETY: SO_RCVTIMEO takes a timeval, which is what is passed, with its size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(ret, 0);
    socket
}

#[test]
fn virtio_net_frames_both_ways_through_a_tap() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::with_tap("tap0") else { return };
    let ns_name = ns.0.clone();
    // The host side: receive the guest's frame, answer it. The VMM starts once the socket is
    // bound, or the guest's frame could go by before anyone listens.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let host = std::thread::spawn(move || {
        let socket = packet_socket(&ns_name, "tap0");
        bound_tx.send(()).unwrap();
        let mut frame = [0u8; 1600];
        // SAFETY: frame is a writable buffer of the length passed.
        let n = unsafe { libc::recv(socket.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), 0) };
        assert!(n > 0, "no frame from the guest: {}", std::io::Error::last_os_error());
        let frame = &frame[..n as usize];
        let guest_mac: [u8; 6] = frame[6..12].try_into().unwrap();
        let mut reply = [0u8; 60];
        reply[..6].copy_from_slice(&guest_mac);
        reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        reply[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        reply[14..14 + 18].copy_from_slice(b"pong from the host");
        // SAFETY: reply is a readable buffer of the length passed; the socket is bound to the tap.
        let sent = unsafe { libc::send(socket.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
        assert_eq!(sent, 60, "send: {}", std::io::Error::last_os_error());
        (guest_mac, frame[14..14 + 19].to_vec())
    });
    bound_rx.recv_timeout(Duration::from_secs(10)).expect("packet socket");
    let mut vmm = Running::new(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, VMM, "--kernel", ironclad_test_guests::VIRTIO_NET])
            .args(["--net", "tap=tap0,mac=02:00:00:00:00:01"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (guest_mac, payload) = host.join().unwrap();
    assert_eq!(guest_mac, [0x02, 0, 0, 0, 0, 0x01]);
    assert_eq!(payload, b"ping from the guest");
    let status = wait_for_exit(vmm.child(), Duration::from_secs(60));
    let mut stdout = String::new();
    vmm.child().stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(status.success(), "{status}\n{stdout}");
    assert!(stdout.contains("mac: 02:00:00:00:00:01 link up"), "{stdout}");
    assert!(stdout.contains("net got: pong from the host"), "{stdout}");
}

#[test]
fn a_missing_tap_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::with_tap("tap0") else { return };
    // In a namespace where only tap0 exists, ask for a name that cannot be created as a tap: it
    // is taken by the loopback device.
    let output = Command::new("ip")
        .args(["netns", "exec", &ns.0, VMM, "--kernel", ironclad_test_guests::SERIAL_HELLO])
        .args(["--net", "tap=lo,mac=02:00:00:00:00:01"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot set up the network device on tap lo"), "{stderr}");
}

fn host_has_hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn a_fatal_vcpu_error_ends_the_vmm_with_the_reason() {
    if !kvm_available() {
        return;
    }
    let output = run_vmm(&["--kernel", ironclad_test_guests::SSE_INSTRUCTION]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("before sse"), "{stdout}");
    assert!(!stdout.contains("after sse"), "{stdout}");
    if host_has_hardware_virtualization() {
        // #UD without an IDT: a triple fault, which is a reset.
        assert!(output.status.success(), "{stderr}");
    } else {
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("the VM failed: vCPU 0: KVM internal error"), "{stderr}");
    }
}

#[test]
fn a_hostile_net_driver_gets_its_junk_dropped_and_an_honest_frame_through() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::with_tap("tap0") else { return };
    let dir = tempfile::tempdir().unwrap();
    let metrics_path = dir.path().join("metrics.json");
    let ns_name = ns.0.clone();
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let host_done = done.clone();
    // The host side: the first frame of ours must be the honest one (the junk never reached the
    // tap); then frames go to the guest until it has one in a buffer it can use.
    let host = std::thread::spawn(move || {
        let socket = packet_socket(&ns_name, "tap0");
        bound_tx.send(()).unwrap();
        let mut frame = [0u8; 1600];
        // SAFETY: frame is a writable buffer of the length passed.
        let n = unsafe { libc::recv(socket.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), 0) };
        assert!(n > 0, "no frame from the guest: {}", std::io::Error::last_os_error());
        let first = frame[14..14 + 27].to_vec();
        let mut reply = [0u8; 60];
        reply[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        reply[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        reply[14..14 + 18].copy_from_slice(b"pong from the host");
        let mut sent = 0;
        while !host_done.load(Ordering::Relaxed) && sent < 600 {
            // SAFETY: reply is a readable buffer of the length passed; the socket is bound to the tap.
            unsafe { libc::send(socket.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
            sent += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        first
    });
    bound_rx.recv_timeout(Duration::from_secs(10)).expect("packet socket");
    let mut vmm = Running::new(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, VMM, "--kernel", ironclad_test_guests::VIRTIO_NET_GARBAGE])
            .args(["--net", "tap=tap0,mac=02:00:00:00:00:01", "--metrics", metrics_path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = wait_for_exit(vmm.child(), Duration::from_secs(60));
    done.store(true, Ordering::Relaxed);
    let first = host.join().unwrap();
    let mut stdout = String::new();
    vmm.child().stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(status.success(), "the VMM must survive: {status}\n{stdout}");
    assert_eq!(first, b"honest frame from the guest", "junk reached the tap first");
    assert!(stdout.contains("net got: pong from the host"), "{stdout}");
    let counters = &metrics(&metrics_path)["net"][0][1];
    assert_eq!(counters["tx_malformed"], 6, "{counters}");
    assert_eq!(counters["tx_frames"], 1, "{counters}");
    assert!(counters["rx_dropped"].as_u64().unwrap() >= 2, "{counters}");
}

#[test]
fn a_hostile_vsock_driver_is_answered_within_bounds_and_the_vmm_goes_on() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let metrics_path = dir.path().join("metrics.json");
    let port_listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut vmm = Running::new(
        Command::new(VMM)
            .args(["--kernel", ironclad_test_guests::VIRTIO_VSOCK_GARBAGE, "--vsock", &vsock])
            .args(["--metrics", metrics_path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut from_guest = accept_within(&port_listener, Duration::from_secs(60));
    from_guest.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(read_line(&mut from_guest), "still serving\n");
    let status = wait_for_exit(vmm.child(), Duration::from_secs(60));
    let mut stdout = String::new();
    vmm.child().stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(status.success(), "the VMM must survive: {status}\n{stdout}");
    // Two thousand packets for nobody get at most the queue's worth of resets; two thousand
    // credit requests, one update.
    for (what, expected) in [
        ("resets received", "0x0000000000000100"),
        ("responses received", "0x0000000000000001"),
        ("credit updates received", "0x0000000000000001"),
        ("other packets received", "0x0000000000000000"),
    ] {
        assert!(
            stdout.contains(&format!("{what}: {expected}\n")),
            "{what}: expected {expected} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("garbage done"), "{stdout}");
    let counters = &metrics(&metrics_path)["vsock"];
    assert_eq!(counters["bad_tx_packets"], 4, "{counters}");
    assert_eq!(counters["resets_dropped"], 2002 - 256, "{counters}");
    assert_eq!(counters["guest_connections"], 1, "{counters}");
}

/// A reader that went away must not turn the VMM's last words into a crash (a panic or an abort
/// would dump core, and the exit status would no longer say what happened).
fn assert_clean_exit_with_stderr_closed(args: &[&str], expected_code: i32) {
    let mut child =
        Command::new(VMM).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stderr.take());
    let mut vmm = Running::new(child);
    let status = wait_for_exit(vmm.child(), Duration::from_secs(60));
    assert_eq!(status.code(), Some(expected_code), "{args:?}: {status}");
}

#[test]
fn a_closed_stderr_does_not_crash_the_vmm() {
    assert_clean_exit_with_stderr_closed(&["--kernel", "/nonexistent/vmlinux"], 1);
}

#[test]
fn a_guest_flooding_the_boot_timer_with_stderr_closed_cannot_crash_the_vmm() {
    if !kvm_available() {
        return;
    }
    // Where KVM emulates the guest, the SSE instruction is a fatal vCPU error (exit 1, said on a
    // stderr nobody reads); with hardware virtualization it is a reset (exit 0).
    let expected = if host_has_hardware_virtualization() { 0 } else { 1 };
    assert_clean_exit_with_stderr_closed(
        &["--kernel", ironclad_test_guests::BOOT_TIMER_FLOOD, "--boot-timer"],
        expected,
    );
    // With stderr read, the flood is cut short.
    let output = run_vmm(&["--kernel", ironclad_test_guests::BOOT_TIMER_FLOOD, "--boot-timer"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("boot-timer").count(), 8, "{stderr}");
}

#[test]
fn guest_memory_is_kept_out_of_core_dumps() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Running::new(
        Command::new(VMM)
            .args(["--kernel", ironclad_test_guests::SPIN_FOREVER, "--memory-mib", "96"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let smaps_path = format!("/proc/{}/smaps", vmm.child().id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let flags = loop {
        let smaps = std::fs::read_to_string(&smaps_path).unwrap_or_default();
        // The guest's RAM is the one mapping of exactly its size.
        let flags = smaps
            .split("\nSize:")
            .skip(1)
            .find(|rest| rest.trim_start().starts_with("98304 kB"))
            .and_then(|rest| rest.lines().find(|l| l.starts_with("VmFlags:")));
        if let Some(flags) = flags {
            break flags.to_string();
        }
        assert!(Instant::now() < deadline, "no 96 MiB mapping in {smaps_path}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
}

#[test]
fn the_guest_sees_a_hypervisor_and_the_tsc_deadline_timer() {
    if !kvm_available() {
        return;
    }
    let output = run_vmm(&["--kernel", ironclad_test_guests::CPUID_PROBE]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let ecx = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cpuid 1 ecx: 0x"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("no CPUID line in {stdout}"));
    assert_ne!(ecx & (1 << 31), 0, "hypervisor bit: {ecx:#x}");
    // This machine's KVM reports KVM_CAP_TSC_DEADLINE_TIMER; so does every KVM since Linux 3.2.
    assert_ne!(ecx & (1 << 24), 0, "TSC-deadline bit: {ecx:#x}");
}

/// virtiofsd serving `shared` on `socket`, as the shim starts it (its namespace sandbox, seccomp).
fn start_virtiofsd(shared: &std::path::Path, socket: &std::path::Path) -> Running {
    let child = Command::new("virtiofsd")
        .arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(shared)
        .args(["--sandbox", "namespace", "--seccomp", "kill", "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "virtiofsd did not create {}", socket.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    Running::new(child)
}

/// The vhost-user handshake, memory table and vrings against a real virtiofsd, driven by a guest
/// that speaks FUSE on the request queue: it reads a host file and makes a directory on the host.
#[test]
fn virtio_fs_reaches_a_real_virtiofsd_both_ways() {
    if !kvm_available() || !ironclad_test_prereq::needs().root().program("virtiofsd").ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), "hello from the host share").unwrap();
    let socket = dir.path().join("fs.sock");
    let mut virtiofsd = start_virtiofsd(&shared, &socket);
    let metrics_path = dir.path().join("metrics.json");
    let fs = format!("socket={},tag=testfs", socket.display());
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::VIRTIO_FS,
        "--fs",
        &fs,
        "--metrics",
        metrics_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    for line in [
        "tag: testfs",
        "request queues: 0x0000000000000001",
        "init: ok",
        "fuse major: 0x0000000000000007",
        "lookup: ok",
        "open: ok",
        "read: ok",
        "file says: hello from the host share",
        "mkdir: ok",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(shared.join("made-by-guest").is_dir(), "the guest's mkdir did not reach the host");
    let counters = &metrics(&metrics_path)["fs"][0][1];
    assert_eq!(counters["activate_fails"], 0);
    // The backend ends with its frontend.
    wait_for_exit(virtiofsd.child(), Duration::from_secs(10));
}

#[test]
fn a_missing_virtiofsd_socket_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::VIRTIO_FS,
        "--fs",
        "socket=/nonexistent/ironclad-fs.sock,tag=testfs",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("testfs") && stderr.contains("/nonexistent/ironclad-fs.sock"), "{stderr}");
}
