//! The web admin page: what operators do with `warren-control nodes/preauthkeys/users/apikeys`,
//! as server-rendered HTML on its own listener (`web.listen_addr`, loopback by default).
//!
//! Why it is shaped this way:
//! - Every action calls the same [`AdminService`] methods the gRPC API serves to the CLI, so the
//!   rules (name checks, tag owners, what a delete tells the peers, the core's lock) are the
//!   same code; the page adds only its own authentication in front.
//! - Login takes an API key, checked by [`Shared::check_api_key`] exactly as each Admin call
//!   over TCP checks it, and again on every request of the session (expiring the key ends the
//!   session). A wrong, malformed or expired key gets the one answer [`INVALID_API_KEY`]; every
//!   attempt from an address counts against it until it succeeds, and each failure doubles that
//!   address's wait before its next key is checked ([`session::Throttle`]).
//! - The session is a random id in a cookie (`HttpOnly`, `SameSite=Strict`, `Path=/`,
//!   `Max-Age`) naming a row of a capped server-side table; every form carries the session's
//!   CSRF token and a POST without it gets 403 [`INVALID_CSRF`]. The login form has its own
//!   token, in a short-lived cookie of its own (double submit).
//! - Responses forbid framing and any script but the page's own (a per-response nonce).
//! - Every connection counts against [`MAX_CONNECTIONS`] (more are closed on accept), must send
//!   its request headers within [`HEADER_TIMEOUT`] and is closed after [`CONNECTION_DEADLINE`]
//!   whatever it does; an event stream ends after [`EVENT_STREAM_LIFETIME`] and the browser
//!   opens a new one.
//! - Online state is live: `/events` (server-sent events) looks at the nodes every
//!   [`EVENT_INTERVAL`] and sends the nodes table when something changed.

pub mod pages;
pub mod session;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use maud::Markup;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use warren_proto::control::admin_server::Admin;
use warren_proto::control::{
    AdminListNodesRequest, CheckPolicyRequest, CreateApiKeyRequest, CreatePreAuthKeyRequest,
    CreateUserRequest, DeleteNodeRequest, DeleteUserRequest, ExpireApiKeyRequest,
    ExpireNodeRequest, ExpirePreAuthKeyRequest, ExplainPolicyRequest, GetPolicyRequest,
    ListApiKeysRequest, ListPreAuthKeysRequest, ListUsersRequest, Node, RenameNodeRequest,
    SetPolicyRequest, TagNodeRequest,
};

use crate::config::WebConfig;
use crate::error::ControlError;
use crate::grpc::{AdminService, Shared};
use session::{Session, Sessions, Throttle, same_secret};

/// Connections served at once; one past this is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any connection may live, from accept, whatever it does.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// How long one `/events` stream lasts; the browser then opens a new one (`retry`).
pub const EVENT_STREAM_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// How often `/events` looks at the nodes.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// An event stream checks its session's API key again every this many ticks.
const KEY_RECHECK_TICKS: u32 = 30;
/// The largest form body accepted.
pub const MAX_FORM_BYTES: usize = 64 * 1024;
/// The answer to a wrong, malformed or expired API key at login (nothing says which).
pub const INVALID_API_KEY: &str = "invalid API key";
/// The body of the 403 a POST without its session's CSRF token gets.
pub const INVALID_CSRF: &str = "invalid CSRF token";
/// The session cookie.
pub const SESSION_COOKIE: &str = "warren_session";
/// The login form's own CSRF cookie (there is no session yet).
pub const LOGIN_COOKIE: &str = "warren_login";

/// A response body: a whole page, or an event stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Binds the web listener when `web.enabled`. An address set in the config that cannot be
/// bound refuses the start; the default (127.0.0.1:8081) is skipped with a warning when taken,
/// so a second server on one host (or a test) still starts.
pub async fn bind(config: &WebConfig) -> anyhow::Result<Option<TcpListener>> {
    if !config.enabled {
        return Ok(None);
    }
    let addr = config.listen_addr();
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if config.listen_addr.is_none() => {
            tracing::warn!(%addr, error = %e,
                "web admin page is off: cannot listen on its default address (set web.listen_addr)");
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("web.listen_addr {addr}"))),
    }
}

