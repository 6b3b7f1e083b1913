#![allow(clippy::unwrap_used)] // test support: a failed step should stop the test right there

//! Network namespaces the tests make for themselves: containerd, ctr, CNI bridges and peers live
//! in them, so no address is ever given in the host's own namespace.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A network namespace of the test's own, with lo up; containerd, ctr and the CNI bridge live in
/// it, so no address is ever given in the host's namespace. Removed on drop.
pub struct TestNetns {
    pub name: String,
    pub path: PathBuf,
}

impl TestNetns {
    pub fn new(prefix: &str) -> TestNetns {
        let name = format!("{prefix}-{}", std::process::id());
        let added = std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap();
        assert!(added.success(), "ip netns add {name}");
        let up = std::process::Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]).status();
        assert!(up.unwrap().success());
        TestNetns { path: PathBuf::from(format!("/var/run/netns/{name}")), name }
    }

    /// Runs `work` on a thread that has entered the namespace: sockets it makes live there.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = std::fs::File::open(&self.path).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            work()
        })
    }

    /// `ip -n <it> ARGS`, which must succeed; its output.
    pub fn ip(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("ip").args(["-n", &self.name]).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The names of its interfaces.
    pub fn link_names(&self) -> Vec<String> {
        let links = self.ip(&["-o", "link", "show"]);
        links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Waits (a destroyed namespace takes its veth end with it, asynchronously) until no veth is
    /// left, else fails naming those left.
    pub fn assert_no_veth_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let veths = self.veths();
            if veths.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "veths left in the test's namespace:\n{veths}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn veths(&self) -> String {
        let output = std::process::Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", "type", "veth"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
