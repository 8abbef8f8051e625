//! Lints of `contrib/docker` that need no network (the image itself cannot be built here: base
//! images cannot be fetched): the example configuration loads, and the Dockerfile and compose
//! file agree with it and with each other on ports, volumes and the command. The systemd units
//! are checked by `scripts/check-units` (`systemd-analyze verify`) in `scripts/test`.

use std::path::{Path, PathBuf};

use warren_control::config::Config;

fn contrib(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/docker")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(contrib(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The Dockerfile's instructions: comments dropped, `\` continuations joined, each as
/// (INSTRUCTION, arguments).
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (instr, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((instr.to_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    assert!(current.is_empty(), "a continuation at the end of the file");
    out
}

/// The list items under `key:` in compose.yaml (`- "a:b"  # comment` -> `a:b`).
fn compose_list(text: &str, key: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut inside: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(at) = inside {
            if let Some(item) = trimmed.strip_prefix("- ") {
                let item = item.split(" #").next().unwrap_or_default().trim();
                items.push(item.trim_matches('"').to_owned());
                continue;
            }
            if indent <= at && !trimmed.is_empty() {
                inside = None;
            }
        }
        if trimmed == format!("{key}:") {
            inside = Some(indent);
        }
    }
    items
}

#[test]
fn the_example_config_loads_and_the_dockerfile_and_compose_file_agree_with_it() {
    let config = Config::load(&contrib("control.toml")).expect("contrib/docker/control.toml");
    let grpc = config.listen_addr.port();
    let derp = config.derp.server.listen_addr.port();
    let stun = config.derp.server.stun_listen_addr.port();
    let metrics = config.metrics_listen_addr.map(|a| a.port());
    assert_eq!((grpc, derp, stun, metrics), (50443, 3340, 3478, Some(9090)));
    assert_eq!(
        config.unix_socket,
        Path::new("/var/run/warren/control.sock")
    );
    assert!(
        config
            .database
            .sqlite
            .path
            .starts_with("/var/lib/warren-control")
    );
    assert!(
        config
            .noise
            .private_key_path
            .starts_with("/var/lib/warren-control")
    );

    let docker = instructions(&read("Dockerfile"));
    let find = |name: &str| -> Vec<&str> {
        docker
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    assert_eq!(docker[0], ("FROM".into(), "debian:12-slim".into()));
    assert_eq!(find("FROM").len(), 1, "a thin layer: one stage");
    assert_eq!(
        find("COPY"),
        ["target/release/warren-control target/release/warren-derp /usr/local/bin/"]
    );
    assert_eq!(find("USER"), ["warren"], "runs as a non-root user");
    assert_eq!(
        find("EXPOSE"),
        [format!("{grpc} {derp} {stun}/udp 9090").as_str()]
    );
    assert_eq!(
        find("VOLUME"),
        [r#"["/etc/warren", "/var/lib/warren-control"]"#]
    );
    assert_eq!(
        find("ENTRYPOINT"),
        [r#"["/usr/local/bin/warren-control", "--config", "/etc/warren/control.toml"]"#]
    );
    assert_eq!(find("CMD"), [r#"["serve"]"#]);
    // The user owns the directories the server writes: the state and the admin socket's.
    let run = find("RUN").join(" ");
    assert!(
        run.contains("chown warren:warren /var/lib/warren-control /var/run/warren"),
        "{run}"
    );

    let compose = read("compose.yaml");
    assert!(!compose.contains('\t'), "YAML indents with spaces only");
    for line in [
        "services:",
        "  warren-control:",
        "    restart: unless-stopped",
    ] {
        assert!(compose.lines().any(|l| l == line), "compose.yaml: {line:?}");
    }
    assert!(
        compose
            .lines()
            .any(|l| l.trim() == "dockerfile: contrib/docker/Dockerfile")
    );
    assert_eq!(
        compose_list(&compose, "ports"),
        [
            format!("{grpc}:{grpc}"),
            format!("{derp}:{derp}"),
            format!("{stun}:{stun}/udp"),
            format!("{0}:{0}/udp", stun + 1),
            "127.0.0.1:9090:9090".into(),
        ]
    );
    assert_eq!(
        compose_list(&compose, "volumes"),
        ["./config:/etc/warren:ro", "./data:/var/lib/warren-control"]
    );
}
