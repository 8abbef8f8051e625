//! Helpers shared by the derp integration tests (each test binary includes this module).

use std::path::Path;

use rustls::pki_types::CertificateDer;
use warren_derp::config::{Config, TlsConfig};

/// A self-signed certificate for `name`, written to `dir` as `<stem>.pem` and `<stem>.key`;
/// returns it (to trust) and the relay's TLS settings.
pub(crate) fn self_signed(
    dir: &Path,
    stem: &str,
    name: &str,
) -> (CertificateDer<'static>, TlsConfig) {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert");
    let tls = TlsConfig {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&tls.cert, cert.cert.pem()).expect("write");
    std::fs::write(&tls.key, cert.signing_key.serialize_pem()).expect("write");
    (cert.cert.der().clone(), tls)
}

/// A relay on a loopback port behind TLS, without STUN.
pub(crate) fn tls_relay_config(tls: TlsConfig) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun: false,
        tls: Some(tls),
        ..Config::default()
    }
}
