//! Requests whose protobuf does not decode, sent as raw gRPC over real sockets: the sender gets
//! INVALID_ARGUMENT (tonic says INTERNAL), and the warnings they cause are rate-limited.

mod common;

use std::sync::{Arc, Mutex};

use common::Server;
use prost::bytes::{Buf, BufMut};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use warren_control::ratelimit::PEER_LOG_BURST;

/// Sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

/// Calls `method` with `message` as the request's protobuf bytes.
async fn call_raw(channel: &Channel, method: &'static str, message: &[u8]) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(message.to_vec()),
        PathAndQuery::from_static(method),
        Raw,
    )
    .await
    .expect_err("a malformed request is refused")
}

/// Not protobuf: a truncated varint, a length past the end, a reserved wire type, field 0.
const MALFORMED: [&[u8]; 4] = [&[0x0a, 0xff], &[0x0a, 0x05, 0x01], &[0x0f], &[0x00, 0x01]];

#[tokio::test]
async fn undecodable_requests_get_invalid_argument() {
    let server = Server::start().await;
    let tcp = Channel::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    for message in MALFORMED {
        for method in [
            "/warren.control.v1.Control/GetNode",
            "/warren.control.v1.Control/RegisterNode",
            "/warren.control.v1.Control/StreamMapResponse",
            "/warren.control.v1.Admin/CreateUser",
        ] {
            let status = call_raw(&tcp, method, message).await;
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{method} {message:02x?}: {status:?}"
            );
            assert!(
                status.message().starts_with("malformed request: "),
                "{status:?}"
            );
        }
    }
    // The local admin socket too.
    let local = warren_control::cli::connect_unix(&server.socket)
        .await
        .expect("unix");
    let status = call_raw(&local, "/warren.control.v1.Admin/CreateUser", MALFORMED[0]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // A well-formed request on the same connection is still served.
    let ok = call_raw_ok(&tcp).await;
    assert!(!ok.is_empty());
    server.stop().await;
}

/// GetServerKey with its empty (valid) request.
async fn call_raw_ok(channel: &Channel) -> Vec<u8> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(Vec::new()),
        PathAndQuery::from_static("/warren.control.v1.Control/GetServerKey"),
        Raw,
    )
    .await
    .expect("served")
    .into_inner()
}

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