/// The web admin page's state: the shared server state, its Admin service (without an API
/// key: the page authenticates first), sessions and login throttle.
#[derive(Debug)]
pub struct Web {
    shared: Arc<Shared>,
    admin: AdminService,
    sessions: std::sync::Mutex<Sessions>,
    throttle: std::sync::Mutex<Throttle>,
}

fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the page on `listener` until the server stops (`shared.stopping`).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "web admin page serving");
    }
    let web = Arc::new(Web {
        admin: AdminService::new(Arc::clone(&shared), false),
        shared,
        sessions: Default::default(),
        throttle: Default::default(),
    });
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stopping = web.shared.stopping.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stopping) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: give the others a moment to close.
                    tracing::warn!(error = %e, "web admin page: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::debug!(%peer, "web admin page: connection refused, at its cap");
            continue;
        };
        let web = Arc::clone(&web);
        let mut stopping = web.shared.stopping.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(|req| {
                let web = Arc::clone(&web);
                async move { Ok::<_, Infallible>(web.handle(req, peer).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                done = tokio::time::timeout(CONNECTION_DEADLINE, conn) => match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "web connection failed"),
                    Err(_) => tracing::debug!(%peer, "web connection reached its deadline"),
                },
                _ = stopped(&mut stopping) => {}
            }
        });
    }
}

/// Completes when the server stops.
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// 32 random bytes as hex, or `None` when the system has no randomness to give.
fn token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).ok()?;
    Some(hex::encode(b))
}

/// The value of cookie `name` in the request, if sent.
fn cookie(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A parsed form body (the last value of a repeated field wins).
type Form = HashMap<String, String>;

/// Reads a form body of at most `limit` bytes.
async fn read_form(req: Request<Incoming>, limit: usize) -> Result<Form, Box<Response<Body>>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => Ok(form_urlencoded::parse(&body.to_bytes())
            .into_owned()
            .collect()),
        Err(_) => Err(Box::new(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "form too large or cut short",
        ))),
    }
}

fn field<'a>(form: &'a Form, name: &str) -> &'a str {
    form.get(name).map(String::as_str).unwrap_or_default()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    UnsyncBoxBody::new(Full::new(bytes.into()))
}

