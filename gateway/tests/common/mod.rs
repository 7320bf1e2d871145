//! Runs the real gateway binary on loopback for integration tests.
#![allow(dead_code, unused_imports)] // each test file uses a part

use std::ffi::OsStr;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use test_support::keys::{keys_toml, write_cert, write_keys};
pub use test_support::net::{read_response, Response};
pub use test_support::{free_port, metric, metric_sum, now_s};

pub const SECRET1: [u8; 32] = [1; 32];
pub const SECRET2: [u8; 32] = [2; 32];

pub struct Gateway {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub extra: String,
    /// Environment for the process (fault injection).
    pub env: Vec<(String, String)>,
    /// Lines added to the [listen] table (HTTPS, PROXY protocol).
    pub listen_extra: String,
    /// Whether the plain listener expects a PROXY header (readiness probes
    /// then send one).
    pub proxy_protocol: bool,
}

impl Gateway {
    /// Starts a gateway whose config is the defaults plus `extra` TOML.
    pub fn start(extra: &str) -> Gateway {
        Self::start_with(extra, |_| {})
    }

    /// As [`Self::start`], with environment variables for the process.
    pub fn start_env(extra: &str, env: &[(&str, &str)]) -> Gateway {
        let mut g = Self::build(extra, |_| {});
        g.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        g.spawn();
        g
    }

    /// As [`Self::start`], with `listen` lines in the [listen] table.
    pub fn start_listen(extra: &str, listen: &str) -> Gateway {
        Self::start_listen_env(extra, listen, &[])
    }

    /// As [`Self::start_listen`], with environment variables for the process.
    pub fn start_listen_env(extra: &str, listen: &str, env: &[(&str, &str)]) -> Gateway {
        let mut g = Self::build(extra, |_| {});
        g.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        g.listen_extra = listen.to_string();
        g.proxy_protocol = listen.contains("http_proxy_protocol = true");
        g.spawn();
        g
    }

    /// As [`Self::start`], after `prepare` has run on the (not yet existing)
    /// data directory's path: to mount a filesystem there, say.
    pub fn start_with(extra: &str, prepare: impl FnOnce(&Path)) -> Gateway {
        let mut g = Self::build(extra, prepare);
        g.spawn();
        g
    }

    fn build(extra: &str, prepare: impl FnOnce(&Path)) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        prepare(&dir.path().join("data"));
        std::fs::write(dir.path().join("keys.toml"), keys_toml(&[("k1", &SECRET1)])).unwrap();
        Gateway {
            child: None,
            addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            dir,
            extra: extra.to_string(),
            env: Vec::new(),
            listen_extra: String::new(),
            proxy_protocol: false,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn keys_path(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    /// A gateway whose config file is written, not started.
    pub fn build_only(extra: &str) -> Gateway {
        let g = Self::build(extra, |_| {});
        g.write_config();
        g
    }

    /// (Re)starts the process on the same directory and port.
    pub fn spawn(&mut self) {
        self.write_config();
        let config = self.config_path();
        self.child = Some(test_support::process::spawn_logged(
            Path::new(env!("CARGO_BIN_EXE_clickgate-gateway")),
            &[
                OsStr::new("run"),
                OsStr::new("--config"),
                config.as_os_str(),
            ],
            &self.env,
            &self.dir.path().join("gateway.log"),
            false,
        ));
        self.wait_ready();
    }

    fn write_config(&self) {
        let extra = &self.extra;
        let has_cpus = extra.contains("cpus");
        let cfg = format!(
            "gateway_id = \"test\"\ndata_dir = \"{}\"\nkeys_file = \"{}\"\n{}\n{}\n[listen]\nhttp = \"{}\"\n{}\n",
            self.data_dir().display(),
            self.keys_path().display(),
            if has_cpus { "" } else { "cpus = [0]" },
            extra,
            self.addr,
            self.listen_extra
        );
        // `extra` may open tables; the [listen] table goes last so it does not
        // land inside them.
        std::fs::write(self.config_path(), cfg).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn wait_ready(&mut self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited during start ({st}):\n{}", self.log());
            }
            if let Ok(r) =
                self.request(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gateway not ready in 20 s:\n{}", self.log());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        test_support::process::kill(self.pid(), sig);
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.child.as_mut().unwrap().wait().unwrap();
        self.child = None;
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// One request on a new connection; reads one response.
    pub fn request(&self, raw: &[u8]) -> std::io::Result<Response> {
        let mut s = TcpStream::connect(self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        if self.proxy_protocol {
            s.write_all(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 1\r\n")?;
        }
        s.write_all(raw)?;
        read_response(&mut s)
    }

    pub fn get(&self, target: &str) -> Response {
        let raw = format!(
            "GET {target} HTTP/1.1\r\nHost: t\r\nUser-Agent: test-agent (Windows NT)\r\n\r\n"
        );
        self.request(raw.as_bytes()).unwrap()
    }

    pub fn inspect(&self, events: bool) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clickgate-gateway"));
        cmd.arg("inspect").arg(self.data_dir());
        if events {
            cmd.arg("--events");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").body_str()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Click<'a> {
    pub kind: &'a str,
    pub kid: &'a str,
    pub secret: &'a [u8],
    pub click_id: &'a str,
    pub ad_id: &'a str,
    pub ts: i64,
    pub redirect: &'a str,
}

impl Default for Click<'_> {
    fn default() -> Self {
        Click {
            kind: "clicks",
            kid: "k1",
            secret: &SECRET1,
            click_id: "c-1",
            ad_id: "ad-1",
            ts: now_s(),
            redirect: "https://shop.example/landing?item=7&ref=ad",
        }
    }
}

/// The target of a default click with this click id.
pub fn click(id: &str) -> String {
    Click {
        click_id: id,
        ..Click::default()
    }
    .target()
}

impl Click<'_> {
    /// `/api/v1/<kind>?<signed query>`
    pub fn target(&self) -> String {
        let q = wire::signed::Click {
            ad_id: self.ad_id,
            advertiser_id: "adv-1",
            campaign_id: "camp-1",
            click_id: self.click_id,
            user_id: "u-1",
            cost_per_click: "0.25",
            timestamp: self.ts,
            redirect_url: self.redirect,
            kid: self.kid,
        };
        format!("/api/v1/{}?{}", self.kind, q.signed_query(self.secret))
    }
}

/// `totals:` line of `inspect` as (clicks, impressions, duplicates, invalid).
pub fn totals(inspect: &str) -> (u64, u64, u64, u64) {
    let line = inspect.lines().find(|l| l.starts_with("totals:")).unwrap();
    let get = |k: &str| -> u64 {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    (
        get("clicks"),
        get("impressions"),
        get("duplicates"),
        get("invalid"),
    )
}
