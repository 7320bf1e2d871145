//! A private clickhouse-server for a test (`scripts/clickhouse-local`
//! installs the package and starts it on a port of the test's choosing).

/// A running server, killed on drop.
pub struct ClickHouse {
    pub pid: i32,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl ClickHouse {
    /// None, with the reason on stderr as `SKIPPED: ...`, when no server can
    /// be had (not root, no package).
    pub fn start() -> Option<ClickHouse> {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::free_port();
        let out =
            std::process::Command::new(crate::workspace_root().join("scripts/clickhouse-local"))
                .arg(dir.path())
                .arg(port.to_string())
                .output()
                .unwrap();
        if !out.status.success() {
            eprintln!(
                "SKIPPED: no ClickHouse server: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(ClickHouse {
            pid: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
            port,
            _dir: dir,
        })
    }

    /// `127.0.0.1:<port>`: its HTTP interface.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        crate::process::kill(self.pid, libc::SIGKILL);
    }
}
