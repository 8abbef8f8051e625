//! The web admin page in a real browser: Debian's `chromium`, headless, driven through
//! `chromedriver` (WebDriver), both inside the control server's namespace where the page
//! listens on its default address, 127.0.0.1:8081. The test logs in with a real API key
//! (after a wrong one is refused), creates a user and a pre-auth key on the page, registers a
//! real `warren up` with that key, watches the node turn up online without a reload (the page's
//! server-sent events), draws it and a second node in the mesh picture, asks the policy page
//! about it, renames and deletes it, and checks that a POST without the CSRF token is refused.
//! It saves a screenshot of each page under `target/web-screenshots/`.
//!
//! WebDriver is plain JSON over HTTP; `curl`, run in the namespace with `ip netns exec`, carries
//! it (the test process itself stays in the host's namespace). The lab kills chromedriver and
//! every browser process inside its namespaces when it drops, on every exit path; the browser
//! session is also closed explicitly. Run as root after `cargo build --bins`; without root, or
//! without chromium, it prints why it is skipped, and fails instead when
//! `WARREN_NETNS_REQUIRED=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_json::{Value, json};
use warren_netns_tests::{Lab, Mesh, lab_test, wait_until};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

/// Where chromedriver listens, inside control's namespace.
const DRIVER_PORT: u16 = 9515;
/// The page, as the browser (in control's namespace) reaches it: the default address.
const PAGE: &str = "http://127.0.0.1:8081";
/// Deadline for anything the page or the mesh should do soon.
const SOON: Duration = Duration::from_secs(30);
/// The element reference key of the W3C WebDriver protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Whether `program` is on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// A WebDriver session of chromedriver in a namespace, closed on drop.
struct Browser {
    ns: String,
    session: String,
}

/// One WebDriver call from inside `ns`; the reply's `value`, or the WebDriver error.
fn webdriver(ns: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let url = format!("http://127.0.0.1:{DRIVER_PORT}{path}");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-X",
        method,
    ]);
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body.to_string());
    }
    let out = cmd.arg(&url).output().context("running curl")?;
    ensure!(
        out.status.success(),
        "curl {method} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "WebDriver {method} {path} answered non-JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    if let Some(error) = v["value"]["error"].as_str() {
        bail!(
            "WebDriver {method} {path}: {error}: {}",
            v["value"]["message"]
        );
    }
    Ok(v["value"].clone())
}

