//! The aggregator: receives batches from shippers over QUIC (mutual TLS),
//! applies partials exactly once into an embedded store (redb) with a cursor
//! per (gateway, shard) in the same transaction as the rows, keeps raw events
//! as the audit trail, tracks event-time watermarks (final minutes, versioned
//! corrections, the late table), and serves advertiser metrics over HTTP.
//!
//! [`merge`] (what a batch changes) and [`recount`] (which copy of a click
//! counts) hold the decisions and touch no store, socket or clock; [`store`]
//! applies them in redb; [`reconcile`] recounts final minutes from the raw
//! audit trail while the aggregator serves; [`server`] (quinn) and [`http`]
//! (axum) are the edges.

pub mod audit;
pub mod certs;
pub mod clickhouse;
pub mod config;
pub mod http;
pub mod kafka;
pub mod merge;
pub mod metrics;
pub mod reconcile;
pub mod recount;
pub mod retention;
pub mod rows;
pub mod server;
pub mod store;
#[cfg(test)]
mod testkit;
pub mod uniques;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
