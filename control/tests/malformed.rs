//! Requests whose protobuf does not decode, sent as raw gRPC over real sockets: the sender gets
//! INVALID_ARGUMENT (tonic says INTERNAL). (tests/log_limit.rs: the warnings are rate-limited.)

mod common;

use common::{MALFORMED, Server, call_raw, call_raw_ok};
use tonic::Code;
use tonic::transport::Channel;

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
