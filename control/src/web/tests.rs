//! The web admin page over real HTTP on loopback: login, sessions, CSRF, the throttle and the
//! actions, against a server state opened in a temporary directory.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::config::Config;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .expect("a csrf field")
            + 19;
        self.body[at..at + 64].to_owned()
    }
}

struct Page {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: tokio::task::JoinHandle<()>,
}

impl Page {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.noise.private_key_path = dir.path().join("control.key");
        config.database.sqlite.path = dir.path().join("db.sqlite");
        configure(&mut config);
        let shared = crate::serve::open(&config).expect("open");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = tokio::spawn(serve(listener, Arc::clone(&shared)));
        Page {
            _dir: dir,
            shared,
            addr,
            stop,
        }
    }

    async fn api_key(&self) -> String {
        self.shared
            .core
            .lock()
            .await
            .create_api_key(None, [7; 30], warren_proto::proof::unix_ms())
            .expect("api key")
            .1
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        cookie: &str,
        form: &[(&str, &str)],
    ) -> Reply {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut text = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if !cookie.is_empty() {
            text += &format!("Cookie: {cookie}\r\n");
        }
        if method == "POST" {
            text += &format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        text += "\r\n";
        text += &body;
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        s.write_all(text.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
            .await
            .expect("reply in time")
            .expect("read");
        parse(&String::from_utf8_lossy(&raw))
    }

    /// Logs in with `key`; the session cookie (`warren_session=...`).
    async fn login(&self, key: &str) -> String {
        let form = self.request("GET", "/login", "", &[]).await;
        let login = cookie_pair(&form, LOGIN_COOKIE);
        let reply = self
            .request(
                "POST",
                "/login",
                &login,
                &[("csrf", &form.csrf()), ("api_key", key)],
            )
            .await;
        assert_eq!(reply.status, 303, "{}", reply.body);
        assert_eq!(reply.header("location"), Some("/nodes"));
        cookie_pair(&reply, SESSION_COOKIE)
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.stop.abort();
    }
}

fn parse(raw: &str) -> Reply {
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines.next().expect("status line")[9..12]
        .parse()
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `name=value` of the cookie `name` the reply sets.
fn cookie_pair(reply: &Reply, name: &str) -> String {
    reply
        .cookies()
        .into_iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie in {:?}", reply.headers))
        .to_owned()
}

#[tokio::test]
async fn login_takes_a_valid_api_key_and_sets_a_strict_session_cookie() {
    let page = Page::start().await;
    let to_login = page.request("GET", "/nodes", "", &[]).await;
    assert_eq!(to_login.status, 303);
    assert_eq!(to_login.header("location"), Some("/login"));

    let form = page.request("GET", "/login", "", &[]).await;
    assert_eq!(form.status, 200);
    let login_cookie = form
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("warren_login="))
        .expect("login cookie")
        .to_owned();
    assert!(
        login_cookie.contains("HttpOnly; SameSite=Strict"),
        "{login_cookie}"
    );
    let csp = form.header("content-security-policy").expect("csp");
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));

    let key = page.api_key().await;
    let login = cookie_pair(&form, LOGIN_COOKIE);
    let reply = page
        .request(
            "POST",
            "/login",
            &login,
            &[("csrf", &form.csrf()), ("api_key", &key)],
        )
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    let session = reply
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("warren_session="))
        .expect("session cookie")
        .to_owned();
    assert!(
        session.ends_with("; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200"),
        "{session}"
    );
    let cookie = cookie_pair(&reply, SESSION_COOKIE);
    let nodes = page.request("GET", "/nodes", &cookie, &[]).await;
    assert_eq!(nodes.status, 200);
    assert!(nodes.body.contains("<h1>Nodes</h1>"), "{}", nodes.body);

    // Expiring the key ends the session at once, as it ends the CLI's access.
    let prefix = page.shared.core.lock().await.api_keys().expect("keys")[0]
        .prefix
        .clone();
    page.shared
        .core
        .lock()
        .await
        .expire_api_key(&prefix, warren_proto::proof::unix_ms())
        .expect("expire");
    let gone = page.request("GET", "/nodes", &cookie, &[]).await;
    assert_eq!(gone.status, 303);
    assert_eq!(gone.header("location"), Some("/login"));
}

