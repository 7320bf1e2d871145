//! Helpers the loadgen integration tests share.

#![allow(dead_code)] // each test file uses a part

use std::path::PathBuf;
use std::process::Command;

/// A workspace binary beside loadgen's, brought up to date first (a `cargo
/// test -p clickgate-loadgen` alone neither builds nor rebuilds the other
/// packages; a stale binary would test old code).
pub fn bin(name: &str, package: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_loadgen"))
        .parent()
        .unwrap()
        .to_path_buf();
    let b = dir.join(name);
    {
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "-q", "-p", package]);
        if dir.ends_with("release") {
            c.arg("--release");
        }
        assert!(c.status().unwrap().success(), "building {package}");
    }
    b
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One metric's value in a Prometheus text page (0 when absent).
pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}
