//! Helpers the loadgen integration tests share (the rest is test-support).

#![allow(unused_imports)] // each test file uses a part

pub use test_support::process::bin;
pub use test_support::{free_port, free_udp_port, metric, metric_sum};
