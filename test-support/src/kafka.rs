//! A private Kafka-protocol broker for a test (`scripts/tansu-local` builds
//! tansu once into a cache and starts it on a port of the test's choosing,
//! its storage a SQLite file in the test's directory), and kafka-python, the
//! independent client tests read the topics back with.

use std::path::{Path, PathBuf};

/// A running broker, killed on drop. Its storage outlives a kill: `start`
/// again serves what it had acknowledged.
pub struct Tansu {
    pub pid: Option<i32>,
    pub port: u16,
    /// Broker options beyond the listener and storage (`--authentication`),
    /// taken by the next start.
    pub options: Vec<String>,
    /// What the broker tells clients to connect to, when not its own port.
    pub advertised: Option<String>,
    /// `TANSU_BUILD` (scripts/tansu-local): "test", or "release" for a
    /// benchmark that measures the broker.
    build: &'static str,
    dir: tempfile::TempDir,
}

impl Tansu {
    /// None, with the reason on stderr as `SKIPPED: ...`, when no broker can
    /// be had (it cannot be built or does not start).
    pub fn start() -> Option<Tansu> {
        Self::start_with("test", None)
    }

    /// As `start`, the broker telling clients to connect to `advertised`
    /// (`tcp://host:port`, a proxy in front of it).
    pub fn start_advertising(advertised: String) -> Option<Tansu> {
        Self::start_with("test", Some(advertised))
    }

    /// As `start`, from the release build (for benchmarks).
    pub fn start_release() -> Option<Tansu> {
        Self::start_with("release", None)
    }

    fn start_with(build: &'static str, advertised: Option<String>) -> Option<Tansu> {
        let mut t = Tansu {
            pid: None,
            port: crate::free_port(),
            options: Vec::new(),
            advertised,
            build,
            dir: tempfile::tempdir().unwrap(),
        };
        match t.spawn() {
            Ok(()) => Some(t),
            Err(e) => {
                eprintln!("SKIPPED: no Kafka-protocol broker (tansu): {e}");
                None
            }
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut c = std::process::Command::new(script());
        c.env("TANSU_BUILD", self.build)
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .args(&self.options);
        if let Some(a) = &self.advertised {
            c.env("ADVERTISED_LISTENER_URL", a);
        }
        let out = c.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        self.pid = Some(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap());
        Ok(())
    }

    /// Creates a user through the running broker (`tansu user create`;
    /// `mechanism` is scram256 or scram512); it is kept in the broker's
    /// storage.
    pub fn create_user(&self, name: &str, password: &str, mechanism: &str) {
        let out = std::process::Command::new(script())
            .env("TANSU_BUILD", self.build)
            .args(["--exec", "user", "create", "--mechanism", mechanism])
            .arg(format!("--broker=tcp://{}", self.addr()))
            .args([name, password])
            .output()
            .unwrap();
        assert!(out.status.success(), "tansu user create: {out:?}");
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL, and waits until the port is free.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.pid.take() {
            crate::process::kill(pid, libc::SIGKILL);
            let t = std::time::Instant::now();
            while std::net::TcpStream::connect(self.addr()).is_ok()
                && t.elapsed() < std::time::Duration::from_secs(10)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same port and storage; panics if it cannot.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn().unwrap();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn script() -> PathBuf {
    crate::workspace_root().join("scripts/tansu-local")
}

/// Whether kafka-python (with zstd, the sink's compression) is there,
/// installing it from PyPI when it is not.
pub fn ensure_reader() -> bool {
    crate::python_module("kafka", "kafka-python") && crate::python_module("zstandard", "zstandard")
}

/// The topic reader the tests use (kafka-python): `tools/kafka_read.py`.
pub fn reader() -> PathBuf {
    crate::workspace_root().join("test-support/tools/kafka_read.py")
}
