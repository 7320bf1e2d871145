//! The open-loop timetable against a server too slow for it: requests that
//! fell due but never went out still count, as measured and not completed,
//! with their wait in the latency tail.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

/// Answers every request on every connection 50 ms after it arrives: at
/// most 20 answers a second per connection.
fn slow_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        std::thread::sleep(Duration::from_millis(50));
                        let answer =
                            b"HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n";
                        if s.write_all(answer).is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn requests_due_but_never_sent_count_against_an_overloaded_server() {
    let addr = slow_server();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "run",
            "--target",
            &addr,
            "--cpus",
            "0",
            "--connections",
            "1",
        ])
        .args([
            "--rate",
            "100",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--pool",
            "200",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let measured = r["measured_requests"].as_u64().unwrap();
    let completed = r["measured_completed"].as_u64().unwrap();
    let p99_ms = r["latency_us"]["p99"].as_f64().unwrap() / 1000.0;
    // 100 fell due in the second; one connection at 50 ms each answers ~20.
    assert!((95..=101).contains(&measured), "{stdout}");
    assert!(completed <= 40, "{stdout}");
    // The last ones due waited most of the second and were never sent.
    assert!(p99_ms >= 400.0, "{stdout}");
}
