//! Every way a request can fail, and the one place they become gRPC statuses.

use warren_proto::NodePublicKey;
use warren_proto::proof::ProofError;

use crate::ipam::Exhausted;
use crate::policy::PolicyError;
use crate::secret::MalformedSecret;
use crate::store::StoreError;

/// Why a control or admin request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The node proof was missing or did not verify.
    #[error("node proof: {0}")]
    Proof(#[from] ProofError),
    /// The proven node key is not registered.
    #[error("node key {key} is not registered")]
    UnknownNode {
        /// The key.
        key: NodePublicKey,
    },
    /// The node's key has expired; it must register again with a pre-auth key.
    #[error("node key {key} has expired; register again with a pre-auth key")]
    NodeExpired {
        /// The key.
        key: NodePublicKey,
    },
    /// A secret had the wrong shape.
    #[error("{0}")]
    Malformed(#[from] MalformedSecret),
    /// No pre-auth key has this prefix, or the secret does not match.
    #[error("pre-auth key not found")]
    AuthKeyNotFound,
    /// The pre-auth key is past its expiration (or was expired by an admin).
    #[error("pre-auth key expired")]
    AuthKeyExpired,
    /// The single-use pre-auth key was used already.
    #[error("pre-auth key already used")]
    AuthKeyUsed,
    /// No API key was presented.
    #[error("an API key is required: authorization: Bearer <key>")]
    ApiKeyMissing,
    /// The API key is unknown or wrong.
    #[error("API key not valid")]
    ApiKeyInvalid,
    /// The API key expired.
    #[error("API key expired")]
    ApiKeyExpired,
    /// A request field is out of range.
    #[error("{field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A route in a request is not a usable prefix (see [`crate::routes::parse_routes`]).
    #[error("{field}: {route:?} {reason}")]
    InvalidRoute {
        /// The field: `advertised_routes` (UpdateNode) or `routes` (ApproveRoutes).
        field: &'static str,
        /// The route as sent.
        route: String,
        /// What is wrong with it.
        reason: String,
    },
    /// More routes than [`crate::routes::MAX_ROUTES`] in one request.
    #[error("{field}: {count} routes; at most {max}")]
    TooManyRoutes {
        /// The field.
        field: &'static str,
        /// How many were sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// No such user.
    #[error("user {name:?} not found")]
    UserNotFound {
        /// The name.
        name: String,
    },
    /// The user name is taken.
    #[error("user {name:?} already exists")]
    UserExists {
        /// The name.
        name: String,
    },
    /// The user still owns nodes.
    #[error("user {name:?} still has {count} node(s); delete them first")]
    UserHasNodes {
        /// The name.
        name: String,
        /// How many nodes.
        count: usize,
    },
    /// No such node.
    #[error("node {id} not found")]
    NodeNotFound {
        /// The id.
        id: u64,
    },
    /// No pre-auth or API key has this prefix.
    #[error("no key with prefix {prefix:?}")]
    KeyPrefixNotFound {
        /// The prefix.
        prefix: String,
    },
    /// The name is used by another node.
    #[error("name {name:?} is taken by another node")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The address range is full.
    #[error("{0}")]
    Exhausted(#[from] Exhausted),
    /// A policy was refused, or a tag has no owner in the policy in force; the message names
    /// the place and line:col, or the failing tests.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// `policy set` while the policy is a file (`policy.mode = "file"`).
    #[error(
        "policy.mode is \"file\": the policy is {path}; edit that file (it is reloaded when it \
         changes), or set policy.mode = \"database\" to manage it with `policy set`"
    )]
    PolicyModeIsFile {
        /// The policy file (or a note that none is configured).
        path: String,
    },
    /// A policy text above the size limit.
    #[error("the policy is {size} bytes; at most {max} are accepted")]
    PolicyTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// `policy explain`: SRC or DST names no node, address, user, group or tag.
    #[error("{role} {what:?} matches no node name, mesh address, user, group or tag")]
    NoSuchTarget {
        /// "source" or "destination".
        role: &'static str,
        /// What was asked for.
        what: String,
    },
    /// The database failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        use ControlError as E;
        use tonic::Code;
        let code = match &e {
            E::Proof(_) | E::ApiKeyMissing | E::ApiKeyInvalid | E::ApiKeyExpired => {
                Code::Unauthenticated
            }
            E::UnknownNode { .. }
            | E::UserNotFound { .. }
            | E::NodeNotFound { .. }
            | E::KeyPrefixNotFound { .. } => Code::NotFound,
            E::AuthKeyNotFound | E::AuthKeyExpired | E::AuthKeyUsed | E::NodeExpired { .. } => {
                Code::PermissionDenied
            }
            E::Malformed(_)
            | E::InvalidField { .. }
            | E::InvalidRoute { .. }
            | E::TooManyRoutes { .. }
            | E::Policy(_)
            | E::PolicyTooLarge { .. } => Code::InvalidArgument,
            E::NoSuchTarget { .. } => Code::NotFound,
            E::PolicyModeIsFile { .. } => Code::FailedPrecondition,
            E::UserExists { .. } | E::NameTaken { .. } => Code::AlreadyExists,
            E::UserHasNodes { .. } => Code::FailedPrecondition,
            E::Exhausted(_) => Code::ResourceExhausted,
            E::Store(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %e, "request failed");
            return tonic::Status::new(code, "internal error (see the server's log)");
        }
        tonic::Status::new(code, e.to_string())
    }
}
