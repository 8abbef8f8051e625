//! Live configuration: what reading the config file again (SIGHUP, or the file changing) does
//! to a running server. The DNS settings and the DERP map go to every node on its open map
//! stream (one `SettingsChanged` delta, the stream stays), `log.level` replaces the log filter,
//! and every other key that changed is only named, as needing a restart. A file that does not
//! load changes nothing.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, ConfigError};
use crate::derpmap::DerpMapError;
use crate::grpc::Shared;

/// Why the settings nodes get (DNS, DERP map) could not be built from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The configuration file does not load: the error names the key (or line).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A `derp.paths` file does not load: the error names the file.
    #[error(transparent)]
    DerpMap(#[from] DerpMapError),
}

/// Replaces the process's log filter; installed once by `main` ([`install_log_filter`]).
pub type LogFilterSetter =
    Box<dyn Fn(EnvFilter) -> Result<(), tracing_subscriber::reload::Error> + Send + Sync>;

static LOG_FILTER: OnceLock<LogFilterSetter> = OnceLock::new();

/// Lets `log.level` change the process's log filter (at start and on reloads). The first
/// setter installed stays; later ones are ignored.
pub fn install_log_filter(set: LogFilterSetter) {
    let _ = LOG_FILTER.set(set);
}

/// What became of a `log.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevelApplied {
    /// The filter is in force.
    Applied,
    /// `RUST_LOG` is set: it takes precedence and stays.
    RustLogSet,
    /// No filter can be changed in this process (no setter installed: a library user, a test).
    NotReloadable,
}

/// Puts `level` (checked by the config loader) in force as the log filter, unless `RUST_LOG`
/// is set.
pub fn apply_log_level(level: &str) -> LogLevelApplied {
    if std::env::var_os("RUST_LOG").is_some() {
        return LogLevelApplied::RustLogSet;
    }
    let Some(set) = LOG_FILTER.get() else {
        return LogLevelApplied::NotReloadable;
    };
    match EnvFilter::builder().parse(level).map(set) {
        Ok(Ok(())) => LogLevelApplied::Applied,
        // The loader checked the level, and the subscriber lives as long as the process.
        Ok(Err(_)) | Err(_) => LogLevelApplied::NotReloadable,
    }
}

/// What a config reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReloaded {
    /// What changed and is in force now: `"dns"`, `"derp map"`, `"log.level"`.
    pub applied: Vec<&'static str>,
    /// Keys that differ from the running server's and need a restart (not applied).
    pub restart: Vec<&'static str>,
    /// Map updates sent to nodes.
    pub updates: usize,
    /// What the new DERP map would have been warned about at start-up (a loopback host for
    /// the embedded server), when the map changed.
    pub warnings: Vec<crate::serve::StartupWarning>,
    /// The new `log.level`, when it changed: the caller applies it ([`apply_log_level`]) after
    /// logging the reload, so the line is written under the level it was asked under.
    pub log_level: Option<String>,
}

/// The configuration of a running server, for reloads.
#[derive(Debug)]
pub struct LiveConfig {
    /// What the server started with: what is bound and open.
    started: Config,
    /// The last configuration whose live parts were applied.
    applied: Config,
}

impl LiveConfig {
    /// The configuration `serve` started with.
    pub fn new(started: Config) -> Self {
        Self {
            applied: started.clone(),
            started,
        }
    }

    /// The file to read again: where the running configuration came from.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.started.source.as_deref()
    }

    /// Reads the config file again and applies what can change live. `None`: there is no file
    /// (the server started without one), or, unless `always`, it loads as the configuration
    /// already applied. A file that does not load, or whose DERP map files do not, changes
    /// nothing.
    pub async fn reload(
        &mut self,
        shared: &Shared,
        always: bool,
    ) -> Result<Option<ConfigReloaded>, SettingsError> {
        let Some(path) = self.path() else {
            return Ok(None);
        };
        let new = Config::load(path)?;
        if !always && new == self.applied {
            return Ok(None);
        }
        // The map as this process serves it: the embedded DERP server keeps running (or not)
        // on the ports it was started on until a restart.
        let mut effective = new.clone();
        let (started, server) = (&self.started.derp.server, &mut effective.derp.server);
        server.enabled = Some(self.started.derp.embedded());
        server.listen_addr = started.listen_addr;
        server.stun_listen_addr = started.stun_listen_addr;
        server.stun_alt_listen_addr = started.stun_alt_listen_addr;
        let derp_map = crate::serve::derp_map(&effective)?;
        let dns = new.dns.wire();
        let mut applied = Vec::new();
        let updates = {
            let mut core = shared.core.lock().await;
            let (old_dns, old_map) = core.settings();
            if *old_dns != dns {
                applied.push("dns");
            }
            if *old_map != derp_map {
                applied.push("derp map");
            }
            core.set_settings(dns, derp_map)
        };
        let warnings = match applied.contains(&"derp map") {
            true => crate::serve::startup_warnings(&effective),
            false => Vec::new(),
        };
        let log_level = (new.log.level != self.applied.log.level).then(|| new.log.level.clone());
        if log_level.is_some() {
            applied.push("log.level");
        }
        let restart = self.started.restart_keys(&new);
        self.applied = new;
        Ok(Some(ConfigReloaded {
            applied,
            restart,
            updates,
            warnings,
            log_level,
        }))
    }
}
