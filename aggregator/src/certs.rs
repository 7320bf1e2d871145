//! Development certificates: a CA, the aggregator's server certificate and
//! one PoP client certificate, plus the pops file that names it. Production
//! deployments bring their own PKI; only the pops file format matters then.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Lowercase hex SHA-256 of a certificate's DER, as the pops file wants it.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes ca.pem, aggregator.pem/.key, pop.pem/.key and pops.toml into `dir`.
pub fn generate(
    dir: &Path,
    pop: &str,
    gateways: &[String],
    server_names: &[String],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Clickgate dev CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut server = CertificateParams::new(server_names.to_vec())?;
    server
        .distinguished_name
        .push(DnType::CommonName, "clickgate-aggregator");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client.distinguished_name.push(DnType::CommonName, pop);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key)?;

    let write = |name: &str, text: String| -> anyhow::Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        if name.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    write("ca.pem", ca_cert.pem())?;
    write("aggregator.pem", server_cert.pem())?;
    write("aggregator.key", server_key.serialize_pem())?;
    write("pop.pem", client_cert.pem())?;
    write("pop.key", client_key.serialize_pem())?;
    let gws = gateways
        .iter()
        .map(|g| format!("{g:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    write(
        "pops.toml",
        format!(
            "# Which client certificate is which PoP, and the gateway ids it ships for.\n\
             [[pop]]\nid = {pop:?}\ncert_sha256 = \"{}\"\ngateways = [{gws}]\n",
            fingerprint(client_cert.der())
        ),
    )?;
    Ok(())
}
