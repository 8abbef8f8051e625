//! The DERP map: which relays nodes use, read from JSON files in Tailscale's shape
//! (`{"Regions": {"900": {"RegionID": 900, "Nodes": [...]}}}`) and sent in every full map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use warren_proto::control::{DerpMap, DerpNode, DerpRegion};

/// Why a DERP map file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DerpMapError {
    /// The file could not be read.
    // The cause is in the message, not also a `source` (`{:#}` would print it twice).
    #[error("cannot read DERP map {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not a DERP map.
    #[error("DERP map {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A region's key and its RegionID disagree, or a node names another region.
    #[error("DERP map {path}: region {region}: {reason}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// The region.
        region: u32,
        /// What disagrees.
        reason: &'static str,
    },
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
struct JsonMap {
    #[serde(default)]
    regions: BTreeMap<String, JsonRegion>,
}

// Empty values are left out when written, as Tailscale's `omitempty` does.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
struct JsonRegion {
    #[serde(rename = "RegionID")]
    region_id: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    region_code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    region_name: String,
    #[serde(default)]
    nodes: Vec<JsonNode>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
struct JsonNode {
    name: String,
    #[serde(rename = "RegionID")]
    region_id: u32,
    host_name: String,
    #[serde(default, rename = "IPv4", skip_serializing_if = "String::is_empty")]
    ipv4: String,
    #[serde(default, rename = "IPv6", skip_serializing_if = "String::is_empty")]
    ipv6: String,
    #[serde(default, rename = "STUNPort", skip_serializing_if = "is_zero")]
    stun_port: i32,
    #[serde(default, rename = "STUNOnly", skip_serializing_if = "is_false")]
    stun_only: bool,
    #[serde(default, rename = "DERPPort", skip_serializing_if = "is_zero")]
    derp_port: i32,
    #[serde(default, skip_serializing_if = "is_false")]
    insecure_for_tests: bool,
    #[serde(default, rename = "PlainHTTP", skip_serializing_if = "is_false")]
    plain_http: bool,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Parses one DERP map in Tailscale's JSON shape; `path` is for messages.
pub fn parse(text: &str, path: &Path) -> Result<DerpMap, DerpMapError> {
    let map: JsonMap = serde_json::from_str(text).map_err(|e| DerpMapError::Parse {
        path: path.into(),
        message: e.to_string(),
    })?;
    let mut regions = Vec::with_capacity(map.regions.len());
    for (key, r) in map.regions {
        let inconsistent = |reason| DerpMapError::Inconsistent {
            path: path.into(),
            region: r.region_id,
            reason,
        };
        if key.parse::<u32>().ok() != Some(r.region_id) {
            return Err(inconsistent("its key is not its RegionID"));
        }
        if r.region_id == 0 {
            return Err(inconsistent("RegionID 0 means no region"));
        }
        if r.nodes.iter().any(|n| n.region_id != r.region_id) {
            return Err(inconsistent("a node names another RegionID"));
        }
        let nodes = r
            .nodes
            .into_iter()
            .map(|n| DerpNode {
                name: n.name,
                region_id: n.region_id,
                host_name: n.host_name,
                ipv4: n.ipv4,
                ipv6: n.ipv6,
                stun_port: n.stun_port,
                derp_port: n.derp_port,
                insecure_for_tests: n.insecure_for_tests,
                plain_http: n.plain_http,
                stun_only: n.stun_only,
            })
            .collect();
        regions.push(DerpRegion {
            region_id: r.region_id,
            region_code: r.region_code,
            region_name: r.region_name,
            nodes,
        });
    }
    regions.sort_by_key(|r| r.region_id);
    Ok(DerpMap { regions })
}

/// Writes `map` in Tailscale's JSON shape (what [`parse`] reads).
pub fn to_json(map: &DerpMap) -> String {
    let regions = map
        .regions
        .iter()
        .map(|r| {
            let nodes = r
                .nodes
                .iter()
                .map(|n| JsonNode {
                    name: n.name.clone(),
                    region_id: n.region_id,
                    host_name: n.host_name.clone(),
                    ipv4: n.ipv4.clone(),
                    ipv6: n.ipv6.clone(),
                    stun_port: n.stun_port,
                    stun_only: n.stun_only,
                    derp_port: n.derp_port,
                    insecure_for_tests: n.insecure_for_tests,
                    plain_http: n.plain_http,
                })
                .collect();
            let region = JsonRegion {
                region_id: r.region_id,
                region_code: r.region_code.clone(),
                region_name: r.region_name.clone(),
                nodes,
            };
            (r.region_id.to_string(), region)
        })
        .collect();
    // Strings, numbers and booleans in maps with string keys: nothing that cannot be written.
    serde_json::to_string_pretty(&JsonMap { regions }).unwrap_or_default()
}

/// Reads and merges DERP map files; a later file's region replaces an earlier one's.
pub fn load(paths: &[PathBuf]) -> Result<DerpMap, DerpMapError> {
    let mut merged: BTreeMap<u32, DerpRegion> = BTreeMap::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|error| DerpMapError::Read {
            path: path.clone(),
            error,
        })?;
        for r in parse(&text, path)?.regions {
            merged.insert(r.region_id, r);
        }
    }
    Ok(DerpMap {
        regions: merged.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tailscale_shape_is_read() {
        let text = r#"{"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab",
            "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "derp.lab", "IPv4": "203.0.113.1",
                       "STUNPort": 3478, "DERPPort": 8080, "InsecureForTests": true, "PlainHTTP": true,
                       "CanPort80": false}]}}}"#;
        let map = parse(text, Path::new("m.json")).expect("parses");
        assert_eq!(map.regions.len(), 1);
        let n = &map.regions[0].nodes[0];
        assert_eq!(
            (n.ipv4.as_str(), n.stun_port, n.derp_port),
            ("203.0.113.1", 3478, 8080)
        );
        assert!(n.plain_http && n.insecure_for_tests);
    }

    #[test]
    fn stun_only_nodes_survive_a_round_trip() {
        let text = r#"{"Regions": {"999": {"RegionID": 999, "RegionCode": "warren", "Nodes": [
            {"Name": "999a", "RegionID": 999, "HostName": "203.0.113.1", "STUNPort": 3478,
             "DERPPort": 3340, "PlainHTTP": true},
            {"Name": "999b", "RegionID": 999, "HostName": "203.0.113.1", "STUNPort": 3479,
             "STUNOnly": true}]}}}"#;
        let map = parse(text, Path::new("m.json")).expect("parses");
        let only: Vec<bool> = map.regions[0].nodes.iter().map(|n| n.stun_only).collect();
        assert_eq!(only, [false, true]);
        let written = to_json(&map);
        assert!(written.contains("\"STUNOnly\": true"), "{written}");
        assert_eq!(written.matches("STUNOnly").count(), 1, "{written}");
        assert_eq!(parse(&written, Path::new("w.json")).expect("reparses"), map);
    }

    #[test]
    fn inconsistent_maps_are_refused() {
        let bad_key = r#"{"Regions": {"901": {"RegionID": 900, "Nodes": []}}}"#;
        assert!(matches!(
            parse(bad_key, Path::new("m")),
            Err(DerpMapError::Inconsistent { .. })
        ));
        let bad_node = r#"{"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "a", "RegionID": 1, "HostName": "h"}]}}}"#;
        assert!(matches!(
            parse(bad_node, Path::new("m")),
            Err(DerpMapError::Inconsistent { .. })
        ));
        assert!(matches!(
            parse("{", Path::new("m")),
            Err(DerpMapError::Parse { .. })
        ));
    }
}