/// Headers every response carries: no caching (secrets are shown once), no framing, no
/// sniffing, no referrer.
fn harden(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// A plain-text response.
fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(full(body.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    harden(&mut resp);
    resp
}

/// A 303 to `to` (after a POST, so a reload does not repeat it).
fn redirect(to: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::SEE_OTHER, "");
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    resp
}

fn no_randomness() -> Response<Body> {
    text(StatusCode::INTERNAL_SERVER_ERROR, "no randomness available")
}

/// A whole page, with its own script nonce in the content security policy.
fn page(
    status: StatusCode,
    title: &str,
    path: &str,
    csrf: Option<&str>,
    error: Option<&str>,
    body: Markup,
) -> Response<Body> {
    let Some(nonce) = token() else {
        return no_randomness();
    };
    let html = pages::page(title, path, csrf, error, &nonce, body).into_string();
    let mut resp = Response::new(full(html));
    *resp.status_mut() = status;
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    harden(&mut resp);
    resp
}

/// The HTTP status for an Admin API error.
fn http_status(status: &tonic::Status) -> StatusCode {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An action's failure: the message the CLI would print, and its HTTP status.
struct Failure {
    status: StatusCode,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure {
            status: http_status(&s),
            message: s.message().to_owned(),
        }
    }
}

impl Failure {
    fn bad(message: impl Into<String>) -> Self {
        Failure {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

fn req<T>(message: T) -> tonic::Request<T> {
    tonic::Request::new(message)
}

fn node_id(form: &Form) -> Result<u64, Failure> {
    field(form, "id")
        .parse()
        .map_err(|_| Failure::bad("invalid node id"))
}

/// `"1h"`, `"90d"`: seconds; empty or `0` means no expiry.
fn expiration_secs(form: &Form) -> Result<u64, Failure> {
    let text = field(form, "expiration").trim();
    if text.is_empty() || text == "0" {
        return Ok(0);
    }
    crate::config::parse_duration(text)
        .map(|d| d.as_secs().max(1))
        .map_err(|e| Failure::bad(format!("expiration: {e}")))
}

fn tags(form: &Form) -> Vec<String> {
    field(form, "tags")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The pages a session can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Nodes,
    PreAuthKeys,
    Users,
    ApiKeys,
}

impl View {
    fn path(self) -> &'static str {
        match self {
            View::Nodes => "/nodes",
            View::PreAuthKeys => "/preauthkeys",
            View::Users => "/users",
            View::ApiKeys => "/apikeys",
        }
    }

    fn title(self) -> &'static str {
        match self {
            View::Nodes => "Nodes",
            View::PreAuthKeys => "Pre-auth keys",
            View::Users => "Users",
            View::ApiKeys => "API keys",
        }
    }
}

impl Web {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        match (&method, path.as_str()) {
            (&Method::GET, "/login") => return self.login_page(&req),
            (&Method::POST, "/login") => return self.login(req, peer.ip()).await,
            _ => {}
        }
        let Some((sid, session)) = self.session(&req).await else {
            return redirect("/login");
        };
        if method == Method::GET || method == Method::HEAD {
            return match path.as_str() {
                "/" => redirect("/nodes"),
                "/nodes" => self.view(View::Nodes, &session, None, None).await,
                "/preauthkeys" => self.view(View::PreAuthKeys, &session, None, None).await,
                "/users" => self.view(View::Users, &session, None, None).await,
                "/apikeys" => self.view(View::ApiKeys, &session, None, None).await,
                "/policy" => self.policy(&session, req.uri().query()).await,
                "/mesh" => self.mesh(&session).await,
                "/events" => self.events(sid),
                _ => text(StatusCode::NOT_FOUND, "not found"),
            };
        }
        if method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        // A policy may be large (URL-encoding can triple it); every other form is small.
        let limit = match path.as_str() {
            "/policy/set" => 3 * crate::grpc::MAX_POLICY_BYTES + 4096,
            _ => MAX_FORM_BYTES,
        };
        let form = match read_form(req, limit).await {
            Ok(f) => f,
            Err(resp) => return *resp,
        };
        if !same_secret(field(&form, "csrf"), &session.csrf) {
            tracing::warn!(%peer, %path, "web admin page: POST without its CSRF token");
            return text(StatusCode::FORBIDDEN, INVALID_CSRF);
        }
        if path == "/logout" {
            locked(&self.sessions).remove(&sid);
            let mut resp = redirect("/login");
            resp.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static(
                    "warren_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
                ),
            );
            return resp;
        }
        if path == "/policy/set" {
            return self.policy_edit(&session, &form).await;
        }
        let (view, result) = match path.as_str() {
            "/nodes/rename" => (View::Nodes, self.rename(&form).await),
            "/nodes/delete" => (View::Nodes, self.delete(&form).await),
            "/nodes/expire" => (View::Nodes, self.expire(&form).await),
            "/nodes/tag" => (View::Nodes, self.tag(&form).await),
            "/preauthkeys/create" => (View::PreAuthKeys, self.create_preauthkey(&form).await),
            "/preauthkeys/expire" => (View::PreAuthKeys, self.expire_preauthkey(&form).await),
            "/users/create" => (View::Users, self.create_user(&form).await),
            "/users/delete" => (View::Users, self.delete_user(&form).await),
            "/apikeys/create" => (View::ApiKeys, self.create_apikey(&form).await),
            "/apikeys/expire" => (View::ApiKeys, self.expire_apikey(&form).await),
            _ => return text(StatusCode::NOT_FOUND, "not found"),
        };
        match result {
            Ok(None) => redirect(view.path()),
            Ok(Some(secret)) => self.view(view, &session, None, Some(&secret)).await,
            Err(f) => {
                let mut resp = self.view(view, &session, Some(&f.message), None).await;
                *resp.status_mut() = f.status;
                resp
            }
        }
    }

    /// The live session the request's cookie names, its API key still valid.
    async fn session(&self, req: &Request<Incoming>) -> Option<(String, Session)> {
        let sid = cookie(req, SESSION_COOKIE)?;
        let session = locked(&self.sessions).get(&sid, Instant::now())?;
        if self.shared.check_api_key(&session.api_key).await.is_err() {
            locked(&self.sessions).remove(&sid);
            return None;
        }
        Some((sid, session))
    }

    fn login_page(&self, req: &Request<Incoming>) -> Response<Body> {
        let Some(login) = cookie(req, LOGIN_COOKIE)
            .filter(|t| t.len() == 64)
            .or_else(token)
        else {
            return no_randomness();
        };
        self.login_form(StatusCode::OK, &login, None)
    }

    fn login_form(&self, status: StatusCode, login: &str, error: Option<&str>) -> Response<Body> {
        let mut resp = page(status, "Log in", "/login", None, error, pages::login(login));
        let cookie =
            format!("{LOGIN_COOKIE}={login}; HttpOnly; SameSite=Strict; Path=/login; Max-Age=3600");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        resp
    }

    async fn login(&self, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
        let login = cookie(&req, LOGIN_COOKIE);
        let form = match read_form(req, MAX_FORM_BYTES).await {
            Ok(f) => f,
            Err(resp) => return *resp,
        };
        let Some(login) = login.filter(|c| same_secret(c, field(&form, "csrf"))) else {
            tracing::warn!(%peer, "web login without its CSRF token");
            return text(StatusCode::FORBIDDEN, INVALID_CSRF);
        };
        // Every attempt counts as a failure until its key checks out, so parallel guesses
        // queue behind each other's delays too.
        let delay = {
            let mut throttle = locked(&self.throttle);
            let now = Instant::now();
            let delay = throttle.delay(peer, now);
            throttle.failed(peer, now);
            delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let key = field(&form, "api_key").trim();
        match self.shared.check_api_key(key).await {
            Ok(()) => {}
            Err(
                ControlError::ApiKeyInvalid
                | ControlError::ApiKeyExpired
                | ControlError::ApiKeyMissing,
            ) => {
                tracing::info!(%peer, "web login refused: invalid API key");
                return self.login_form(StatusCode::UNAUTHORIZED, &login, Some(INVALID_API_KEY));
            }
            Err(e) => {
                tracing::error!(%peer, error = %e, "web login: cannot check the API key");
                return self.login_form(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &login,
                    Some("the key cannot be checked now; see the server's log"),
                );
            }
        }
        locked(&self.throttle).succeeded(peer);
        let (Some(sid), Some(csrf)) = (token(), token()) else {
            return no_randomness();
        };
        locked(&self.sessions).insert(sid.clone(), key.to_owned(), csrf, Instant::now());
        tracing::info!(%peer, "web login");
        let mut resp = redirect("/nodes");
        let max_age = session::SESSION_LIFETIME.as_secs();
        let cookies = [
            format!("{SESSION_COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}"),
            format!("{LOGIN_COOKIE}=; HttpOnly; SameSite=Strict; Path=/login; Max-Age=0"),
        ];
        for c in cookies {
            if let Ok(v) = HeaderValue::from_str(&c) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        resp
    }

    /// Renders one page for a session, with an error or a secret shown once.
    async fn view(
        &self,
        view: View,
        session: &Session,
        error: Option<&str>,
        secret: Option<&str>,
    ) -> Response<Body> {
        let csrf = session.csrf.as_str();
        let body = match self.render(view, csrf, secret).await {
            Ok(body) => body,
            Err(f) => {
                return page(
                    f.status,
                    view.title(),
                    view.path(),
                    Some(csrf),
                    Some(&f.message),
                    maud::html! {},
                );
            }
        };
        let status = match error {
            Some(_) => StatusCode::BAD_REQUEST,
            None => StatusCode::OK,
        };
        page(status, view.title(), view.path(), Some(csrf), error, body)
    }

    async fn render(
        &self,
        view: View,
        csrf: &str,
        secret: Option<&str>,
    ) -> Result<Markup, Failure> {
        Ok(match view {
            View::Nodes => pages::nodes(&self.nodes().await?, csrf),
            View::PreAuthKeys => {
                let keys = self
                    .admin
                    .list_pre_auth_keys(req(ListPreAuthKeysRequest::default()))
                    .await?
                    .into_inner()
                    .keys;
                let users = self
                    .admin
                    .list_users(req(ListUsersRequest {}))
                    .await?
                    .into_inner()
                    .users;
                let secret = secret.map(|s| pages::NewSecret {
                    what: "pre-auth key",
                    secret: s,
                });
                pages::preauthkeys(&keys, &users, csrf, secret)
            }
            View::Users => {
                let users = self
                    .admin
                    .list_users(req(ListUsersRequest {}))
                    .await?
                    .into_inner()
                    .users;
                pages::users(&users, csrf)
            }
            View::ApiKeys => {
                let keys = self
                    .admin
                    .list_api_keys(req(ListApiKeysRequest {}))
                    .await?
                    .into_inner()
                    .keys;
                let secret = secret.map(|s| pages::NewSecret {
                    what: "API key",
                    secret: s,
                });
                pages::apikeys(&keys, csrf, secret)
            }
        })
    }

    /// The policy page; with `src` and `dst` in the query, the answer to "can SRC reach DST".
    async fn policy(&self, session: &Session, query: Option<&str>) -> Response<Body> {
        let query: Form = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
        let question = pages::Question {
            src: field(&query, "src").trim(),
            dst: field(&query, "dst").trim(),
            port: field(&query, "port").trim(),
            proto: field(&query, "proto").trim(),
        };
        let asked = !question.src.is_empty() || !question.dst.is_empty();
        let answer = match asked {
            false => Ok(None),
            true => self.explain(&question).await.map(Some),
        };
        let edit = pages::PolicyEdit {
            csrf: &session.csrf,
            ..Default::default()
        };
        match answer {
            Ok(answer) => {
                self.policy_page(&question, answer.as_ref(), &edit, None, StatusCode::OK)
                    .await
            }
            Err(f) => {
                self.policy_page(&question, None, &edit, Some(&f.message), f.status)
                    .await
            }
        }
    }

    /// POST `/policy/set` (database mode): `action=check` runs `policy check` on the text,
    /// `action=set` runs `policy set`; the text typed stays in the form unless it was saved.
    async fn policy_edit(&self, session: &Session, form: &Form) -> Response<Body> {
        let policy_text = field(form, "policy").to_owned();
        let question = pages::Question::default();
        let mut edit = pages::PolicyEdit {
            csrf: &session.csrf,
            draft: Some(&policy_text),
            notice: None,
        };
        let notice = match field(form, "action") {
            "check" => self
                .admin
                .check_policy(req(CheckPolicyRequest {
                    policy: policy_text.clone(),
                }))
                .await
                .map(|_| {
                    "The policy compiles and its tests pass against the current nodes.".to_owned()
                }),
            "set" => self
                .admin
                .set_policy(req(SetPolicyRequest {
                    policy: policy_text.clone(),
                }))
                .await
                .map(|r| {
                    let updates = r.get_ref().updates_sent;
                    tracing::info!(updates, "web: policy set");
                    edit.draft = None;
                    format!("Saved and applied: {updates} map updates sent.")
                }),
            _ => return text(StatusCode::BAD_REQUEST, "unknown action"),
        };
        match notice {
            Ok(notice) => {
                edit.notice = Some(&notice);
                self.policy_page(&question, None, &edit, None, StatusCode::OK)
                    .await
            }
            Err(s) => {
                let f = Failure::from(s);
                self.policy_page(&question, None, &edit, Some(&f.message), f.status)
                    .await
            }
        }
    }

    async fn policy_page(
        &self,
        question: &pages::Question<'_>,
        answer: Option<&warren_proto::control::ExplainPolicyResponse>,
        edit: &pages::PolicyEdit<'_>,
        error: Option<&str>,
        status: StatusCode,
    ) -> Response<Body> {
        let (title, path) = ("Policy", "/policy");
        let csrf = Some(edit.csrf);
        match self.admin.get_policy(req(GetPolicyRequest {})).await {
            Ok(r) => {
                let body = pages::policy(&r.into_inner(), question, answer, edit);
                page(status, title, path, csrf, error, body)
            }
            Err(s) => {
                let f = Failure::from(s);
                page(
                    f.status,
                    title,
                    path,
                    csrf,
                    Some(&f.message),
                    maud::html! {},
                )
            }
        }
    }

    async fn explain(
        &self,
        q: &pages::Question<'_>,
    ) -> Result<warren_proto::control::ExplainPolicyResponse, Failure> {
        let port = match q.port {
            "" | "*" => None,
            p => Some(p.parse().map_err(|_| Failure::bad("port: not a number"))?),
        };
        let request = ExplainPolicyRequest {
            src: q.src.to_owned(),
            dst: q.dst.to_owned(),
            port,
            proto: q.proto.to_owned(),
            exit_node: String::new(),
        };
        Ok(self.admin.explain_policy(req(request)).await?.into_inner())
    }

    /// The mesh picture: who may reach whom (each node's netmap, under the core's lock as the
    /// map streams read it) and who is online.
    async fn mesh(&self, session: &Session) -> Response<Body> {
        let csrf = session.csrf.as_str();
        let (title, path) = ("Mesh", "/mesh");
        let nodes = match self.nodes().await {
            Ok(nodes) => nodes,
            Err(f) => {
                return page(
                    f.status,
                    title,
                    path,
                    Some(csrf),
                    Some(&f.message),
                    maud::html! {},
                );
            }
        };
        let mut links = pages::Links::new();
        if nodes.len() <= pages::MAX_PICTURE_NODES {
            let index: HashMap<u64, usize> =
                nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
            let mut sees = std::collections::BTreeSet::new();
            {
                let core = self.shared.core.lock().await;
                for (i, n) in nodes.iter().enumerate() {
                    for peer in core.peers(n.id) {
                        if let Some(&j) = index.get(&peer.id) {
                            sees.insert((i, j));
                        }
                    }
                }
            }
            for &(i, j) in &sees {
                let back = sees.contains(&(j, i));
                if i < j || !back {
                    links.push((i.min(j), i.max(j), back));
                }
            }
        }
        page(
            StatusCode::OK,
            title,
            path,
            Some(csrf),
            None,
            pages::mesh(&nodes, &links),
        )
    }

    /// Every node, by id.
    async fn nodes(&self) -> Result<Vec<Node>, Failure> {
        let mut nodes = self
            .admin
            .list_nodes(req(AdminListNodesRequest::default()))
            .await?
            .into_inner()
            .nodes;
        nodes.sort_by_key(|n| n.id);
        Ok(nodes)
    }

    async fn rename(&self, form: &Form) -> Result<Option<String>, Failure> {
        let id = node_id(form)?;
        let new_name = field(form, "new_name").trim().to_owned();
        let node = self
            .admin
            .rename_node(req(RenameNodeRequest { id, new_name }))
            .await?;
        tracing::info!(node = id, name = ?node.get_ref().node.as_ref().map(|n| &n.given_name),
            "web: node renamed");
        Ok(None)
    }

    async fn delete(&self, form: &Form) -> Result<Option<String>, Failure> {
        let id = node_id(form)?;
        self.admin
            .delete_node(req(DeleteNodeRequest { id }))
            .await?;
        tracing::info!(node = id, "web: node deleted");
        Ok(None)
    }

    async fn expire(&self, form: &Form) -> Result<Option<String>, Failure> {
        let id = node_id(form)?;
        self.admin
            .expire_node(req(ExpireNodeRequest { id }))
            .await?;
        tracing::info!(node = id, "web: node expired");
        Ok(None)
    }

    async fn tag(&self, form: &Form) -> Result<Option<String>, Failure> {
        let id = node_id(form)?;
        self.admin
            .tag_node(req(TagNodeRequest {
                id,
                tags: tags(form),
            }))
            .await?;
        Ok(None)
    }

    async fn create_preauthkey(&self, form: &Form) -> Result<Option<String>, Failure> {
        let request = CreatePreAuthKeyRequest {
            user: field(form, "user").to_owned(),
            reusable: !field(form, "reusable").is_empty(),
            ephemeral: !field(form, "ephemeral").is_empty(),
            expiration_secs: expiration_secs(form)?,
            tags: tags(form),
        };
        let created = self
            .admin
            .create_pre_auth_key(req(request))
            .await?
            .into_inner();
        tracing::info!(prefix = ?created.key.as_ref().map(|k| &k.prefix), "web: pre-auth key created");
        Ok(Some(created.secret))
    }

    async fn expire_preauthkey(&self, form: &Form) -> Result<Option<String>, Failure> {
        let prefix = field(form, "prefix").to_owned();
        self.admin
            .expire_pre_auth_key(req(ExpirePreAuthKeyRequest { prefix }))
            .await?;
        Ok(None)
    }

    async fn create_user(&self, form: &Form) -> Result<Option<String>, Failure> {
        let name = field(form, "name").trim().to_owned();
        self.admin
            .create_user(req(CreateUserRequest { name }))
            .await?;
        Ok(None)
    }

    async fn delete_user(&self, form: &Form) -> Result<Option<String>, Failure> {
        let name = field(form, "name").to_owned();
        self.admin
            .delete_user(req(DeleteUserRequest { name }))
            .await?;
        Ok(None)
    }

    async fn create_apikey(&self, form: &Form) -> Result<Option<String>, Failure> {
        let expiration_secs = expiration_secs(form)?;
        let created = self
            .admin
            .create_api_key(req(CreateApiKeyRequest { expiration_secs }))
            .await?;
        Ok(Some(created.into_inner().secret))
    }

    async fn expire_apikey(&self, form: &Form) -> Result<Option<String>, Failure> {
        let prefix = field(form, "prefix").to_owned();
        self.admin
            .expire_api_key(req(ExpireApiKeyRequest { prefix }))
            .await?;
        Ok(None)
    }

    /// `/events`: a `nodes` event whenever the nodes table would look different, a comment now
    /// and then to keep the connection alive; ends with the session, the server or
    /// [`EVENT_STREAM_LIFETIME`].
    fn events(self: Arc<Self>, sid: String) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let mut stopping = self.shared.stopping.subscribe();
        tokio::spawn(async move {
            let frame = |s: String| Ok(Frame::data(Bytes::from(s)));
            if tx.send(frame("retry: 2000\n\n".into())).await.is_err() {
                return;
            }
            let end = tokio::time::Instant::now() + EVENT_STREAM_LIFETIME;
            let mut tick = tokio::time::interval(EVENT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = String::new();
            let mut quiet = 0u32;
            let mut checks = 0u32;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                    _ = stopped(&mut stopping) => return,
                    _ = tokio::time::sleep_until(end) => return,
                }
                let Some(session) = locked(&self.sessions).get(&sid, Instant::now()) else {
                    return;
                };
                // The key is checked again now and then, as each page load checks it.
                checks += 1;
                if checks.is_multiple_of(KEY_RECHECK_TICKS)
                    && self.shared.check_api_key(&session.api_key).await.is_err()
                {
                    locked(&self.sessions).remove(&sid);
                    return;
                }
                let Ok(nodes) = self.nodes().await else {
                    continue;
                };
                let data = nodes_event(&nodes, &session.csrf);
                let message = if data != last {
                    quiet = 0;
                    let message = format!("event: nodes\ndata: {data}\n\n");
                    last = data;
                    message
                } else {
                    quiet += 1;
                    if quiet < 15 {
                        continue;
                    }
                    quiet = 0;
                    ": keepalive\n\n".to_owned()
                };
                if tx.send(frame(message)).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(UnsyncBoxBody::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        harden(&mut resp);
        resp
    }
}

/// The data of a `nodes` event (one JSON line): the ids in the table, each node's online and
/// last-seen cells, and the table's rows as HTML for when the set of nodes changed.
fn nodes_event(nodes: &[Node], csrf: &str) -> String {
    let cells: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .map(|n| {
            (
                n.id.to_string(),
                serde_json::json!({ "online": n.online, "seen": pages::seen(n) }),
            )
        })
        .collect();
    serde_json::json!({
        "ids": pages::node_ids(nodes),
        "nodes": cells,
        "rows": pages::node_rows(nodes, csrf).into_string(),
    })
    .to_string()
}

#[cfg(test)]
mod tests;
