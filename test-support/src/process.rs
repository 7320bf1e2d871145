//! The workspace's binaries, and processes a test starts, waits for, kills
//! and restarts.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary, brought up to date first (a `cargo test -p X` alone
/// neither builds nor rebuilds the other packages, and a stale binary would
/// test old code), with its test hooks: `fault-injection` is on in the
/// test build, where test-support's dev-dependency unifies it in.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_owned();
    // The workspace's test build, not `-p package --features ..`: that one
    // resolves features differently, so it would compile a second copy of
    // most of the dependency graph (minutes on a clean machine) and
    // overwrite the binary `cargo test` just built. After `cargo test
    // --workspace` this finds everything fresh.
    let mut c = Command::new(env!("CARGO"));
    c.args(["build", "-q", "--workspace", "--tests"]);
    // Without what `cargo test` set for this test binary: build scripts
    // (ring's) declare them as inputs, so cargo would see them changed and
    // rebuild half the graph here, and again at the next plain build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if ["CARGO_PKG_", "CARGO_CFG_", "CARGO_BIN_", "CARGO_MANIFEST_"]
            .iter()
            .any(|p| k.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&k.as_ref())
        {
            c.env_remove(k.as_ref());
        }
    }
    if dir.ends_with("release") {
        c.arg("--release");
    }
    assert!(c.status().unwrap().success(), "building the workspace");
    let path = dir.join(name);
    assert!(path.exists(), "{name}: no such workspace binary");
    path
}

/// Spawns `bin` with `args` and `env`, stdout discarded, stderr to `log`
/// (appended to, or started afresh).
pub fn spawn_logged(
    bin: &Path,
    args: &[impl AsRef<OsStr>],
    env: &[(String, String)],
    log: &Path,
    append: bool,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .unwrap();
    Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()))
}

/// kill(2).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes no memory; at worst the pid is gone (ESRCH).
    unsafe { libc::kill(pid, sig) };
}

/// One server process of a test: how to start it, where its log goes, and
/// how to tell it is ready.
pub struct Proc {
    pub name: &'static str,
    pub bin: PathBuf,
    pub args: Vec<OsString>,
    /// stderr, appended to across restarts.
    pub log: PathBuf,
    /// (address, path) that answers 200 once the process is ready.
    pub ready: (String, &'static str),
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
    pub starts: u32,
    /// Milliseconds from spawn to ready, per start.
    pub ready_ms: Vec<u64>,
}

impl Proc {
    pub fn new(
        name: &'static str,
        bin: PathBuf,
        args: Vec<OsString>,
        log: PathBuf,
        ready: (String, &'static str),
    ) -> Proc {
        Proc {
            name,
            bin,
            args,
            log,
            ready,
            env: Vec::new(),
            child: None,
            starts: 0,
            ready_ms: Vec::new(),
        }
    }

    /// Spawns it and waits (30 s at most) until it is ready; panics with
    /// the log's tail if it exits or never gets there.
    pub fn start(&mut self) {
        self.child = Some(spawn_logged(
            &self.bin, &self.args, &self.env, &self.log, true,
        ));
        self.starts += 1;
        let t = Instant::now();
        while crate::net::status(&self.ready.0, self.ready.1) != Some(200) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited ({st}):\n{}", self.name, self.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{} not ready:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.ready_ms.push(t.elapsed().as_millis() as u64);
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to 15 s for it to exit (panics if it does not).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id() as i32, libc::SIGTERM);
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(15) {
                    let _ = c.kill();
                    panic!("{} did not stop on SIGTERM", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The last 4 000 bytes of its log, after any panic message in it (a
    /// backtrace pushes the message out of the tail).
    pub fn log_text(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut from = t.len().saturating_sub(4000);
        while !t.is_char_boundary(from) {
            from += 1;
        }
        let panics: String = t
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked at"))
            .flat_map(|(i, _)| t.lines().skip(i).take(3))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("{panics}{}", &t[from..])
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
