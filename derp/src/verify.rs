//! Client verification: after the handshake proved a client holds its node key, the relay may
//! ask whether that key belongs to a registered node. [`ControlVerifier`] asks warren-control's
//! `Admin.VerifyNode`; [`CachedVerifier`] remembers answers (known: 5 minutes, unknown:
//! 10 seconds); tests plug in their own [`Verifier`].

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use warren_proto::NodePublicKey;
use warren_proto::control::VerifyNodeRequest;
use warren_proto::control::admin_client::AdminClient;

/// A boxed verification future.
pub type VerifyFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, VerifyError>> + Send + 'a>>;

/// Decides whether a node key may use the relay.
pub trait Verifier: Send + Sync + 'static {
    /// Whether `key` is a known node. An error means "could not tell".
    fn verify(&self, key: NodePublicKey) -> VerifyFuture<'_>;
}

/// Why a key could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The control server's URL is not valid.
    #[error("verify_clients url {url:?} is not valid: {source}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The API key file could not be read.
    #[error("cannot read API key file {path}: {source}")]
    ApiKeyFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The API key cannot be sent as a header value.
    #[error("API key has characters a header cannot carry")]
    BadApiKey,
    /// The control server answered with an error.
    #[error("VerifyNode failed: {code:?}: {message}")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The check took too long.
    #[error("VerifyNode timed out")]
    Timeout,
}

/// Answers from a fixed set of keys (for tests and static deployments).
#[derive(Debug, Default)]
pub struct StaticVerifier {
    known: Mutex<std::collections::BTreeSet<NodePublicKey>>,
}

impl StaticVerifier {
    /// A verifier knowing `keys`.
    pub fn new(keys: impl IntoIterator<Item = NodePublicKey>) -> Self {
        Self {
            known: Mutex::new(keys.into_iter().collect()),
        }
    }

    /// Adds a known key.
    pub fn insert(&self, key: NodePublicKey) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
    }
}

impl Verifier for StaticVerifier {
    fn verify(&self, key: NodePublicKey) -> VerifyFuture<'_> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key);
        Box::pin(async move { Ok(known) })
    }
}

/// How long a "known" answer is trusted.
pub const KNOWN_TTL: Duration = Duration::from_secs(5 * 60);
/// How long an "unknown" answer is trusted (a node that just registered gets in soon).
pub const UNKNOWN_TTL: Duration = Duration::from_secs(10);
/// Cache entries kept at most; expired entries are swept when this is reached.
const CACHE_MAX: usize = 100_000;

/// Caches another verifier's answers; errors are not cached.
pub struct CachedVerifier<V> {
    inner: V,
    cache: Mutex<BTreeMap<NodePublicKey, (bool, Instant)>>,
}

impl<V> std::fmt::Debug for CachedVerifier<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedVerifier").finish_non_exhaustive()
    }
}

impl<V: Verifier> CachedVerifier<V> {
    /// Wraps `inner`.
    pub fn new(inner: V) -> Self {
        Self {
            inner,
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    fn cached(&self, key: &NodePublicKey, now: Instant) -> Option<bool> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(known, _)| *known)
    }

    fn remember(&self, key: NodePublicKey, known: bool, now: Instant) {
        let ttl = if known { KNOWN_TTL } else { UNKNOWN_TTL };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, expires)| *expires > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (known, now + ttl));
    }
}

impl<V: Verifier> Verifier for CachedVerifier<V> {
    fn verify(&self, key: NodePublicKey) -> VerifyFuture<'_> {
        Box::pin(async move {
            if let Some(known) = self.cached(&key, Instant::now()) {
                return Ok(known);
            }
            let known = self.inner.verify(key).await?;
            self.remember(key, known, Instant::now());
            Ok(known)
        })
    }
}

/// Asks warren-control's `Admin.VerifyNode` over gRPC, with `authorization: Bearer <key>`.
/// A `unix:/path` URL talks to control's local admin socket (which needs no API key).
#[derive(Debug, Clone)]
pub struct ControlVerifier {
    client: AdminClient<Channel>,
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// The longest a `VerifyNode` call may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);

impl ControlVerifier {
    /// A verifier for control at `url` (`http://host:port` or `unix:/path`), reading the API
    /// key from `api_key_path` when given. Connects lazily.
    pub fn new(url: &str, api_key_path: Option<&Path>) -> Result<Self, VerifyError> {
        let channel = if let Some(path) = url.strip_prefix("unix:") {
            let path = std::path::PathBuf::from(path);
            Endpoint::from_static("http://localhost")
                .timeout(VERIFY_TIMEOUT)
                .connect_with_connector_lazy(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
        } else {
            Endpoint::from_shared(url.to_owned())
                .map_err(|source| VerifyError::BadUrl {
                    url: url.to_owned(),
                    source,
                })?
                .timeout(VERIFY_TIMEOUT)
                .connect_timeout(VERIFY_TIMEOUT)
                .connect_lazy()
        };
        let bearer = match api_key_path {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| VerifyError::ApiKeyFile {
                        path: path.to_owned(),
                        source,
                    })?;
                let value = format!("Bearer {}", text.trim())
                    .parse()
                    .map_err(|_| VerifyError::BadApiKey)?;
                Some(value)
            }
        };
        Ok(Self {
            client: AdminClient::new(channel),
            bearer,
        })
    }
}

impl Verifier for ControlVerifier {
    fn verify(&self, key: NodePublicKey) -> VerifyFuture<'_> {
        Box::pin(async move {
            let mut req = tonic::Request::new(VerifyNodeRequest {
                node_key: key.to_vec(),
            });
            if let Some(bearer) = &self.bearer {
                req.metadata_mut().insert("authorization", bearer.clone());
            }
            let mut client = self.client.clone();
            let resp = tokio::time::timeout(VERIFY_TIMEOUT, client.verify_node(req))
                .await
                .map_err(|_| VerifyError::Timeout)?
                .map_err(|status| VerifyError::Rpc {
                    code: status.code(),
                    message: status.message().to_owned(),
                })?;
            Ok(resp.into_inner().known)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        calls: AtomicUsize,
        known: NodePublicKey,
    }

    impl Verifier for std::sync::Arc<Counting> {
        fn verify(&self, key: NodePublicKey) -> VerifyFuture<'_> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let known = key == self.known;
            Box::pin(async move { Ok(known) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_cached_for_their_ttl() {
        let known = NodePublicKey::from_bytes([1; 32]);
        let unknown = NodePublicKey::from_bytes([2; 32]);
        let inner = std::sync::Arc::new(Counting {
            calls: AtomicUsize::new(0),
            known,
        });
        let v = CachedVerifier::new(inner.clone());
        assert!(v.verify(known).await.expect("ok"));
        assert!(!v.verify(unknown).await.expect("ok"));
        assert!(v.verify(known).await.expect("ok"));
        assert!(!v.verify(unknown).await.expect("ok"));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
        tokio::time::advance(UNKNOWN_TTL + Duration::from_millis(1)).await;
        assert!(!v.verify(unknown).await.expect("ok"));
        assert!(v.verify(known).await.expect("ok"));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
        tokio::time::advance(KNOWN_TTL).await;
        assert!(v.verify(known).await.expect("ok"));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4);
    }
}