#[tokio::test]
async fn a_wrong_key_is_refused_with_one_message_and_repeats_are_slowed() {
    let page = Page::start().await;
    let key = page.api_key().await;
    let form = page.request("GET", "/login", "", &[]).await;
    let login = cookie_pair(&form, LOGIN_COOKIE);
    let csrf = form.csrf();
    // Malformed, unknown prefix, right prefix with a wrong secret: one answer.
    let wrong_secret = format!("{}x", &key[..key.len() - 1]);
    let mut took = Vec::new();
    for wrong in [
        "nonsense",
        "warren-api-aaaaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        &wrong_secret,
    ] {
        let start = std::time::Instant::now();
        let reply = page
            .request(
                "POST",
                "/login",
                &login,
                &[("csrf", &csrf), ("api_key", wrong)],
            )
            .await;
        took.push(start.elapsed());
        assert_eq!(reply.status, 401);
        assert!(
            reply
                .body
                .contains(r#"<p class="error" id="error">invalid API key</p>"#),
            "{}",
            reply.body
        );
        assert!(
            reply
                .cookies()
                .iter()
                .all(|c| !c.starts_with("warren_session="))
        );
    }
    assert!(took[1] >= session::FIRST_LOGIN_DELAY, "{took:?}");
    assert!(took[2] >= session::FIRST_LOGIN_DELAY * 2, "{took:?}");
    // The right key still gets in (after its wait), and clears the address's record.
    page.login(&key).await;
    let start = std::time::Instant::now();
    page.login(&key).await;
    assert!(
        start.elapsed() < session::FIRST_LOGIN_DELAY,
        "no delay after a success"
    );
}

#[tokio::test]
async fn a_post_without_the_csrf_token_is_refused() {
    let page = Page::start().await;
    let key = page.api_key().await;
    // The login form too.
    let form = page.request("GET", "/login", "", &[]).await;
    let login = cookie_pair(&form, LOGIN_COOKIE);
    let reply = page
        .request("POST", "/login", &login, &[("api_key", &key)])
        .await;
    assert_eq!((reply.status, reply.body.as_str()), (403, INVALID_CSRF));

    let cookie = page.login(&key).await;
    for form in [
        vec![("name", "mallory")],
        vec![("name", "mallory"), ("csrf", "0".repeat(64).as_str())],
    ] {
        let reply = page.request("POST", "/users/create", &cookie, &form).await;
        assert_eq!((reply.status, reply.body.as_str()), (403, INVALID_CSRF));
    }
    assert!(page.shared.core.lock().await.users().is_empty());

    let users = page.request("GET", "/users", &cookie, &[]).await;
    let done = page
        .request(
            "POST",
            "/users/create",
            &cookie,
            &[("csrf", &users.csrf()), ("name", "alice")],
        )
        .await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(page.shared.core.lock().await.users()[0].name, "alice");
    // The core's own rules answer, as the CLI's do.
    let again = page
        .request(
            "POST",
            "/users/create",
            &cookie,
            &[("csrf", &users.csrf()), ("name", "alice")],
        )
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body.contains(r#"id="error""#), "{}", again.body);
}

#[tokio::test]
async fn a_pre_auth_key_is_shown_once_and_events_stream_the_nodes() {
    let page = Page::start().await;
    let key = page.api_key().await;
    let cookie = page.login(&key).await;
    let users = page.request("GET", "/users", &cookie, &[]).await;
    let csrf = users.csrf();
    page.request(
        "POST",
        "/users/create",
        &cookie,
        &[("csrf", &csrf), ("name", "bob")],
    )
    .await;
    let created = page
        .request(
            "POST",
            "/preauthkeys/create",
            &cookie,
            &[
                ("csrf", &csrf),
                ("user", "bob"),
                ("reusable", "1"),
                ("expiration", "2h"),
            ],
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let at = created
        .body
        .find(r#"<code id="new-secret">"#)
        .expect("secret shown")
        + 22;
    let secret = &created.body[at..created.body[at..].find('<').expect("end") + at];
    assert!(secret.starts_with("warren-auth-"), "{secret}");
    let keys = page.shared.core.lock().await.auth_keys(None).expect("keys");
    assert!(keys[0].reusable && !keys[0].ephemeral && keys[0].expiration_ms.is_some());
    let list = page.request("GET", "/preauthkeys", &cookie, &[]).await;
    assert!(!list.body.contains(secret), "the secret is shown only once");
    assert!(list.body.contains(&keys[0].prefix));

    let bad = page
        .request(
            "POST",
            "/preauthkeys/create",
            &cookie,
            &[("csrf", &csrf), ("user", "bob"), ("expiration", "soon")],
        )
        .await;
    assert_eq!(bad.status, 400);

    // The event stream starts with its retry and a nodes event.
    let mut s = tokio::net::TcpStream::connect(page.addr)
        .await
        .expect("connect");
    let request = format!("GET /events HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains("event: nodes\ndata: {") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("an event in time")
            .expect("read");
        assert!(n > 0, "stream closed: {seen}");
        seen += &String::from_utf8_lossy(&buf[..n]);
    }
    assert!(seen.contains("content-type: text/event-stream"), "{seen}");
    assert!(seen.contains("retry: 2000"), "{seen}");
}

#[tokio::test]
async fn the_policy_page_shows_the_policy_and_explains() {
    let page = Page::start().await;
    let key = page.api_key().await;
    let cookie = page.login(&key).await;
    let policy = page.request("GET", "/policy", &cookie, &[]).await;
    assert_eq!(policy.status, 200, "{}", policy.body);
    assert!(
        policy
            .body
            .contains("no policy is configured: every node may reach every other."),
        "{}",
        policy.body
    );
    let asked = page
        .request(
            "GET",
            "/policy?src=nobody&dst=100.64.0.9&port=22",
            &cookie,
            &[],
        )
        .await;
    // The Admin API's own answer, as `policy explain` prints it.
    assert_eq!(asked.status, 404);
    assert!(
        asked.body.contains(
            r#"id="error">source &quot;nobody&quot; matches no node name, mesh address, user, group or tag</p>"#
        ),
        "{}",
        asked.body
    );
    assert!(
        asked.body.contains(r#"value="nobody""#),
        "the question is kept"
    );
    let bad_port = page
        .request("GET", "/policy?src=a&dst=b&port=http", &cookie, &[])
        .await;
    assert_eq!(bad_port.status, 400);
    assert!(
        bad_port
            .body
            .contains(r#"id="error">port: not a number</p>"#),
        "{}",
        bad_port.body
    );
}

#[tokio::test]
async fn in_database_mode_the_policy_is_checked_and_saved_on_the_page() {
    let page = Page::start_with(|c| c.policy.mode = crate::config::PolicyMode::Database).await;
    let key = page.api_key().await;
    let cookie = page.login(&key).await;
    let form = page.request("GET", "/policy", &cookie, &[]).await;
    assert!(
        form.body.contains(r#"<textarea name="policy""#),
        "{}",
        form.body
    );
    let csrf = form.csrf();
    let edit = |action: &'static str, text: &'static str| {
        let (page, cookie, csrf) = (&page, &cookie, &csrf);
        async move {
            page.request(
                "POST",
                "/policy/set",
                cookie,
                &[("csrf", csrf), ("action", action), ("policy", text)],
            )
            .await
        }
    };
    let broken = edit("check", "{ \"acls\": [ }").await;
    assert_eq!(broken.status, 400, "{}", broken.body);
    assert!(broken.body.contains(r#"id="error">"#), "{}", broken.body);
    assert!(
        broken.body.contains("{ &quot;acls&quot;: [ }"),
        "the draft stays"
    );

    const GOOD: &str = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
    let checked = edit("check", GOOD).await;
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert!(checked.body.contains(
        r#"id="notice">The policy compiles and its tests pass against the current nodes.</p>"#
    ));
    assert!(
        page.shared.policy.text().is_none(),
        "a check stores nothing"
    );

    let saved = edit("set", GOOD).await;
    assert_eq!(saved.status, 200, "{}", saved.body);
    assert!(
        saved
            .body
            .contains(r#"id="notice">Saved and applied: 0 map updates sent.</p>"#),
        "{}",
        saved.body
    );
    assert_eq!(page.shared.policy.text().as_deref(), Some(GOOD));

    let forged = page
        .request(
            "POST",
            "/policy/set",
            &cookie,
            &[("action", "set"), ("policy", "{}")],
        )
        .await;
    assert_eq!((forged.status, forged.body.as_str()), (403, INVALID_CSRF));
    assert_eq!(page.shared.policy.text().as_deref(), Some(GOOD));
}

#[tokio::test]
async fn in_file_mode_the_policy_page_refuses_to_save() {
    let page = Page::start().await;
    let key = page.api_key().await;
    let cookie = page.login(&key).await;
    let form = page.request("GET", "/policy", &cookie, &[]).await;
    assert!(!form.body.contains("<textarea"), "{}", form.body);
    let refused = page
        .request(
            "POST",
            "/policy/set",
            &cookie,
            &[("csrf", &form.csrf()), ("action", "set"), ("policy", "{}")],
        )
        .await;
    // The Admin API's own refusal, as `policy set` prints it.
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        refused.body.contains(
            "id=\"error\">policy.mode is &quot;file&quot;: the policy is not configured \
             (policy.path is empty); edit that file"
        ),
        "{}",
        refused.body
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let page = Page::start().await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(
            tokio::net::TcpStream::connect(page.addr)
                .await
                .expect("connect"),
        );
    }
    // Served in accept order: this one finds every slot taken and is closed unanswered.
    let mut extra = tokio::net::TcpStream::connect(page.addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(20), extra.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    // The held ones are served: a request on one of them is answered.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), first.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .expect("read");
    assert!(reply.starts_with(b"HTTP/1.1 200 OK"), "{reply:?}");
    // Slots come back as connections close (a refused attempt reads nothing).
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = tokio::net::TcpStream::connect(page.addr)
            .await
            .expect("connect");
        let mut reply = Vec::new();
        if s.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .is_ok()
        {
            let _ = s.read_to_end(&mut reply).await;
        }
        if reply.starts_with(b"HTTP/1.1 200 OK") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn node_actions_answer_with_the_admin_api_errors() {
    let page = Page::start().await;
    let key = page.api_key().await;
    let cookie = page.login(&key).await;
    let nodes = page.request("GET", "/nodes", &cookie, &[]).await;
    let csrf = nodes.csrf();
    let bad_id = page
        .request(
            "POST",
            "/nodes/rename",
            &cookie,
            &[("csrf", &csrf), ("id", "x"), ("new_name", "a")],
        )
        .await;
    assert_eq!(bad_id.status, 400);
    assert!(
        bad_id.body.contains(r#"id="error">invalid node id</p>"#),
        "{}",
        bad_id.body
    );
    for action in ["/nodes/rename", "/nodes/delete", "/nodes/expire"] {
        let missing = page
            .request(
                "POST",
                action,
                &cookie,
                &[("csrf", &csrf), ("id", "99"), ("new_name", "a")],
            )
            .await;
        assert_eq!(missing.status, 404, "{action}: {}", missing.body);
        assert!(
            missing.body.contains(r#"id="error">node 99 not found</p>"#),
            "{}",
            missing.body
        );
    }
}