impl Browser {
    /// Opens a headless chromium (no sandbox: the test runs as root; a profile in `profile`).
    fn open(ns: &str, profile: &Path) -> Result<Self> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-crash-reporter", "--window-size=1500,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let v = webdriver(ns, "POST", "/session", Some(&caps))?;
        let session = v["sessionId"].as_str().context("no sessionId")?.to_owned();
        Ok(Self {
            ns: ns.to_owned(),
            session,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        webdriver(&self.ns, method, &path, body.as_ref())
    }

    fn go(&self, path: &str) -> Result<()> {
        self.call(
            "POST",
            "/url",
            Some(json!({ "url": format!("{PAGE}{path}") })),
        )?;
        Ok(())
    }

    fn url(&self) -> Result<String> {
        Ok(self
            .call("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn find(&self, css: &str) -> Result<String> {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v[ELEMENT]
            .as_str()
            .with_context(|| format!("no element {css}: {v}"))?
            .to_owned())
    }

    fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css)?;
        self.call("POST", &format!("/element/{e}/clear"), Some(json!({})))?;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )?;
        Ok(())
    }

    fn click(&self, css: &str) -> Result<()> {
        let e = self.find(css)?;
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})))?;
        Ok(())
    }

    fn text(&self, css: &str) -> Result<String> {
        let e = self.find(css)?;
        Ok(self
            .call("GET", &format!("/element/{e}/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn script(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn script_async(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Saves a PNG of the window to `dir/name.png` and prints its path.
    fn screenshot(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let b64 = self.call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("screenshot is not a string")?)
            .context("screenshot is not base64")?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("write {}", path.display()))?;
        println!("screenshot: {}", path.display());
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes chromium; chromedriver and anything left go when the lab drops.
        let _ = webdriver(
            &self.ns,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

fn screenshot_dir() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("web-screenshots");
    // Only this run's pictures.
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", dir.display()));
        }
        _ => {}
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Each node row of the page's table: (row id, online cell, name cell).
fn rows(browser: &Browser) -> Result<Vec<(String, String, String)>> {
    let v = browser.script(
        "return Array.from(document.querySelectorAll('#nodes tr')).map(r => [r.id, \
         (r.querySelector('[data-online]') || {}).textContent || '', \
         (r.querySelector('.name') || {}).textContent || '']);",
    )?;
    Ok(v.as_array()
        .context("rows is not an array")?
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().unwrap_or_default().to_owned();
            (s(0), s(1), s(2))
        })
        .collect())
}

#[test]
fn the_web_admin_page_in_a_real_browser() {
    lab_test("web", LABTOOL, |lab, bins| {
        for program in ["chromium", "chromedriver", "curl"] {
            if !on_path(program) {
                let why = format!(
                    "the browser test needs {program} (apt-get install chromium chromium-driver \
                     curl; scripts/test installs them)"
                );
                assert!(
                    std::env::var_os("WARREN_NETNS_REQUIRED").is_none_or(|v| v == "0"),
                    "{why}"
                );
                eprintln!("skipping: {why}");
                return Ok(());
            }
        }
        run(lab, bins)
    });
}

fn run(lab: &mut Lab, bins: &warren_netns_tests::Binaries) -> Result<()> {
    let shots = screenshot_dir()?;
    let mut mesh = Mesh::start(lab, bins, 0)?;
    let ns = mesh.control.ns.clone();
    let created = mesh.control.admin_ok(lab, ["apikeys", "create"])?;
    let api_key = serde_json::from_str::<Value>(&created)?["secret"]
        .as_str()
        .context("apikeys create printed no secret")?
        .to_owned();

    lab.spawn(
        &ns,
        "chromedriver",
        "chromedriver",
        [format!("--port={DRIVER_PORT}")],
    )?;
    wait_until(SOON, "chromedriver is ready", || {
        Ok(webdriver(&ns, "GET", "/status", None)?["ready"] == json!(true))
    })?;
    let profile = lab.dir().join("chromium-profile");
    std::fs::create_dir_all(&profile)?;
    let browser = Browser::open(&ns, &profile)?;

    // Not logged in: every page leads to the login form.
    browser.go("/nodes")?;
    ensure!(browser.url()?.ends_with("/login"), "at {}", browser.url()?);
    browser.screenshot(&shots, "01-login")?;

    // A wrong key: one message, no session.
    browser.type_into("#api_key", "warren-api-000000000000-wrong")?;
    browser.click("#login")?;
    let error = browser.text("#error")?;
    ensure!(error == "invalid API key", "login error {error:?}");
    browser.screenshot(&shots, "02-login-refused")?;

    // The real key.
    browser.type_into("#api_key", &api_key)?;
    browser.click("#login")?;
    wait_until(SOON, "the nodes page after login", || {
        Ok(browser.url()?.ends_with("/nodes"))
    })?;

    // A user and a pre-auth key, made on the page.
    browser.go("/users")?;
    browser.type_into("#user-name", "webuser")?;
    browser.click("#create-user")?;
    wait_until(SOON, "webuser in the users table", || {
        Ok(browser
            .script("return document.body.innerText")?
            .as_str()
            .unwrap_or_default()
            .contains("webuser"))
    })?;
    browser.screenshot(&shots, "03-users")?;
    browser.go("/preauthkeys")?;
    browser.click("#user option[value=webuser]")?;
    browser.click("#reusable")?;
    browser.click("#create-preauthkey")?;
    let secret = browser.text("#new-secret")?;
    ensure!(secret.starts_with("warren-auth-"), "secret {secret:?}");
    browser.screenshot(&shots, "04-preauthkey-created")?;

    // The nodes page, left open: the node must turn up on it without a reload.
    browser.go("/nodes")?;
    ensure!(rows(&browser)?.is_empty(), "no nodes yet");
    browser.script("window.__warrenNoReload = 42;")?;
    let node = mesh.spawn_node_with_key(lab, &secret)?;
    let info = wait_until(SOON, "control lists the node online", || {
        node.check_running()?;
        Ok(mesh
            .control
            .node_by_hostname(lab, &node.hostname)
            .is_ok_and(|n| n.online))
    })
    .and_then(|_| mesh.control.node_by_hostname(lab, &node.hostname))?;
    let row = format!("node-{}", info.id);
    let mut last = Vec::new();
    wait_until(SOON, "the page shows the node online", || {
        last = rows(&browser)?;
        Ok(last
            .iter()
            .any(|(id, online, _)| *id == row && online == "online"))
    })
    .with_context(|| format!("rows: {last:?}"))?;
    ensure!(
        browser.script("return window.__warrenNoReload")? == json!(42),
        "the page was reloaded"
    );
    let count = browser.text("#node-count")?;
    ensure!(count == "1", "node count {count:?}");
    browser.screenshot(&shots, "05-nodes-online")?;

    // A second node with the same (reusable) key; the mesh picture links the two, both online.
    let second = mesh.spawn_node_with_key(lab, &secret)?;
    wait_until(SOON, "control lists the second node online", || {
        second.check_running()?;
        Ok(mesh
            .control
            .node_by_hostname(lab, &second.hostname)
            .is_ok_and(|n| n.online))
    })?;
    browser.go("/mesh")?;
    let count = |css: &str| -> Result<u64> {
        browser
            .script(&format!(
                "return document.querySelectorAll('{css}').length;"
            ))?
            .as_u64()
            .context("not a count")
    };
    ensure!(count("#mesh circle")? == 2, "two nodes drawn");
    ensure!(
        count("#mesh line.online-pair")? == 1,
        "one link between two online nodes"
    );
    browser.screenshot(&shots, "06-mesh")?;
    browser.go("/nodes")?;

    // A POST without the CSRF token, from the logged-in browser itself.
    let refused = browser.script_async(&format!(
        "const done = arguments[arguments.length - 1];\
         fetch('/nodes/delete', {{method: 'POST', body: new URLSearchParams({{id: '{}'}})}})\
         .then(r => r.text().then(t => done([r.status, t])), e => done(String(e)));",
        info.id
    ))?;
    ensure!(
        refused == json!([403, "invalid CSRF token"]),
        "POST without CSRF: {refused}"
    );
    mesh.control.node_by_hostname(lab, &node.hostname)?;

    // Rename.
    browser.type_into(&format!("#{row} input[name=new_name]"), "renamed-on-web")?;
    browser.click(&format!("#{row} form[action='/nodes/rename'] button"))?;
    wait_until(SOON, "the page shows the new name", || {
        Ok(rows(&browser)?
            .iter()
            .any(|(id, _, name)| *id == row && name.starts_with("renamed-on-web")))
    })?;
    let renamed = mesh.control.node_by_hostname(lab, &node.hostname)?;
    ensure!(
        renamed.given_name == "renamed-on-web",
        "control has {:?}",
        renamed.given_name
    );
    browser.screenshot(&shots, "07-nodes-renamed")?;

    // The policy page answers "can A reach B" (the renamed node, an address no node has).
    browser.go("/policy")?;
    browser.type_into("#src", "webuser@")?;
    browser.type_into("#dst", "100.64.0.99")?;
    browser.type_into("#port", "22")?;
    browser.click("#ask")?;
    let unconfigured = browser.text("#unconfigured")?;
    ensure!(
        unconfigured == "No policy is configured: every node may reach every other.",
        "policy answer {unconfigured:?}"
    );
    let answer = browser.text("#answer tbody")?;
    ensure!(
        answer.starts_with("renamed-on-web 100.64.0.1")
            && answer.contains("22 allowed default (allow all)"),
        "policy answer {answer:?}"
    );
    browser.screenshot(&shots, "08-policy-explain")?;
    browser.go("/nodes")?;

    // Delete.
    browser.click(&format!("#{row} form[action='/nodes/delete'] button"))?;
    wait_until(SOON, "the row is gone", || {
        Ok(browser.url()?.ends_with("/nodes")
            && !rows(&browser)?.iter().any(|(id, _, _)| *id == row))
    })?;
    let left: Vec<u64> = mesh.control.nodes(lab)?.iter().map(|n| n.id).collect();
    ensure!(
        !left.contains(&info.id) && left.len() == 1,
        "control lists {left:?}"
    );
    browser.screenshot(&shots, "09-nodes-deleted")?;

    browser.go("/apikeys")?;
    browser.screenshot(&shots, "10-apikeys")?;
    browser.go("/preauthkeys")?;
    ensure!(
        !browser
            .script("return document.body.innerText")?
            .as_str()
            .unwrap_or_default()
            .contains(&secret),
        "the pre-auth key's secret is shown only once"
    );
    browser.screenshot(&shots, "11-preauthkeys")?;
    Ok(())
}
