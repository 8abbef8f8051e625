//! A client with no trust anchors configured uses the system's store. This test is alone in
//! its binary because it points `SSL_CERT_FILE` at its own CA before the store is first read.

mod common;

use common::{self_signed, tls_relay_config};
use warren_derp::client::ConnectOptions;
use warren_derp::server::RelayOptions;
use warren_derp::{Client, Relay};
use warren_proto::{DerpSecretKey, NodeSecretKey};

#[tokio::test]
async fn default_options_trust_the_system_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, tls) = self_signed(dir.path(), "relay", "localhost");
    // The "system store" of this process is the relay's own certificate. No other thread
    // reads the environment yet: this is the binary's only test and runs before any client.
    #[allow(unsafe_code)]
    // SAFETY: single-threaded at this point of the only test in this binary.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", &tls.cert);
        std::env::remove_var("SSL_CERT_DIR");
    }
    let trusted = warren_derp::start_with(
        &tls_relay_config(tls),
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
    let (_, other) = self_signed(dir.path(), "other", "localhost");
    let stranger = warren_derp::start_with(
        &tls_relay_config(other),
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
