//! The HTTP front (hyper 1, HTTP/1.1, plain or TLS): `/derp` upgrades to the DERP protocol,
//! `/derp/probe` and `/derp/latency-check` answer latency probes, `/generate_204` answers
//! Tailscale's captive-portal check, `/` says what this is.
//!
//! A request with `Derp-Fast-Start: 1` gets no HTTP response at all (as in Tailscale's
//! `derpserver.Handler`): the server starts with its `ServerKey` frame right away. hyper always
//! answers a request, so the first request head of each connection is peeked here first; a
//! fast-start upgrade skips hyper, anything else is replayed into it.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::Error;
use crate::server::Relay;

/// The header a client sets to skip the `101` response.
pub const FAST_START_HEADER: &str = "Derp-Fast-Start";
/// The header carrying the server's key in the `101` response.
pub const PUBLIC_KEY_HEADER: &str = "Derp-Public-Key";
/// The header carrying the protocol version in the `101` response.
pub const VERSION_HEADER: &str = "Derp-Version";
/// The challenge header of `/generate_204`.
const CHALLENGE_HEADER: &str = "X-Tailscale-Challenge";
/// Its answer.
const RESPONSE_HEADER: &str = "X-Tailscale-Response";
/// The longest first request head peeked for fast start.
const MAX_PEEK: usize = 8 << 10;
/// How long a new connection may take to send its first request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Loads a TLS acceptor from PEM files (certificate chain, private key), ring provider.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |path: &Path, reason: String| Error::Tls {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(tls_err(cert, "no certificate in file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| tls_err(key, e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves HTTP(S) on `listener` until `shutdown` resolves, then closes every connection.
pub async fn serve(
    listener: TcpListener,
    relay: Relay,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of file descriptors and the like (a flood of connections can
                        // cause it): back off a little, keep serving.
                        if let Some(held_back) = relay.peer_log().allow() {
                            warn!(error = %e, held_back, "accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let relay = relay.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    match tls {
                        None => serve_conn(stream, remote, relay).await,
                        Some(acceptor) => {
                            let accept = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream));
                            match accept.await {
                                Ok(Ok(s)) => serve_conn(s, remote, relay).await,
                                Ok(Err(e)) => debug!(%remote, error = %e, "TLS handshake failed"),
                                Err(_) => debug!(%remote, "TLS handshake timed out"),
                            }
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    relay.shutdown();
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    info!("HTTP server stopped");
}

/// Serves one connection: a fast-start DERP client directly, anything else through hyper.
async fn serve_conn<S>(mut stream: S, remote: SocketAddr, relay: Relay)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut head = Vec::with_capacity(1024);
    let peeked = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            if head_end(&head).is_some() || head.len() >= MAX_PEEK {
                return Ok::<_, io::Error>(true);
            }
            let n = stream.read_buf(&mut head).await?;
            if n == 0 {
                return Ok(false);
            }
        }
    })
    .await;
    match peeked {
        Ok(Ok(true)) => {}
        _ => return,
    }
    if let Some(end) = head_end(&head)
        && is_fast_start(&head[..end])
    {
        debug!(%remote, "fast-start DERP upgrade");
        let leftover = head.split_off(end);
        relay
            .accept_with_leftover(stream, leftover, Some(remote))
            .await;
        return;
    }
    let io = TokioIo::new(Replay {
        prefix: head,
        pos: 0,
        inner: stream,
    });
    let service = hyper::service::service_fn(move |req| {
        let relay = relay.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, relay, remote)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(%remote, error = %e, "HTTP connection ended");
    }
}

/// The offset just past the `\r\n\r\n` ending the request head.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Whether a request head asks for a fast-start DERP upgrade on `/derp`.
fn is_fast_start(head: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(head) else {
        return false;
    };
    let mut lines = text.split("\r\n");
    let Some(request_line) = lines.next() else {
        return false;
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return false;
    };
    let path = target.split('?').next().unwrap_or(target);
    let path = path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or(path);
    if !(method == "GET" || method == "POST") || path != "/derp" {
        return false;
    }
    let mut fast = false;
    let mut upgrade = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case(FAST_START_HEADER) && value == "1" {
            fast = true;
        }
        if name.eq_ignore_ascii_case("upgrade") && value.eq_ignore_ascii_case("derp") {
            upgrade = true;
        }
    }
    fast && upgrade
}

fn text(status: StatusCode, body: &str) -> Response<String> {
    let mut resp = Response::new(body.to_owned());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn handle(mut req: Request<Incoming>, relay: Relay, remote: SocketAddr) -> Response<String> {
    let path = req.uri().path();
    let head = req.method() == Method::HEAD;
    match path {
        "/derp/probe" | "/derp/latency-check" => {
            if req.method() == Method::GET || head {
                let mut resp = text(StatusCode::OK, "");
                resp.headers_mut().insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
                resp
            } else {
                text(StatusCode::METHOD_NOT_ALLOWED, "bogus probe method\n")
            }
        }
        "/derp" => {
            let upgrade = req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_ascii_lowercase);
            if upgrade.as_deref() != Some("derp") {
                if let Some(other) = upgrade {
                    debug!(%remote, upgrade = %other, "unsupported upgrade");
                }
                return text(
                    StatusCode::UPGRADE_REQUIRED,
                    "DERP requires connection upgrade\n",
                );
            }
            let on_upgrade = hyper::upgrade::on(&mut req);
            let task_relay = relay.clone();
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        task_relay
                            .accept(TokioIo::new(upgraded), Some(remote))
                            .await
                    }
                    Err(e) => debug!(%remote, error = %e, "upgrade failed"),
                }
            });
            let mut resp = Response::new(String::new());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("DERP"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(
                VERSION_HEADER,
                HeaderValue::from(warren_proto::derp::PROTOCOL_VERSION),
            );
            if let Ok(v) = HeaderValue::from_str(&hex::encode(relay.public_key().as_bytes())) {
                h.insert(PUBLIC_KEY_HEADER, v);
            }
            resp
        }
        "/generate_204" => {
            let mut resp = Response::new(String::new());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            if let Some(challenge) = req
                .headers()
                .get(CHALLENGE_HEADER)
                .and_then(|v| v.to_str().ok())
                && challenge.len() <= 64
                && challenge
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
                && let Ok(v) = HeaderValue::from_str(&format!("response {challenge}"))
            {
                resp.headers_mut().insert(RESPONSE_HEADER, v);
            }
            resp.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(
                    "no-cache, no-store, must-revalidate, no-transform, max-age=0",
                ),
            );
            resp
        }
        "/" => text(
            StatusCode::OK,
            "warren DERP relay: DERP at /derp, probes at /derp/probe.\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A stream that first yields bytes already read from it.
struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_start_detection() {
        let yes = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n";
        assert!(is_fast_start(&yes[..head_end(yes).expect("end")]));
        let no = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n";
        assert!(!is_fast_start(no));
        let probe = b"GET /derp/probe HTTP/1.1\r\nDerp-Fast-Start: 1\r\nUpgrade: derp\r\n\r\n";
        assert!(!is_fast_start(probe));
        let ws = b"GET /derp HTTP/1.1\r\nDerp-Fast-Start: 1\r\nUpgrade: websocket\r\n\r\n";
        assert!(!is_fast_start(ws));
    }
}
