//! The HTML of the web admin page, written with `maud` (escaped by construction, checked at
//! compile time, nothing to ship beside the binary). Every form carries the session's CSRF
//! token in a hidden `csrf` field; the only script is the few lines that apply `/events` to
//! the nodes table.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use warren_proto::control::{
    ApiKey, ExplainPolicyResponse, GetPolicyResponse, Node, PreAuthKey, User,
};

/// The pages of the top navigation, in order: path and title.
const NAV: &[(&str, &str)] = &[
    ("/nodes", "Nodes"),
    ("/preauthkeys", "Pre-auth keys"),
    ("/users", "Users"),
    ("/apikeys", "API keys"),
    ("/policy", "Policy"),
    ("/mesh", "Mesh"),
];

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1f3a4d;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
header a{color:#cfe3f1;text-decoration:none}header a.here{color:#fff;font-weight:bold}
header form{margin-left:auto}main{padding:1em 1.2em}
table{border-collapse:collapse;background:#fff;font-size:.9em}
th,td{border:1px solid #d5dae0;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#e9edf1}.on{color:#106b21;font-weight:bold}.off{color:#8a8f95}
.error{background:#fde2e1;border:1px solid #e0a1a0;padding:.5em;margin:.5em 0}
.secret{background:#e3f4e6;border:1px solid #9fcea8;padding:.6em;margin:.5em 0}
code{font-size:.95em}form.inline{display:inline}fieldset{background:#fff;border:1px solid #d5dae0;margin:.8em 0}
input[type=text],input[type=password]{padding:.2em}.login{max-width:28em;margin:4em auto}
svg#mesh,#policy-text{background:#fff;border:1px solid #d5dae0}#policy-text{padding:.6em;overflow:auto;font-family:monospace}
";

/// Applies the `nodes` events of `/events` to the nodes table: the whole body when the set of
/// nodes changed, only the online and last-seen cells otherwise.
const LIVE_SCRIPT: &str = "
const es=new EventSource('/events');
es.addEventListener('nodes',e=>{const d=JSON.parse(e.data);const tb=document.getElementById('nodes');
if(!tb)return;if(tb.dataset.ids!==d.ids){tb.innerHTML=d.rows;tb.dataset.ids=d.ids;
document.getElementById('node-count').textContent=d.ids?d.ids.split(',').length:0;return;}
for(const [id,n] of Object.entries(d.nodes)){const c=document.querySelector('[data-online=\"'+id+'\"]');
if(c){c.textContent=n.online?'online':'offline';c.className=n.online?'on':'off';}
const s=document.querySelector('[data-seen=\"'+id+'\"]');if(s)s.textContent=n.seen;}});
";

/// A whole page: navigation (when logged in, i.e. `csrf` is set), an optional error, `body`.
pub fn page(
    title: &str,
    path: &str,
    csrf: Option<&str>,
    error: Option<&str>,
    nonce: &str,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · warren" }
                style nonce=(nonce) { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "warren" }
                    @if let Some(csrf) = csrf {
                        @for (href, name) in NAV {
                            a href=(href) class=[(*href == path).then_some("here")] { (name) }
                        }
                        form method="post" action="/logout" {
                            (csrf_field(csrf))
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(error) = error {
                        p.error id="error" { (error) }
                    }
                    (body)
                }
                @if path == "/nodes" && csrf.is_some() {
                    script nonce=(nonce) { (PreEscaped(LIVE_SCRIPT)) }
                }
            }
        }
    }
}

fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// The login form. Its `csrf` is the pre-session token of the `warren_login` cookie.
pub fn login(csrf: &str) -> Markup {
    html! {
        form.login method="post" action="/login" {
            (csrf_field(csrf))
            p { "Log in with an API key (" code { "warren-control apikeys create" } ")." }
            p {
                label { "API key " input type="password" name="api_key" id="api_key"
                    autocomplete="off" size="60" autofocus; }
            }
            button type="submit" id="login" { "Log in" }
        }
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC`; 0 as `never`.
pub fn time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A node's last-seen cell: `now` while online.
pub fn seen(n: &Node) -> String {
    match n.online {
        true => "now".into(),
        false => time(n.last_seen_unix_ms),
    }
}

fn list(items: &[String]) -> Markup {
    html! {
        @for (i, item) in items.iter().enumerate() {
            @if i > 0 { br; }
            code { (item) }
        }
    }
}

/// The body rows of the nodes table (also sent whole by `/events` when the set of nodes
/// changes).
pub fn node_rows(nodes: &[Node], csrf: &str) -> Markup {
    html! {
        @for n in nodes {
            tr id={ "node-" (n.id) } {
                td { (n.id) }
                td.name { (n.given_name) @if n.hostname != n.given_name { br; small { "host " (n.hostname) } } }
                td { (n.user) }
                td { (n.tags.join(", ")) }
                td { (list(&n.addresses)) }
                td data-online=(n.id) class=(if n.online { "on" } else { "off" }) {
                    (if n.online { "online" } else { "offline" })
                }
                td data-seen=(n.id) { (seen(n)) }
                td { (list(&n.endpoints)) }
                td { @if n.home_region > 0 { (n.home_region) } @else { "-" } }
                td { (list(&n.advertised_routes)) }
                td { (list(&n.approved_routes)) }
                td { (if n.expiry_unix_ms > 0 { time(n.expiry_unix_ms) } else { "never".into() }) }
                td {
                    form.inline method="post" action="/nodes/rename" {
                        (csrf_field(csrf))
                        input type="hidden" name="id" value=(n.id);
                        input type="text" name="new_name" size="12" placeholder="new name";
                        button type="submit" { "Rename" }
                    }
                    " "
                    form.inline method="post" action="/nodes/tag" {
                        (csrf_field(csrf))
                        input type="hidden" name="id" value=(n.id);
                        input type="text" name="tags" size="12" placeholder="tag:a,tag:b";
                        button type="submit" { "Tag" }
                    }
                    " "
                    form.inline method="post" action="/nodes/expire" {
                        (csrf_field(csrf))
                        input type="hidden" name="id" value=(n.id);
                        button type="submit" { "Expire" }
                    }
                    " "
                    form.inline method="post" action="/nodes/delete" {
                        (csrf_field(csrf))
                        input type="hidden" name="id" value=(n.id);
                        button type="submit" { "Delete" }
                    }
                }
            }
        }
    }
}

/// The ids in the nodes table, as `/events` compares them (`1,2,5`).
pub fn node_ids(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| n.id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The nodes page.
pub fn nodes(nodes: &[Node], csrf: &str) -> Markup {
    html! {
        p { span id="node-count" { (nodes.len()) } " nodes; the table follows the server live." }
        table {
            thead { tr {
                th { "id" } th { "name" } th { "user" } th { "tags" } th { "addresses" }
                th { "online" } th { "last seen" } th { "endpoints" } th { "DERP" }
                th { "advertised routes" } th { "approved routes" } th { "key expiry" } th { "actions" }
            } }
            tbody id="nodes" data-ids=(node_ids(nodes)) { (node_rows(nodes, csrf)) }
        }
    }
}

/// A secret just created: shown this once.
pub struct NewSecret<'a> {
    /// What it is ("pre-auth key", "API key").
    pub what: &'a str,
    /// The secret.
    pub secret: &'a str,
}

fn new_secret(secret: Option<NewSecret<'_>>) -> Markup {
    html! {
        @if let Some(s) = secret {
            div.secret {
                "New " (s.what) " (shown only this once): "
                code id="new-secret" { (s.secret) }
            }
        }
    }
}

/// The pre-auth keys page.
pub fn preauthkeys(
    keys: &[PreAuthKey],
    users: &[User],
    csrf: &str,
    secret: Option<NewSecret<'_>>,
) -> Markup {
    html! {
        (new_secret(secret))
        fieldset {
            legend { "Create a pre-auth key" }
            form method="post" action="/preauthkeys/create" {
                (csrf_field(csrf))
                label { "user " select name="user" id="user" {
                    @for u in users { option value=(u.name) { (u.name) } }
                } } " "
                label { input type="checkbox" name="reusable" id="reusable" value="1"; " reusable" } " "
                label { input type="checkbox" name="ephemeral" id="ephemeral" value="1"; " ephemeral" } " "
                label { "expires in " input type="text" name="expiration" id="expiration" size="6" value="1h"; } " "
                label { "tags " input type="text" name="tags" id="tags" size="16" placeholder="tag:a,tag:b"; } " "
                button type="submit" id="create-preauthkey" { "Create" }
            }
        }
        table {
            thead { tr {
                th { "prefix" } th { "user" } th { "reusable" } th { "ephemeral" } th { "used" }
                th { "tags" } th { "created" } th { "expires" } th { "" }
            } }
            tbody {
                @for k in keys {
                    tr {
                        td { code { (k.prefix) } } td { (k.user) }
                        td { (yes(k.reusable)) } td { (yes(k.ephemeral)) } td { (yes(k.used)) }
                        td { (k.tags.join(", ")) }
                        td { (time(k.created_unix_ms)) } td { (time(k.expiration_unix_ms)) }
                        td { form.inline method="post" action="/preauthkeys/expire" {
                            (csrf_field(csrf))
                            input type="hidden" name="prefix" value=(k.prefix);
                            button type="submit" { "Expire" }
                        } }
                    }
                }
            }
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The users page.
pub fn users(users: &[User], csrf: &str) -> Markup {
    html! {
        fieldset {
            legend { "Create a user" }
            form method="post" action="/users/create" {
                (csrf_field(csrf))
                input type="text" name="name" id="user-name" placeholder="name";
                " " button type="submit" id="create-user" { "Create" }
            }
        }
        table {
            thead { tr { th { "id" } th { "name" } th { "created" } th { "" } } }
            tbody {
                @for u in users {
                    tr {
                        td { (u.id) } td { (u.name) } td { (time(u.created_unix_ms)) }
                        td { form.inline method="post" action="/users/delete" {
                            (csrf_field(csrf))
                            input type="hidden" name="name" value=(u.name);
                            button type="submit" { "Delete" }
                        } }
                    }
                }
            }
        }
    }
}

/// The API keys page.
pub fn apikeys(keys: &[ApiKey], csrf: &str, secret: Option<NewSecret<'_>>) -> Markup {
    html! {
        (new_secret(secret))
        fieldset {
            legend { "Create an API key" }
            form method="post" action="/apikeys/create" {
                (csrf_field(csrf))
                label { "expires in " input type="text" name="expiration" size="6" value="90d"; }
                " " button type="submit" { "Create" }
            }
        }
        table {
            thead { tr { th { "prefix" } th { "created" } th { "expires" } th { "last used" } th { "" } } }
            tbody {
                @for k in keys {
                    tr {
                        td { code { (k.prefix) } } td { (time(k.created_unix_ms)) }
                        td { (time(k.expiration_unix_ms)) } td { (time(k.last_used_unix_ms)) }
                        td { form.inline method="post" action="/apikeys/expire" {
                            (csrf_field(csrf))
                            input type="hidden" name="prefix" value=(k.prefix);
                            button type="submit" { "Expire" }
                        } }
                    }
                }
            }
        }
    }
}

/// What the explain form asked (echoed back into it).
#[derive(Debug, Default)]
pub struct Question<'a> {
    /// Source: a node name, mesh IP, `user@`, group or tag.
    pub src: &'a str,
    /// Destination, in the same forms.
    pub dst: &'a str,
    /// A port; empty: any.
    pub port: &'a str,
    /// A protocol name or number; empty: tcp.
    pub proto: &'a str,
}

/// The editing side of the policy page (database mode).
#[derive(Debug, Default)]
pub struct PolicyEdit<'a> {
    /// The session's CSRF token.
    pub csrf: &'a str,
    /// Text typed but not saved (shown instead of the policy in force).
    pub draft: Option<&'a str>,
    /// What the last check or save said.
    pub notice: Option<&'a str>,
}

/// The policy page: the policy in force (editable in database mode, with check and save) and
/// the "can A reach B on port P" form (a GET: it changes nothing) with its answer.
pub fn policy(
    current: &GetPolicyResponse,
    question: &Question<'_>,
    answer: Option<&ExplainPolicyResponse>,
    edit: &PolicyEdit<'_>,
) -> Markup {
    html! {
        fieldset {
            legend { "Explain: can A reach B?" }
            form method="get" action="/policy" id="explain" {
                label { "from " input type="text" name="src" id="src" value=(question.src) placeholder="node, IP, user@, group:, tag:"; } " "
                label { "to " input type="text" name="dst" id="dst" value=(question.dst); } " "
                label { "port " input type="text" name="port" id="port" size="6" value=(question.port) placeholder="any"; } " "
                label { "protocol " input type="text" name="proto" size="5" value=(question.proto) placeholder="tcp"; } " "
                button type="submit" id="ask" { "Explain" }
            }
        }
        @if let Some(a) = answer {
            @if !a.configured {
                p id="unconfigured" { "No policy is configured: every node may reach every other." }
            }
            @if a.decisions.is_empty() {
                p id="answer" { "No node or address matches." }
            } @else {
                table id="answer" {
                    thead { tr { th { "from" } th { "to" } th { "port" } th { "allowed" } th { "rule" } th { "in its netmap" } } }
                    tbody {
                        @for d in &a.decisions {
                            tr {
                                td { (d.src_node) " " code { (d.src_ip) } }
                                td { (d.dst_node) " " code { (d.dst_ip) } }
                                td { (if a.any_port && !d.allowed { "any".to_string() } else { d.port.to_string() }) }
                                td class=(if d.allowed { "on" } else { "off" }) { (if d.allowed { "allowed" } else { "denied" }) }
                                td { @if let Some(r) = &d.rule {
                                    @if r.section == "default" { "default (allow all)" }
                                    @else { (r.section) "[" (r.index) "] at line " (r.line) ":" (r.column) }
                                } @else { "-" } }
                                td { (yes(d.visible)) }
                            }
                        }
                    }
                }
                @if a.omitted > 0 { p { (a.omitted) " more pairs left out." } }
            }
        }
        p {
            "Mode " code { (current.mode) }
            @if !current.path.is_empty() { ", file " code { (current.path) } }
            @if current.configured { "; the policy in force:" } @else { "; no policy is configured: every node may reach every other." }
        }
        @if let Some(notice) = edit.notice {
            p.secret id="notice" { (notice) }
        }
        @if current.mode == "database" {
            form method="post" action="/policy/set" {
                (csrf_field(edit.csrf))
                textarea name="policy" id="policy-text" rows="24" cols="100" spellcheck="false" {
                    (edit.draft.unwrap_or(&current.policy))
                }
                br;
                button type="submit" name="action" value="check" id="check" { "Check" } " "
                button type="submit" name="action" value="set" id="save" { "Save and apply" }
            }
        } @else {
            @if current.configured {
                pre id="policy-text" { (current.policy) }
            }
            p { "File mode: edit the file; the server applies it when it changes." }
        }
    }
}

/// The most nodes the mesh picture draws; a larger mesh gets a sentence instead.
pub const MAX_PICTURE_NODES: usize = 100;

/// Who may reach whom: `(a, b, both_ways)` for each pair of node indexes (`a < b`) where at
/// least one has the other in its netmap.
pub type Links = Vec<(usize, usize, bool)>;

/// The mesh as an SVG picture: nodes on a circle (green while online), a line between two
/// nodes when the policy lets one see the other (dashed when only one way), green when both
/// ends are online.
pub fn mesh(nodes: &[Node], links: &Links) -> Markup {
    if nodes.len() > MAX_PICTURE_NODES {
        return html! { p { (nodes.len()) " nodes: too many to draw (at most " (MAX_PICTURE_NODES) ")." } };
    }
    let n = nodes.len().max(1) as f64;
    let radius = 140.0 + 12.0 * n;
    let size = 2.0 * radius + 240.0;
    let centre = size / 2.0;
    let at = |i: usize| {
        let angle = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
        (centre + radius * angle.cos(), centre + radius * angle.sin())
    };
    html! {
        p {
            (nodes.len()) " nodes, " (links.len()) " links. A line: the policy lets one node see the other "
            "(dashed: only one way); green: both ends online."
        }
        svg id="mesh" xmlns="http://www.w3.org/2000/svg" width=(size) height=(size)
            viewBox={ "0 0 " (size) " " (size) } {
            @for (a, b, both) in links {
                @let ((x1, y1), (x2, y2)) = (at(*a), at(*b));
                @let online = nodes[*a].online && nodes[*b].online;
                line class=(if online { "link online-pair" } else { "link" })
                    x1=(format!("{x1:.1}")) y1=(format!("{y1:.1}")) x2=(format!("{x2:.1}")) y2=(format!("{y2:.1}"))
                    stroke=(if online { "#2e9b46" } else { "#a9b0b8" }) stroke-width="2"
                    stroke-dasharray=[(!both).then_some("6 4")] {
                    title { (nodes[*a].given_name) " – " (nodes[*b].given_name) }
                }
            }
            @for (i, node) in nodes.iter().enumerate() {
                @let (x, y) = at(i);
                g class="node" {
                    circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="14"
                        fill=(if node.online { "#2e9b46" } else { "#c4c9cf" }) stroke="#1f3a4d" stroke-width="1.5" {
                        title { (node.given_name) " " (node.addresses.join(" ")) }
                    }
                    text x=(format!("{x:.1}")) y=(format!("{:.1}", y + 32.0)) text-anchor="middle"
                        font-size="13" font-family="sans-serif" { (node.given_name) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(time(0), "never");
        assert_eq!(time(1_000), "1970-01-01 00:00:01 UTC");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(time(1_795_797_296_000), "2026-11-27 16:34:56 UTC");
    }

    #[test]
    fn the_mesh_picture_draws_each_link_once() {
        let node = |id, online| Node {
            id,
            given_name: format!("n{id}"),
            online,
            ..Node::default()
        };
        let nodes = [node(1, true), node(2, true), node(3, false)];
        let svg = mesh(&nodes, &vec![(0, 1, true), (1, 2, false)]).into_string();
        assert_eq!(svg.matches("<line").count(), 2, "{svg}");
        assert_eq!(svg.matches("online-pair").count(), 1, "{svg}");
        assert_eq!(svg.matches("stroke-dasharray").count(), 1, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
    }

    #[test]
    fn no_page_has_an_inline_style_the_policy_would_block() {
        let node = Node {
            id: 1,
            online: true,
            ..Node::default()
        };
        let question = Question::default();
        let bodies = [
            nodes(std::slice::from_ref(&node), "c"),
            mesh(std::slice::from_ref(&node), &Vec::new()),
            policy(
                &GetPolicyResponse {
                    configured: true,
                    ..Default::default()
                },
                &question,
                None,
                &PolicyEdit::default(),
            ),
            users(&[], "c"),
            apikeys(&[], "c", None),
            preauthkeys(&[], &[], "c", None),
        ];
        for body in bodies {
            let html = page("t", "/nodes", Some("c"), None, "n", body).into_string();
            assert!(!html.contains(" style=\""), "{html}");
        }
    }

    #[test]
    fn node_fields_are_escaped() {
        let node = Node {
            id: 7,
            given_name: "<script>".into(),
            hostname: "<script>".into(),
            ..Node::default()
        };
        let html = node_rows(&[node], "tok").into_string();
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains(r#"name="csrf" value="tok""#), "{html}");
    }
}
