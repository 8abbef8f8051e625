//! A flood of malformed requests logs a bounded number of warnings. The test captures the log
//! of its own thread, so it has a test binary of its own (another test's server logging at the
//! same time could settle tracing's per-callsite interest before the capture starts).

mod common;

use std::sync::{Arc, Mutex};

use common::{MALFORMED, Server, call_raw};
use tonic::Code;
use tonic::transport::Channel;
use warren_derp::log_limit::PEER_LOG_BURST;

/// Collects what the test's log subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_flood_of_malformed_requests_logs_a_bounded_number_of_warnings() {
    // The test's runtime is single-threaded: the server logs on this thread.
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = Server::start().await;
    let tcp = Channel::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let sent = 3 * PEER_LOG_BURST;
    for _ in 0..sent {
        let status = call_raw(&tcp, "/warren.control.v1.Control/GetNode", MALFORMED[0]).await;
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    server.stop().await;
    let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("malformed request"))
        .count();
    assert_eq!(
        warnings,
        usize::try_from(PEER_LOG_BURST).expect("small"),
        "{sent} malformed requests; log:\n{log}"
    );
}
