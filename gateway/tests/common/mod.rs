//! Runs the real gateway binary on loopback for integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

pub const SECRET1: [u8; 32] = [1; 32];
pub const SECRET2: [u8; 32] = [2; 32];

pub fn keys_toml(keys: &[(&str, &[u8])]) -> String {
    keys.iter()
        .map(|(kid, s)| {
            format!(
                "[[key]]\nkid = \"{kid}\"\nsecret = \"{}\"\n",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
            )
        })
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

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

    /// (Re)starts the process on the same directory and port.
    pub fn spawn(&mut self) {
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
        let log = std::fs::File::create(self.dir.path().join("gateway.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_clickgate-gateway"))
            .args(["run", "--config"])
            .arg(self.config_path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
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
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
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

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads exactly one response (Content-Length framed) from a stream, and not
/// a byte more, so pipelined responses can be read one after another.
pub fn read_response(s: &mut impl Read) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof",
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.trim_end().split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
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
        use gateway::token::{encode_component as enc, sign};
        let q = format!(
            "ad_id={}&advertiser_id=adv-1&campaign_id=camp-1&click_id={}&user_id=u-1&cost_per_click=0.25&timestamp={}&redirect_url={}&kid={}",
            enc(self.ad_id),
            enc(self.click_id),
            self.ts,
            enc(self.redirect),
            self.kid
        );
        format!("/api/v1/{}?{}", self.kind, sign(&q, self.secret))
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

pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

pub fn write_keys(path: &Path, keys: &[(&str, &[u8])]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, keys_toml(keys)).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// A self-signed certificate for localhost / 127.0.0.1, written as
/// `<name>.pem` and `<name>.key`; returns its DER.
pub fn write_cert(dir: &Path, name: &str) -> rustls::pki_types::CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let tmp = |ext: &str| dir.join(format!("{name}.{ext}.tmp"));
    std::fs::write(tmp("pem"), cert.pem()).unwrap();
    std::fs::write(tmp("key"), key.serialize_pem()).unwrap();
    // Atomic replace, as an operator's deploy tool would.
    std::fs::rename(tmp("pem"), dir.join(format!("{name}.pem"))).unwrap();
    std::fs::rename(tmp("key"), dir.join(format!("{name}.key"))).unwrap();
    cert.der().clone()
}
