//! `LiveConfig::reload` in process: what a config edit does to the DERP map the running server
//! hands out (the embedded server keeps the ports it started on), which keys it names as
//! needing a restart, and that an edit that does not load changes nothing.

use warren_control::config::{Config, ConfigError};
use warren_control::reload::{LiveConfig, SettingsError};
use warren_control::serve::StartupWarning;

fn config_text(dir: &std::path::Path, server_url: &str, derp: &str, dns: &str) -> String {
    format!(
        "server_url = \"{server_url}\"\nunix_socket = {:?}\n[noise]\nprivate_key_path = {:?}\n\
         [database.sqlite]\npath = {:?}\n[derp.server]\n{derp}\n[dns]\n{dns}\n",
        dir.join("control.sock"),
        dir.join("control.key"),
        dir.join("db.sqlite"),
    )
}

/// (region id, host name, DERP port) of every node of the map in force.
async fn derp_nodes(shared: &warren_control::grpc::Shared) -> Vec<(u32, String, i32)> {
    let core = shared.core.lock().await;
    let (_, map) = core.settings();
    map.regions
        .iter()
        .flat_map(|r| r.nodes.iter().filter(|n| !n.stun_only))
        .map(|n| (n.region_id, n.host_name.clone(), n.derp_port))
        .collect()
}

#[tokio::test]
async fn an_edit_changes_the_map_not_the_embedded_servers_ports_and_names_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("control.toml");
    let write = |text: String| std::fs::write(&path, text).expect("write");
    write(config_text(
        dir.path(),
        "http://192.0.2.1:50443",
        "listen_addr = \"127.0.0.1:3340\"",
        "",
    ));
    let config = Config::load(&path).expect("loads");
    let shared = warren_control::serve::open(&config).expect("open");
    let mut live = LiveConfig::new(config);
    assert_eq!(live.path(), Some(path.as_path()));
    assert_eq!(
        derp_nodes(&shared).await,
        [(999, "192.0.2.1".to_owned(), 3340)]
    );
    assert_eq!(
        live.reload(&shared, false).await.expect("loads"),
        None,
        "the same file: nothing to do"
    );

    // A loopback server_url, a new region id (both live), a new DERP port (restart).
    write(config_text(
        dir.path(),
        "http://127.0.0.1:50443",
        "listen_addr = \"127.0.0.1:4000\"\nregion_id = 998",
        "",
    ));
    let done = live
        .reload(&shared, false)
        .await
        .expect("loads")
        .expect("changed");
    assert_eq!(done.applied, ["derp map"]);
    assert_eq!(done.restart, ["derp.server.listen_addr"]);
    assert_eq!(done.updates, 0, "no node has a stream open");
    assert_eq!(done.log_level, None);
    assert_eq!(
        done.warnings,
        [StartupWarning::LoopbackDerpHost {
            host: "127.0.0.1".into(),
            key: "server_url",
        }]
    );
    // The embedded server still listens where it started: the map says so.
    assert_eq!(
        derp_nodes(&shared).await,
        [(998, "127.0.0.1".to_owned(), 3340)]
    );

    // An edit that does not load: refused, naming the key; the map and DNS stay.
    write(config_text(
        dir.path(),
        "http://127.0.0.1:50443",
        "region_id = 997",
        "search_domains = [\"bad domain\"]",
    ));
    let err = live.reload(&shared, true).await.expect_err("refused");
    assert!(
        matches!(
            &err,
            SettingsError::Config(ConfigError::Invalid {
                key: "dns.search_domains",
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "dns.search_domains: \"bad domain\" is not a domain name"
    );
    assert_eq!(
        derp_nodes(&shared).await,
        [(998, "127.0.0.1".to_owned(), 3340)]
    );
    assert!(
        shared
            .core
            .lock()
            .await
            .settings()
            .0
            .search_domains
            .is_empty()
    );
}
