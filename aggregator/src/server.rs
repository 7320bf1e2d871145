//! The QUIC side: mutual TLS, one stream per batch, and the writer thread
//! that commits batches to the store in groups.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, oneshot};
use wire::batch::{Ack, Batch, BatchKind, Status, ALPN};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

/// One batch waiting for the writer.
pub struct Job {
    pub frame: Vec<u8>,
    pub allowed: Arc<Vec<String>>,
    pub reply: oneshot::Sender<Ack>,
}

fn kind_of(frame: &[u8]) -> usize {
    match Batch::peek_kind(frame) {
        Some(BatchKind::Hello | BatchKind::Join) => 0,
        Some(BatchKind::Partials) => 1,
        Some(BatchKind::Events) => 2,
        None => 3,
    }
}

/// Runs the writer on its own thread: takes up to `group` waiting batches,
/// applies them in one transaction, answers each.
pub fn spawn_writer(store: Arc<Store>, metrics: Arc<Metrics>, group: usize) -> mpsc::Sender<Job> {
    let (tx, mut rx) = mpsc::channel::<Job>(group * 4);
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            let mut jobs = Vec::with_capacity(group);
            while let Some(first) = rx.blocking_recv() {
                jobs.push(first);
                while jobs.len() < group {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let t0 = Instant::now();
                let input: Vec<(&[u8], &[String])> = jobs
                    .iter()
                    .map(|j| (j.frame.as_slice(), j.allowed.as_slice()))
                    .collect();
                let answers = store.apply_many(&input, crate::now_ms());
                daemon::faults::crash_point("aggregator_committed_before_answer");
                metrics
                    .commit_latency
                    .observe(t0.elapsed().as_micros() as u64);
                metrics.commits.fetch_add(1, Relaxed);
                for (job, (ack, eff)) in jobs.drain(..).zip(answers) {
                    metrics.batches[kind_of(&job.frame)][ack.status as usize].fetch_add(1, Relaxed);
                    metrics.rows_merged.fetch_add(eff.rows, Relaxed);
                    metrics.late_rows.fetch_add(eff.late_rows, Relaxed);
                    metrics.corrections.fetch_add(eff.corrections, Relaxed);
                    metrics.events_stored.fetch_add(eff.events, Relaxed);
                    metrics.unrecorded.fetch_add(eff.unrecorded, Relaxed);
                    if ack.status == Status::Refused {
                        tracing::warn!(reason = %ack.reason, "batch refused");
                    }
                    let _ = job.reply.send(ack);
                }
            }
        })
        .expect("spawn the store writer");
    tx
}

fn load_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))
}

pub fn server_config(cfg: &Config) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&cfg.ca_file)? {
        roots.add(c).context("adding the CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("client certificate verifier")?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .with_context(|| format!("reading the key {}", cfg.key_file.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&cfg.cert_file)?, key)
        .context("the server certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(cfg.max_streams_per_connection.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(std::time::Duration::from_secs(60).try_into()?));
    sc.transport_config(Arc::new(t));
    Ok(sc)
}

/// Accepts shipper connections until the endpoint is closed.
pub async fn serve(
    endpoint: quinn::Endpoint,
    pops: Arc<HashMap<String, (String, Vec<String>)>>,
    writer: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    max_batch_bytes: usize,
) {
    while let Some(incoming) = endpoint.accept().await {
        let pops = pops.clone();
        let writer = writer.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(error = %e, "handshake failed");
                    return;
                }
            };
            let der = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|certs| certs.first().map(|c| c.to_vec()));
            let fp = der.as_deref().map(crate::certs::fingerprint);
            let Some((pop, gateways)) = fp.as_ref().and_then(|f| pops.get(f)).cloned() else {
                metrics.refused_certificates.fetch_add(1, Relaxed);
                tracing::warn!(remote = %conn.remote_address(), fingerprint = ?fp, "unknown client certificate; connection refused");
                conn.close(1u32.into(), b"unknown client certificate");
                return;
            };
            metrics.connections.fetch_add(1, Relaxed);
            tracing::info!(pop = %pop, remote = %conn.remote_address(), "shipper connected");
            let allowed = Arc::new(gateways);
            loop {
                let (mut send, mut recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(pop = %pop, reason = %e, "shipper disconnected");
                        return;
                    }
                };
                let writer = writer.clone();
                let allowed = allowed.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let frame = match recv.read_to_end(max_batch_bytes).await {
                        Ok(f) => f,
                        Err(quinn::ReadToEndError::TooLong) => {
                            metrics.batches[3][Status::Refused as usize].fetch_add(1, Relaxed);
                            let a = Ack {
                                status: Status::Refused,
                                partials_cursor: 0,
                                events_cursor: 0,
                                reason: format!(
                                    "batch larger than max_batch_bytes ({max_batch_bytes})"
                                ),
                            };
                            let _ = send.write_all(&a.encode()).await;
                            let _ = send.finish();
                            return;
                        }
                        Err(_) => {
                            metrics.stream_errors.fetch_add(1, Relaxed);
                            return;
                        }
                    };
                    let (reply, answer) = oneshot::channel();
                    let job = Job {
                        frame,
                        allowed,
                        reply,
                    };
                    let ack = if writer.send(job).await.is_err() {
                        None
                    } else {
                        answer.await.ok()
                    };
                    let ack = ack.unwrap_or(Ack {
                        status: Status::Retry,
                        partials_cursor: 0,
                        events_cursor: 0,
                        reason: "aggregator shutting down".into(),
                    });
                    if send.write_all(&ack.encode()).await.is_err() || send.finish().is_err() {
                        metrics.stream_errors.fetch_add(1, Relaxed);
                    }
                });
            }
        });
    }
}
