//! A client with no trust anchors configured uses the system's store. This test is alone in
//! its binary because it points `SSL_CERT_FILE` at its own CA before the store is first read.

use warren_derp::client::ConnectOptions;
use warren_derp::config::{Config, TlsConfig};
use warren_derp::server::RelayOptions;
use warren_derp::{Client, Relay};
use warren_proto::{DerpSecretKey, NodeSecretKey};

#[tokio::test]
async fn default_options_trust_the_system_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write");
    // The "system store" of this process is the relay's own certificate. No other thread
    // reads the environment yet: this is the binary's only test and runs before any client.
    #[allow(unsafe_code)]
    // SAFETY: single-threaded at this point of the only test in this binary.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", &cert_path);
        std::env::remove_var("SSL_CERT_DIR");
    }
    let tls = |cert: &std::path::Path, key: &std::path::Path| Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun: false,
        tls: Some(TlsConfig {
            cert: cert.to_owned(),
            key: key.to_owned(),
        }),
        ..Config::default()
    };
    let trusted = warren_derp::start_with(
        &tls(&cert_path, &key_path),
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start");
    let url = format!("https://localhost:{}/derp", trusted.http_addr.port());
    let key = NodeSecretKey::generate();
    Client::connect(&url, &key, &ConnectOptions::default())
        .await
        .expect("the system store trusts this relay");

    // A relay whose certificate the store does not hold is refused.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let other_cert = dir.path().join("other.pem");
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_cert, other.cert.pem()).expect("write");
    std::fs::write(&other_key, other.signing_key.serialize_pem()).expect("write");
    let stranger = warren_derp::start_with(
        &tls(&other_cert, &other_key),
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start");
    let url = format!("https://localhost:{}/derp", stranger.http_addr.port());
    let err = Client::connect(&url, &key, &ConnectOptions::default())
        .await
        .expect_err("untrusted certificate");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    trusted.shutdown().await;
    stranger.shutdown().await;
}
