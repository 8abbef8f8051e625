//! The TOML configuration. Every field is optional; unknown keys are errors naming the key.
//!
//! ```toml
//! listen = "0.0.0.0:443"          # HTTP(S); plain HTTP unless [tls] is set
//! stun_listen = "0.0.0.0:3478"    # or stun = false
//! stun_alt_listen = "0.0.0.0:3479" # optional second STUN port (NAT mapping tests, RFC 5780)
//! key_path = "/var/lib/warren-derp/derp.key"
//! mesh_key_path = "/etc/warren-derp/mesh.key"   # optional, 64 hex digits
//! mesh_with = ["https://derp2.example.net/derp"] # the region's other servers (needs the key)
//! queue_depth = 512
//! write_timeout_secs = 2
//!
//! [tls]
//! cert = "/etc/warren-derp/cert.pem"
//! key = "/etc/warren-derp/key.pem"
//!
//! [verify_clients]
//! url = "http://control:50443"    # or "unix:/run/warren/control.sock"
//! api_key_path = "/etc/warren-derp/api.key"
//! fail_open = false
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// Tailscale's derper development port, used when nothing says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3340";
/// The STUN port.
pub const DEFAULT_STUN_LISTEN: &str = "0.0.0.0:3478";
/// Where the server key lives by default.
pub const DEFAULT_KEY_PATH: &str = "/var/lib/warren-derp/derp.key";

/// The relay's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The HTTP(S) listen address.
    pub listen: SocketAddr,
    /// Whether to run the STUN server.
    pub stun: bool,
    /// The STUN listen address.
    pub stun_listen: SocketAddr,
    /// A second STUN listen address (another port), answered by the same server: a node that
    /// asks both sees whether its NAT maps by destination (hard NAT) with this server alone,
    /// and RFC 5780 change-port requests are answered from it. Needs `stun`.
    pub stun_alt_listen: Option<SocketAddr>,
    /// The server key file (created with mode 0600 when missing).
    pub key_path: PathBuf,
    /// A file holding the region's mesh key (64 hex digits).
    pub mesh_key_path: Option<PathBuf>,
    /// The region's other servers, linked to as mesh peers. Listing this server itself is
    /// harmless (it is recognised by its key and skipped).
    pub mesh_with: Vec<String>,
    /// Packets queued per client (data and disco each).
    pub queue_depth: usize,
    /// Seconds a write to a client may block before it is disconnected; 0 disables.
    pub write_timeout_secs: u64,
    /// TLS from PEM files; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// Ask warren-control whether a key may connect.
    pub verify_clients: Option<VerifyClients>,
    /// Where to serve Prometheus metrics (`/metrics`); off when absent.
    pub metrics_listen: Option<SocketAddr>,
}

/// TLS certificate and key files.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

/// Client verification through warren-control's `Admin.VerifyNode`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerifyClients {
    /// `http://host:port`, or `unix:/path` for the local admin socket.
    pub url: String,
    /// A file holding the API key (not needed over the unix socket).
    pub api_key_path: Option<PathBuf>,
    /// Admit clients when control cannot be asked.
    #[serde(default)]
    pub fail_open: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3340)),
            stun: true,
            stun_listen: SocketAddr::from(([0, 0, 0, 0], 3478)),
            stun_alt_listen: None,
            key_path: PathBuf::from(DEFAULT_KEY_PATH),
            mesh_key_path: None,
            mesh_with: Vec::new(),
            queue_depth: crate::server::DEFAULT_QUEUE_DEPTH,
            write_timeout_secs: 2,
            tls: None,
            verify_clients: None,
            metrics_listen: None,
        }
    }
}

impl Config {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let config: Self = toml::from_str(text).map_err(|e| Error::Config {
            path: None,
            reason: e.to_string(),
        })?;
        config.check(None)
    }

    /// Rejects settings that parse but cannot work together.
    fn check(self, path: Option<&Path>) -> Result<Self, Error> {
        if !self.mesh_with.is_empty() && self.mesh_key_path.is_none() {
            return Err(Error::Config {
                path: path.map(Path::to_owned),
                reason: "mesh_with needs mesh_key_path (mesh peers prove the shared key)".into(),
            });
        }
        if self.stun_alt_listen.is_some() && !self.stun {
            return Err(Error::Config {
                path: path.map(Path::to_owned),
                reason: "stun_alt_listen needs stun = true (it is a second port of that server)"
                    .into(),
            });
        }
        Ok(self)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: Some(path.to_owned()),
            reason: e.to_string(),
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| Error::Config {
            path: Some(path.to_owned()),
            reason: e.to_string(),
        })?;
        config.check(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(Config::from_toml("").expect("parses"), Config::default());
    }

    #[test]
    fn full_config_parses() {
        let c = Config::from_toml(
            r#"
            listen = "127.0.0.1:8443"
            stun = false
            key_path = "/tmp/k"
            [tls]
            cert = "c.pem"
            key = "k.pem"
            [verify_clients]
            url = "http://control:50443"
            api_key_path = "/etc/api.key"
            "#,
        )
        .expect("parses");
        assert!(!c.stun);
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.tls.expect("tls").cert, PathBuf::from("c.pem"));
        let v = c.verify_clients.expect("verify");
        assert_eq!(v.url, "http://control:50443");
        assert!(!v.fail_open);
    }

    #[test]
    fn mesh_peers_need_the_mesh_key() {
        let err =
            Config::from_toml("mesh_with = [\"http://derp2:3340/derp\"]").expect_err("no key");
        assert!(err.to_string().contains("mesh_key_path"), "{err}");
        let c = Config::from_toml(
            "mesh_key_path = \"/etc/mesh.key\"\nmesh_with = [\"http://derp2:3340/derp\"]",
        )
        .expect("parses");
        assert_eq!(c.mesh_with, vec!["http://derp2:3340/derp".to_owned()]);
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        assert_eq!(Config::default().metrics_listen, None);
        let c = Config::from_toml("metrics_listen = \"127.0.0.1:9091\"").expect("parses");
        assert_eq!(
            c.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9091)))
        );
        Config::from_toml("metrics_listen = \"9091\"").expect_err("not an address");
    }

    #[test]
    fn second_stun_port_is_optional() {
        assert_eq!(Config::default().stun_alt_listen, None);
        let c = Config::from_toml("stun_alt_listen = \"0.0.0.0:3479\"").expect("parses");
        assert_eq!(
            c.stun_alt_listen,
            Some(SocketAddr::from(([0, 0, 0, 0], 3479)))
        );
        let err = Config::from_toml("stun = false\nstun_alt_listen = \"0.0.0.0:3479\"")
            .expect_err("alt without stun");
        assert!(
            matches!(&err, Error::Config { reason, .. } if reason.contains("stun_alt_listen")),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("listen_addr = \"0.0.0.0:1\"").expect_err("unknown");
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = Config::from_toml("[tls]\ncert = \"a\"\nkey = \"b\"\nchain = \"c\"")
            .expect_err("unknown");
        assert!(err.to_string().contains("chain"), "{err}");
    }
}
