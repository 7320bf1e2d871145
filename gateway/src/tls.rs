//! TLS for the HTTPS listener (rustls, ring provider) and the certificate the
//! HTTP/3 endpoint shares. rustls is sans-I/O, so the shard's io_uring loop
//! feeds it ciphertext and takes plaintext, exactly as it does for plain
//! HTTP; nothing here touches a socket.
//!
//! Reload: [`TlsHandle::reload`] (SIGHUP) builds a new `ServerConfig` from the
//! files and bumps a version; each shard picks it up at its next tick for new
//! connections, while open ones keep the config they started with. The
//! ticket key and the session cache are kept across reloads, so resumption
//! survives a certificate rotation.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::ServerConfig;

use crate::config::Tls;

/// The ALPN names each endpoint offers.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
pub const ALPN_H3: &[u8] = b"h3";

pub struct TlsHandle {
    pub version: AtomicU64,
    config: Mutex<Arc<ServerConfig>>,
    settings: Tls,
    ticketer: Option<Arc<dyn ProducesTickets>>,
    cache: Option<Arc<dyn StoresServerSessions>>,
}

/// The certificate chain and key in the configured files.
pub fn load_identity(
    cert_file: &Path,
    key_file: &Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("tls.cert_file {}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls.cert_file {}", cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("tls.cert_file {}: no certificate", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("tls.key_file {}", key_file.display()))?;
    Ok((certs, key))
}

/// ring's suites, AES-128-GCM-SHA256 first: with the server's order
/// (`ignore_client_order`), every handshake derives its keys with SHA-256,
/// which these CPUs run in hardware, where rustls clients ask for
/// AES-256-GCM-SHA384 first and SHA-384 runs in software (it was 9% of the
/// CPU of new HTTP/3 connections). Browsers ask for AES-128 first anyway.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

impl TlsHandle {
    pub fn load(settings: &Tls) -> anyhow::Result<Self> {
        let ticketer = if settings.session_tickets {
            Some(rustls::crypto::ring::Ticketer::new().context("creating the TLS ticket key")?)
        } else {
            None
        };
        let cache = (settings.session_cache_entries > 0).then(|| {
            ServerSessionMemoryCache::new(settings.session_cache_entries)
                as Arc<dyn StoresServerSessions>
        });
        let config = Mutex::new(build(settings, &ticketer, &cache)?);
        Ok(Self {
            version: AtomicU64::new(1),
            config,
            settings: settings.clone(),
            ticketer,
            cache,
        })
    }

    /// Re-reads the files. On error the running config stays, and the error
    /// is returned for the log.
    pub fn reload(&self) -> anyhow::Result<()> {
        let c = build(&self.settings, &self.ticketer, &self.cache)?;
        *self.config.lock().unwrap() = c;
        self.version.fetch_add(1, Ordering::Release);
        Ok(())
    }

    pub fn current(&self) -> (u64, Arc<ServerConfig>) {
        let v = self.version.load(Ordering::Acquire);
        (v, self.config.lock().unwrap().clone())
    }
}

fn build(
    settings: &Tls,
    ticketer: &Option<Arc<dyn ProducesTickets>>,
    cache: &Option<Arc<dyn StoresServerSessions>>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let (certs, key) = load_identity(&settings.cert_file, &settings.key_file)?;
    let versions: &[&rustls::SupportedProtocolVersion] = if settings.min_version == "1.3" {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls: the key does not match the certificate, or is unsupported")?;
    c.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    c.ignore_client_order = true;
    match ticketer {
        Some(t) => c.ticketer = t.clone(),
        None => c.send_tls13_tickets = 0,
    }
    c.session_storage = match cache {
        Some(cache) => cache.clone(),
        None => Arc::new(rustls::server::NoServerSessionStorage {}),
    };
    Ok(Arc::new(c))
}
