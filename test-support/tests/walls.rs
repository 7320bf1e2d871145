//! The walls between the workspace's parts, checked from `cargo metadata`
//! and the sources:
//!
//! - the gateway core does no I/O: no io-uring, libc, tokio, quinn or redb
//!   among its dependencies, and no file, socket, process, clock, thread or
//!   environment in its code; all its `unsafe` is in one module;
//! - `wire` depends on no other crate of the project;
//! - loadgen and the fuzz targets link no server crate;
//! - the test hooks' switches (`CLICKGATE_*` variables) are named only in
//!   `daemon::faults`, behind its feature.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

const SERVERS: [&str; 3] = [
    "clickgate-gateway",
    "clickgate-shipper",
    "clickgate-aggregator",
];

fn metadata(manifest: &Path, no_deps: bool) -> Value {
    let mut c = std::process::Command::new(env!("CARGO"));
    c.args([
        "metadata",
        "--format-version",
        "1",
        "--offline",
        "--manifest-path",
    ])
    .arg(manifest);
    if no_deps {
        c.arg("--no-deps");
    } else {
        // Only what this machine builds (the crates of other targets are
        // not downloaded, and need not be).
        assert_eq!(std::env::consts::OS, "linux");
        c.args([
            "--filter-platform",
            &format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        ]);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn root() -> PathBuf {
    test_support::workspace_root()
}

/// Each package's normal (not dev, not build) dependencies by name.
fn normal_deps(meta: &Value) -> BTreeMap<String, Vec<String>> {
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_owned())
                .collect();
            (p["name"].as_str().unwrap().to_owned(), deps)
        })
        .collect()
}

/// Every crate `package` links, however deep (normal dependencies only).
fn linked(meta: &Value, package: &str) -> BTreeSet<String> {
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: BTreeMap<&str, Vec<&str>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap())
                .collect();
            (n["id"].as_str().unwrap(), deps)
        })
        .collect();
    let start = name_of
        .iter()
        .find(|(_, n)| **n == package)
        .map(|(id, _)| *id)
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        for d in &nodes[id] {
            if seen.insert(name_of[d].to_owned()) {
                todo.push(d);
            }
        }
    }
    seen
}

/// The Rust sources under `dir`, with each file's `#[cfg(test)] mod tests`
/// (at its end, by the house style) cut off.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                let code = match text.find("#[cfg(test)]\nmod tests") {
                    Some(at) => text[..at].to_owned(),
                    None => text,
                };
                out.push((p, code));
            }
        }
    }
    assert!(!out.is_empty(), "no sources under {}", dir.display());
    out
}

/// The lines of `code` that are not comments.
fn code_lines(code: &str) -> impl Iterator<Item = (usize, &str)> {
    code.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
}

#[test]
fn the_gateway_core_depends_on_nothing_that_does_io() {
    let meta = metadata(&root().join("Cargo.toml"), false);
    let direct = &normal_deps(&meta)["clickgate-gateway-core"];
    let all = linked(&meta, "clickgate-gateway-core");
    for banned in [
        "io-uring", "libc", "tokio", "quinn", "redb", "memmap2", "rustls",
    ] {
        assert!(
            !direct.contains(&banned.to_owned()),
            "gateway-core depends on {banned}"
        );
    }
    for banned in [
        "io-uring", "tokio", "quinn", "redb", "mio", "memmap2", "socket2",
    ] {
        assert!(!all.contains(banned), "gateway-core links {banned}");
    }
}

#[test]
fn the_gateway_core_touches_no_file_socket_clock_or_thread() {
    let banned = [
        "std::fs",
        "std::net::TcpStream",
        "std::net::TcpListener",
        "std::net::UdpSocket",
        "TcpStream",
        "UdpSocket",
        "std::process",
        "std::env",
        "SystemTime",
        "Instant",
        "thread::spawn",
        "thread::sleep",
        "File::",
        "println!",
        "tracing::",
    ];
    let mut found = Vec::new();
    for (path, code) in sources(&root().join("gateway-core/src")) {
        let unsafe_ok = path.ends_with("fast.rs");
        for (n, line) in code_lines(&code) {
            for b in banned {
                if line.contains(b) {
                    found.push(format!("{}:{n}: {b}: {line}", path.display()));
                }
            }
            if !unsafe_ok && line.contains("unsafe") && !line.contains("unsafe_code") {
                found.push(format!(
                    "{}:{n}: unsafe outside fast.rs: {line}",
                    path.display()
                ));
            }
        }
    }
    assert!(found.is_empty(), "the core does I/O:\n{}", found.join("\n"));
}

#[test]
fn wire_depends_on_no_other_crate_of_the_project() {
    let meta = metadata(&root().join("Cargo.toml"), true);
    let deps = &normal_deps(&meta)["clickgate-wire"];
    let project: Vec<&String> = deps
        .iter()
        .filter(|d| d.starts_with("clickgate-"))
        .collect();
    assert!(project.is_empty(), "wire depends on {project:?}");
}

#[test]
fn loadgen_and_the_fuzz_targets_link_no_server_crate() {
    let meta = metadata(&root().join("Cargo.toml"), false);
    let loadgen = linked(&meta, "clickgate-loadgen");
    let fuzz_meta = metadata(&root().join("fuzz/Cargo.toml"), true);
    let fuzz = &normal_deps(&fuzz_meta)["clickgate-fuzz"];
    for s in SERVERS {
        assert!(!loadgen.contains(s), "loadgen links {s}");
        assert!(!fuzz.contains(&s.to_owned()), "fuzz depends on {s}");
    }
    // What they do link of the project: formats, and the core's parsers.
    assert!(loadgen.contains("clickgate-wire"));
    assert!(fuzz.contains(&"clickgate-gateway-core".to_owned()));
}

#[test]
fn the_test_hooks_are_named_only_behind_their_feature() {
    let mut found = Vec::new();
    for part in [
        "wire",
        "gateway-core",
        "gateway",
        "shipper",
        "aggregator",
        "daemon",
    ] {
        for (path, code) in sources(&root().join(part).join("src")) {
            for (n, line) in code_lines(&code) {
                if line.contains("\"CLICKGATE_") && !path.ends_with("daemon/src/faults.rs") {
                    found.push(format!("{}:{n}: {line}", path.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "test hooks outside daemon::faults:\n{}",
        found.join("\n")
    );
    // In faults.rs, every variable is read inside the module that exists
    // only with the feature.
    let faults = std::fs::read_to_string(root().join("daemon/src/faults.rs")).unwrap();
    let gate = faults
        .find("#[cfg(feature = \"fault-injection\")]\nmod armed {")
        .expect("the hooks' module is behind the feature");
    let armed_end = gate + faults[gate..].find("\n}\n").unwrap();
    for (at, _) in faults.match_indices("\"CLICKGATE_") {
        assert!(
            (gate..armed_end).contains(&at),
            "a hook's variable is read outside the feature's module"
        );
    }
}
