//! Signing keys files and self-signed certificates for tests.

use std::path::Path;

use base64::Engine;

/// A keys file holding `(kid, secret)` pairs.
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

/// Replaces a keys file atomically, as an operator's deploy tool would.
pub fn write_keys(path: &Path, keys: &[(&str, &[u8])]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, keys_toml(keys)).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// A self-signed certificate for localhost / 127.0.0.1, written (atomically)
/// as `<name>.pem` and `<name>.key`; returns its DER.
pub fn write_cert(dir: &Path, name: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let tmp = |ext: &str| dir.join(format!("{name}.{ext}.tmp"));
    std::fs::write(tmp("pem"), cert.pem()).unwrap();
    std::fs::write(tmp("key"), key.serialize_pem()).unwrap();
    std::fs::rename(tmp("pem"), dir.join(format!("{name}.pem"))).unwrap();
    std::fs::rename(tmp("key"), dir.join(format!("{name}.key"))).unwrap();
    cert.der().to_vec()
}
