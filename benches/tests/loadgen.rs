//! The load generator against the real (debug) `warren-control` binary with 5 nodes: every
//! node gets exactly one full map, listing exactly the other 4; every stream sees each of 3
//! joining nodes and its endpoints; after SIGKILL and a restart every stream resumes (no full
//! map) and is consistent again. So neither the generator nor those paths rot unnoticed. Skipped with a reason when the binary is not built, unless
//! WARREN_NETNS_REQUIRED=1.

use std::path::PathBuf;
use std::time::Duration;

use warren_benches::loadgen::{Options, run};

/// `warren-control` in the same target directory as this test (target/debug/deps/..).
fn control_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("warren-control");
    bin.is_file().then_some(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_each_get_one_exact_full_map() {
    let Some(bin) = control_bin() else {
        let required = std::env::var("WARREN_NETNS_REQUIRED").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "warren-control is not built (cargo build -p warren-control) and WARREN_NETNS_REQUIRED=1"
        );
        eprintln!("skipped: warren-control is not built (cargo build -p warren-control)");
        return;
    };
    let opts = Options {
        embedded_derp: false,
        web: false,
        timeout: Duration::from_secs(60),
        probes: 3,
        ..Options::new(5, bin)
    };
    let report = run(&opts).await.expect("the load ran");
    assert_eq!(report.per_node.len(), 5);
    let mut ids: Vec<u64> = report.per_node.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "distinct nodes: {:?}", report.per_node);
    for n in &report.per_node {
        assert_eq!(n.full_maps, 1, "{n:?}");
        assert_eq!(n.full_map_peers, 4, "{n:?}");
        assert!(
            n.full_map_exact,
            "the full map lists exactly the others: {n:?}"
        );
        assert!(n.full_map_bytes > 0 && n.bytes >= n.full_map_bytes, "{n:?}");
    }
    assert!(report.full_maps_exact());
    assert!(report.all_full_maps.is_some(), "{}", report.to_text());
    assert!(report.all_online.is_some(), "{}", report.to_text());
    assert!(report.all_endpoints.is_some(), "{}", report.to_text());
    assert_eq!(
        report.full_map_bytes_total,
        report
            .per_node
            .iter()
            .map(|n| n.full_map_bytes)
            .sum::<u64>()
    );
    // Fan-out: each of the 3 probes, online and then its endpoints, at each of the 5 streams.
    assert_eq!(report.join_fan_out.changes, 3);
    assert_eq!(report.join_fan_out.samples, 15, "{}", report.to_text());
    assert_eq!(report.endpoint_fan_out.samples, 15, "{}", report.to_text());
    assert!(report.join_fan_out.p50 <= report.join_fan_out.p99);
    // The restart: every stream resumed, consistent again, for fewer bytes than the maps.
    let restart = report.restart.as_ref().expect("the restart phase ran");
    assert_eq!(
        (restart.resumed, restart.full),
        (5, 0),
        "{}",
        report.to_text()
    );
    assert!(restart.consistent.is_some(), "{}", report.to_text());
    assert!(
        restart.bytes < report.full_map_bytes_total,
        "{}",
        report.to_text()
    );
    assert!(report.shutdown.is_some(), "control stopped on SIGTERM");
    assert!(report.usage_end.peak_rss_kib > 0 && report.usage_end.rss_kib > 0);
    assert!(report.max_sampled_rss_kib >= report.usage_end.rss_kib);
    let json = report.to_json(true);
    assert_eq!(json["nodes"], 5);
    assert_eq!(json["full_maps_exact"], true);
    assert_eq!(json["per_node"].as_array().map(Vec::len), Some(5));
}
