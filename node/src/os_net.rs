//! The host side of subnet routes and exit nodes on Linux, laid out as tailscaled lays it out
//! (`wgengine/router/osrouter/router_linux.go`, `util/linuxfw`), so an operator who knows one
//! knows the other:
//!
//! - routes into the tunnel live in their own table ([`ROUTE_TABLE`], 52), with `throw` routes
//!   there for the host's LAN when an exit node is used with LAN access;
//! - four policy rules per address family send everything to that table except the node's own
//!   traffic, whose sockets carry [`BYPASS_MARK`] ([`mark_socket`]) and so find the host's own
//!   routes first (and `unreachable`, never the tunnel, when the host has none);
//! - a router (it serves subnet routes or is an exit node) turns on IP forwarding and installs
//!   the nftables table `inet warren`: traffic forwarded from the tunnel is marked
//!   [`SUBNET_ROUTE_MARK`] and masqueraded on the way out, so the LAN needs no route back.
//!
//! Everything installed is recognisable without memory of it: table 52, the rule preferences
//! [`RULE_PREFS`], the nft table's name, and a record of the sysctls' earlier values in the
//! state directory. [`OsNet::new`] removes what a crashed run left, [`OsNet::cleanup`] what
//! this run installed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::Handle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

/// Mark of the node's own sockets: rules 5210-5250 send it to the host's tables, never to
/// table 52 (tailscale's `LinuxBypassMarkNum`).
pub const BYPASS_MARK: u32 = 0x80000;
/// Mark set on packets forwarded from the tunnel, which the nat chain masquerades (tailscale's
/// `LinuxSubnetRouteMarkNum`).
pub const SUBNET_ROUTE_MARK: u32 = 0x40000;
/// The bits of the packet mark that belong to warren (and tailscale); other bits are left to
/// other software.
pub const MARK_MASK: u32 = 0xff0000;
/// The routing table holding the routes into the tunnel.
pub const ROUTE_TABLE: u32 = 52;
/// Preference of the rule sending marked traffic to the main table.
pub const PREF_BYPASS_MAIN: u32 = 5210;
/// Preference of the rule sending marked traffic to the default table.
pub const PREF_BYPASS_DEFAULT: u32 = 5230;
/// Preference of the rule making marked traffic unreachable when neither table routes it.
pub const PREF_BYPASS_UNREACHABLE: u32 = 5250;
/// Preference of the rule sending the rest to [`ROUTE_TABLE`].
pub const PREF_TABLE: u32 = 5270;
/// All rule preferences warren uses; a rule at one of them with warren's shape is warren's.
pub const RULE_PREFS: [u32; 4] = [
    PREF_BYPASS_MAIN,
    PREF_BYPASS_DEFAULT,
    PREF_BYPASS_UNREACHABLE,
    PREF_TABLE,
];
/// Name of the nftables table (family `inet`).
pub const NFT_TABLE: &str = "warren";
/// The tailnet's address range: never accepted from a LAN as the source of a packet that is
/// forwarded into the tunnel (tailscale's anti-spoofing rule).
pub const CGNAT_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);
/// The file in the state directory that records the sysctls' values before router mode.
pub const SYSCTL_RECORD: &str = "os-net-sysctl";

const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_DEFAULT: u32 = 253;
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EAFNOSUPPORT: i32 = 97;

/// The sysctls router mode turns on: name (as `sysctl` prints it) and whether it is IPv6.
const FORWARDING: [(&str, bool); 2] = [
    ("net.ipv4.ip_forward", false),
    ("net.ipv6.conf.all.forwarding", true),
];

/// An OS error number, printed as the OS describes it without the number (`File exists`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = io::Error::from_raw_os_error(self.0).to_string();
        let suffix = format!(" (os error {})", self.0);
        f.write_str(text.strip_suffix(&suffix).unwrap_or(&text))
    }
}

/// Why a netlink request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetlinkCause {
    /// The kernel refused it.
    #[error("{0}")]
    Errno(Errno),
    /// The exchange itself went wrong (the connection closed, an unexpected answer).
    #[error("netlink: {0}")]
    Protocol(rtnetlink::Error),
}

impl NetlinkCause {
    /// The kernel's error number, if it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Errno(Errno(n)) => Some(*n),
            Self::Protocol(_) => None,
        }
    }
}

impl From<rtnetlink::Error> for NetlinkCause {
    fn from(e: rtnetlink::Error) -> Self {
        match &e {
            rtnetlink::Error::NetlinkError(m) => match m.code {
                Some(code) => Self::Errno(Errno(-code.get())),
                None => Self::Protocol(e),
            },
            _ => Self::Protocol(e),
        }
    }
}

/// Why running `nft` failed.
#[derive(Debug, thiserror::Error)]
pub enum NftCause {
    /// `nft` could not be started (not installed?) or its pipes failed.
    #[error("running nft: {0}")]
    Spawn(#[source] io::Error),
    /// `nft` ran and refused the ruleset.
    #[error("nft failed ({status}): {stderr}")]
    Failed {
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

/// What went wrong, naming the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum OsNetError {
    /// The rtnetlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Open(#[source] io::Error),
    /// The interface name cannot be used (empty, too long, or characters nft would need quoted).
    #[error("bad interface name {name:?}")]
    BadInterfaceName {
        /// The name.
        name: String,
    },
    /// The tunnel interface does not exist.
    #[error("interface {name} does not exist")]
    NoSuchInterface {
        /// Its name.
        name: String,
    },
    /// Looking up an interface failed.
    #[error("looking up interface {name}: {cause}")]
    Link {
        /// Its name.
        name: String,
        /// Why.
        cause: NetlinkCause,
    },
    /// Listing the routes of table 52 failed.
    #[error("listing routes of table 52: {cause}")]
    ListRoutes {
        /// Why.
        cause: NetlinkCause,
    },
    /// Adding (or replacing) a route in table 52 failed.
    #[error("adding {kind} {route} to table 52: {cause}")]
    AddRoute {
        /// The destination.
        route: IpNet,
        /// Into the tunnel or `throw`.
        kind: RouteKind,
        /// Why.
        cause: NetlinkCause,
    },
    /// Deleting a route from table 52 failed.
    #[error("deleting route {route} from table 52: {cause}")]
    DeleteRoute {
        /// The destination.
        route: IpNet,
        /// Why.
        cause: NetlinkCause,
    },
    /// Listing the policy rules failed.
    #[error("listing ip rules: {cause}")]
    ListRules {
        /// Why.
        cause: NetlinkCause,
    },
    /// Adding a policy rule failed.
    #[error("adding ip rule {rule}: {cause}")]
    AddRule {
        /// The rule.
        rule: Rule,
        /// Why.
        cause: NetlinkCause,
    },
    /// Deleting a policy rule failed.
    #[error("deleting {family} ip rule {pref}: {cause}")]
    DeleteRule {
        /// Its preference.
        pref: u32,
        /// Its family.
        family: Family,
        /// Why.
        cause: NetlinkCause,
    },
    /// Reading or writing a sysctl failed.
    #[error("{action} {name}: {source}")]
    Sysctl {
        /// `reading` or `writing`.
        action: &'static str,
        /// The sysctl (`net.ipv4.ip_forward`).
        name: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Reading, writing or removing the sysctl record in the state directory failed.
    #[error("{action} {}: {source}", path.display())]
    SysctlRecord {
        /// `reading`, `writing` or `removing`.
        action: &'static str,
        /// The record's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The sysctl record holds something warren does not write (it is left in place).
    #[error("{}: line {line:?} is not a forwarding sysctl record", path.display())]
    BadSysctlRecord {
        /// The record's path.
        path: PathBuf,
        /// The offending line.
        line: String,
    },
    /// Installing or removing the nft table failed.
    #[error("{action} nft table inet warren: {cause}")]
    Nft {
        /// `installing` or `removing`.
        action: &'static str,
        /// Why.
        cause: NftCause,
    },
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Self::V4,
            IpNet::V6(_) => Self::V6,
        }
    }

    fn netlink(self) -> AddressFamily {
        match self {
            Self::V4 => AddressFamily::Inet,
            Self::V6 => AddressFamily::Inet6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// What a route in table 52 does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// Into the tunnel (`dev <tun>`).
    Tunnel,
    /// `throw`: the lookup goes on to the next rule, so the host's own routes apply.
    Throw,
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tunnel => "route",
            Self::Throw => "throw route",
        })
    }
}

/// What one of warren's policy rules does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleTarget {
    /// `lookup <table>`.
    Table(u32),
    /// `unreachable`.
    Unreachable,
}

/// One of warren's policy rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Its family.
    pub family: Family,
    /// Its preference.
    pub pref: u32,
    /// Whether it matches `fwmark BYPASS_MARK/MARK_MASK` (else all packets).
    pub bypass: bool,
    /// What it does.
    pub target: RuleTarget,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: from all", self.family, self.pref)?;
        if self.bypass {
            write!(f, " fwmark {BYPASS_MARK:#x}/{MARK_MASK:#x}")?;
        }
        match self.target {
            RuleTarget::Table(RT_TABLE_MAIN) => f.write_str(" lookup main"),
            RuleTarget::Table(RT_TABLE_DEFAULT) => f.write_str(" lookup default"),
            RuleTarget::Table(t) => write!(f, " lookup {t}"),
            RuleTarget::Unreachable => f.write_str(" unreachable"),
        }
    }
}

/// warren's four rules for one family, in preference order (tailscale's `ipRules`).
pub fn rules(family: Family) -> [Rule; 4] {
    let rule = |pref, bypass, target| Rule {
        family,
        pref,
        bypass,
        target,
    };
    [
        rule(PREF_BYPASS_MAIN, true, RuleTarget::Table(RT_TABLE_MAIN)),
        rule(
            PREF_BYPASS_DEFAULT,
            true,
            RuleTarget::Table(RT_TABLE_DEFAULT),
        ),
        rule(PREF_BYPASS_UNREACHABLE, true, RuleTarget::Unreachable),
        rule(PREF_TABLE, false, RuleTarget::Table(ROUTE_TABLE)),
    ]
}

/// How a router treats traffic it forwards from the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RouterConfig {
    /// Masquerade forwarded traffic as the router's own address, so LAN hosts need no route
    /// back to the tailnet (tailscale's `--snat-subnet-routes`, default on).
    pub snat: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self { snat: true }
    }
}

/// What [`OsNet`] has installed, for `warren status` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Installed {
    /// Routes into the tunnel in table 52, sorted (without those shadowed by LAN bypass).
    pub routes: Vec<IpNet>,
    /// `throw` routes in table 52 for the host's LAN, sorted.
    pub lan_bypass: Vec<IpNet>,
    /// Whether the policy rules are in place.
    pub rules: bool,
    /// Router mode, when on (forwarding enabled, nft table installed).
    pub router: Option<RouterConfig>,
}

/// The changes that turn the routes in place into the wanted ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan<V> {
    /// Routes to add or replace (new destinations, or ones whose value changed), in order.
    pub add: Vec<(IpNet, V)>,
    /// Destinations to delete, in order.
    pub delete: Vec<IpNet>,
}

/// Diffs routes: what to add or replace and what to delete so that `current` becomes `wanted`.
pub fn plan_routes<V: PartialEq + Clone>(
    current: &BTreeMap<IpNet, V>,
    wanted: &BTreeMap<IpNet, V>,
) -> RoutePlan<V> {
    RoutePlan {
        add: wanted
            .iter()
            .filter(|(net, v)| current.get(net) != Some(v))
            .map(|(net, v)| (*net, v.clone()))
            .collect(),
        delete: current
            .keys()
            .filter(|net| !wanted.contains_key(net))
            .copied()
            .collect(),
    }
}

/// The routes table 52 should hold: the tunnel routes, and the LAN bypass routes, which win
/// where both name the same prefix. Prefixes are truncated to their network address.
pub fn wanted_routes(routes: &[IpNet], lan: &[IpNet]) -> BTreeMap<IpNet, RouteKind> {
    let mut wanted: BTreeMap<IpNet, RouteKind> = routes
        .iter()
        .map(|r| (r.trunc(), RouteKind::Tunnel))
        .collect();
    wanted.extend(lan.iter().map(|r| (r.trunc(), RouteKind::Throw)));
    wanted
}

/// The nftables script for router mode: replaces table `inet warren` atomically (declaring it
/// first makes the delete succeed when it is absent). `tun` must be a valid interface name.
pub fn nft_ruleset(tun: &str, router: RouterConfig) -> String {
    let keep = !MARK_MASK;
    let (cgnat, cgnat_len) = CGNAT_RANGE;
    let mut s = format!(
        "table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{tun}\" meta mark set meta mark & {keep:#010x} | {SUBNET_ROUTE_MARK:#010x} accept\n\
         \t\toifname \"{tun}\" ip saddr {cgnat}/{cgnat_len} drop\n\
         \t\toifname \"{tun}\" accept\n\
         \t}}\n"
    );
    if router.snat {
        s.push_str(&format!(
            "\tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark & {MARK_MASK:#010x} == {SUBNET_ROUTE_MARK:#010x} masquerade\n\
             \t}}\n"
        ));
    }
    s.push_str("}\n");
    s
}

/// The nftables script that removes table `inet warren`, present or not.
pub fn nft_remove_script() -> String {
    format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
}

/// Sysctl values recorded before router mode changed them, as `name=value` lines.
pub fn format_sysctl_record(values: &[(&str, String)]) -> String {
    let mut s = String::from("# warren: forwarding sysctls before router mode, restored on exit\n");
    for (name, value) in values {
        s.push_str(&format!("{name}={value}\n"));
    }
    s
}

/// Parses a sysctl record. Only the forwarding sysctls with a numeric value are accepted: the
/// record decides what is written under /proc/sys, so nothing else may come from it. The
/// offending line is returned otherwise.
pub fn parse_sysctl_record(text: &str) -> Result<Vec<(&'static str, String)>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = line.split_once('=').and_then(|(name, value)| {
            let (known, _) = FORWARDING.iter().find(|(n, _)| *n == name.trim())?;
            let value = value.trim();
            (!value.is_empty() && value.len() <= 3 && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| (*known, value.to_string()))
        });
        match parsed {
            Some(entry) => out.push(entry),
            None => return Err(line.to_string()),
        }
    }
    Ok(out)
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The host's routing state for the node: routes into the tunnel, the rules that use them,
/// and router mode. Owns an rtnetlink connection, driven by a task on the current tokio
/// runtime (dropping `OsNet` stops it; it does not undo anything: call [`Self::cleanup`]).
#[derive(Debug)]
pub struct OsNet {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
    tun: String,
    state_dir: PathBuf,
    ipv6: bool,
    routes: BTreeSet<IpNet>,
    lan: BTreeSet<IpNet>,
    rules: bool,
    router: Option<RouterConfig>,
}

impl Drop for OsNet {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl OsNet {
    /// Opens the netlink connection for tunnel interface `tun` (which need not exist yet),
    /// then removes what a crashed run left: routes in table 52, rules at [`RULE_PREFS`], the
    /// nft table `inet warren`, and sysctls recorded in `state_dir` (restored). Must be called
    /// inside a tokio runtime.
    pub async fn new(tun: &str, state_dir: &Path) -> Result<Self, OsNetError> {
        if !valid_ifname(tun) {
            return Err(OsNetError::BadInterfaceName {
                name: tun.to_string(),
            });
        }
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(OsNetError::Open)?;
        let connection = tokio::spawn(connection);
        let mut net = Self {
            handle,
            connection,
            tun: tun.to_string(),
            state_dir: state_dir.to_path_buf(),
            ipv6: Path::new("/proc/sys/net/ipv6").exists(),
            routes: BTreeSet::new(),
            lan: BTreeSet::new(),
            rules: false,
            router: None,
        };
        let removed = net.remove_all().await?;
        if removed.any() {
            tracing::info!(
                routes = removed.routes,
                rules = removed.rules,
                sysctls = removed.sysctls,
                "removed routing state left by an earlier run"
            );
        }
        Ok(net)
    }

    /// Sets the routes that go into the tunnel: table 52, `dev <tun>`. Includes `0.0.0.0/0`
    /// and `::/0` while an exit node is selected (both, even if it offers one: the other then
    /// blackholes in the tunnel rather than leaking). Table 52 is diffed against what the
    /// kernel holds: new routes are added, changed ones replaced, others deleted. The first
    /// call that leaves table 52 non-empty installs the policy rules. The tunnel must be up
    /// (IPv4 refuses routes via a down device: `Network is down`).
    pub async fn set_routes(&mut self, routes: &[IpNet]) -> Result<(), OsNetError> {
        self.routes = routes.iter().map(IpNet::trunc).collect();
        self.apply_routes().await
    }

    /// With an exit node and allow-LAN-access: `throw` routes in table 52 for the host's LAN
    /// prefixes (see [`lan_prefixes`]), so that traffic to the LAN goes on to the main table
    /// instead of into the tunnel. A prefix here wins over the same prefix in
    /// [`Self::set_routes`]. Empty removes them.
    pub async fn set_lan_bypass(&mut self, lan: &[IpNet]) -> Result<(), OsNetError> {
        self.lan = lan.iter().map(IpNet::trunc).collect();
        self.apply_routes().await
    }

    /// Router mode, for a node that serves approved subnet routes or is an approved exit node:
    /// records `net.ipv4.ip_forward` and `net.ipv6.conf.all.forwarding` in the state directory
    /// (unless a record is there already), sets both to 1, and installs the nft table
    /// `inet warren` (forward chain: mark what comes from the tunnel, drop tailnet-sourced
    /// packets headed into it from elsewhere, accept; with `snat`, a postrouting chain that
    /// masquerades marked packets). `None` removes the table and restores the sysctls.
    /// Repeating the current setting does nothing.
    pub async fn set_router(&mut self, router: Option<RouterConfig>) -> Result<(), OsNetError> {
        if router == self.router {
            return Ok(());
        }
        match router {
            Some(config) => {
                self.enable_forwarding()?;
                // Counted as on from here: cleanup must restore the sysctls even when nft fails.
                self.router = Some(config);
                run_nft(nft_ruleset(&self.tun, config))
                    .await
                    .map_err(|cause| OsNetError::Nft {
                        action: "installing",
                        cause,
                    })?;
                tracing::info!(tun = %self.tun, snat = config.snat, "router mode on");
            }
            None => {
                remove_nft_table().await?;
                restore_sysctls(&self.record_path())?;
                self.router = None;
                tracing::info!("router mode off");
            }
        }
        Ok(())
    }

    /// Removes everything this node installed, and whatever an earlier run left: every route
    /// in table 52, the rules, the nft table, and the recorded sysctls (restored). Every step
    /// is tried; the first error is returned. Call it on `warren down` and before exit.
    pub async fn cleanup(&mut self) -> Result<(), OsNetError> {
        self.routes.clear();
        self.lan.clear();
        self.rules = false;
        self.router = None;
        let removed = self.remove_all().await?;
        tracing::info!(
            routes = removed.routes,
            rules = removed.rules,
            sysctls = removed.sysctls,
            "host routing state removed"
        );
        Ok(())
    }

    /// What is installed now (as last set; the kernel's table is checked on each change).
    pub fn installed(&self) -> Installed {
        let wanted = self.wanted();
        let of = |kind| {
            wanted
                .iter()
                .filter(|(_, k)| **k == kind)
                .map(|(net, _)| *net)
                .collect()
        };
        Installed {
            routes: of(RouteKind::Tunnel),
            lan_bypass: of(RouteKind::Throw),
            rules: self.rules,
            router: self.router,
        }
    }

    fn wanted(&self) -> BTreeMap<IpNet, RouteKind> {
        let routes: Vec<IpNet> = self.routes.iter().copied().collect();
        let lan: Vec<IpNet> = self.lan.iter().copied().collect();
        let mut wanted = wanted_routes(&routes, &lan);
        if !self.ipv6 {
            wanted.retain(|net, _| Family::of(net) == Family::V4);
        }
        wanted
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir.join(SYSCTL_RECORD)
    }

    async fn apply_routes(&mut self) -> Result<(), OsNetError> {
        let wanted = self.wanted();
        let index = if wanted.values().any(|k| *k == RouteKind::Tunnel) {
            Some(self.link_index().await?)
        } else {
            None
        };
        let wanted: BTreeMap<IpNet, Slot> = wanted
            .into_iter()
            .map(|(net, kind)| {
                let oif = (kind == RouteKind::Tunnel).then_some(index).flatten();
                (net, Slot { kind, oif })
            })
            .collect();
        let mut current = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (net, slot, msg) in self.table_routes().await? {
            match current.entry(net) {
                std::collections::btree_map::Entry::Occupied(_) => duplicates.push((net, msg)),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(slot);
                }
            }
        }
        let plan = plan_routes(&current, &wanted);
        if !wanted.is_empty() && !self.rules {
            self.add_rules().await?;
        }
        for (net, slot) in &plan.add {
            self.handle
                .route()
                .add(route_message(*net, slot.kind, slot.oif))
                .replace()
                .execute()
                .await
                .map_err(|e| OsNetError::AddRoute {
                    route: *net,
                    kind: slot.kind,
                    cause: e.into(),
                })?;
            tracing::debug!(route = %net, kind = ?slot.kind, "route added to table 52");
        }
        for net in &plan.delete {
            self.delete_route(*net, delete_message(*net)).await?;
            tracing::debug!(route = %net, "route deleted from table 52");
        }
        for (net, msg) in duplicates {
            self.delete_route(net, msg).await?;
        }
        Ok(())
    }

    async fn link_index(&self) -> Result<u32, OsNetError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(self.tun.clone())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(OsNetError::NoSuchInterface {
                name: self.tun.clone(),
            }),
            Err(e) => {
                let cause = NetlinkCause::from(e);
                if cause.errno() == Some(ENODEV) {
                    Err(OsNetError::NoSuchInterface {
                        name: self.tun.clone(),
                    })
                } else {
                    Err(OsNetError::Link {
                        name: self.tun.clone(),
                        cause,
                    })
                }
            }
        }
    }

    /// Every route in table 52, both families, with the message that deletes it exactly.
    async fn table_routes(&self) -> Result<Vec<(IpNet, Slot, RouteMessage)>, OsNetError> {
        let mut out = Vec::new();
        let families: &[Family] = if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for family in families {
            let mut query = RouteMessage::default();
            query.header.address_family = family.netlink();
            // With strict checking the kernel dumps only this table.
            query.header.table = ROUTE_TABLE as u8;
            query.attributes.push(RouteAttribute::Table(ROUTE_TABLE));
            let mut dump = self.handle.route().get(query).execute();
            loop {
                let msg = match dump.try_next().await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(e) => {
                        let cause = NetlinkCause::from(e);
                        // A table that was never used does not exist yet.
                        if matches!(cause.errno(), Some(ENOENT) | Some(EAFNOSUPPORT)) {
                            break;
                        }
                        return Err(OsNetError::ListRoutes { cause });
                    }
                };
                if let Some((net, slot)) = parse_route(&msg) {
                    out.push((net, slot, msg));
                }
            }
        }
        Ok(out)
    }

    async fn delete_route(&self, net: IpNet, msg: RouteMessage) -> Result<(), OsNetError> {
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let cause = NetlinkCause::from(e);
                if matches!(cause.errno(), Some(ESRCH) | Some(ENOENT)) {
                    Ok(())
                } else {
                    Err(OsNetError::DeleteRoute { route: net, cause })
                }
            }
        }
    }

    async fn add_rules(&mut self) -> Result<(), OsNetError> {
        let families: &[Family] = if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for family in families {
            for rule in rules(*family) {
                let mut req = self.handle.rule().add();
                let msg = req.message_mut();
                *msg = rule_message(rule);
                match req.execute().await {
                    Ok(()) => {}
                    Err(e) => {
                        let cause = NetlinkCause::from(e);
                        if cause.errno() != Some(EEXIST) {
                            return Err(OsNetError::AddRule { rule, cause });
                        }
                    }
                }
            }
        }
        self.rules = true;
        tracing::debug!("policy rules for table 52 added");
        Ok(())
    }

    /// Removes every trace, in memory or not; counts what it found.
    async fn remove_all(&mut self) -> Result<Removed, OsNetError> {
        let mut removed = Removed::default();
        let mut first: Option<OsNetError> = None;
        // Rules first, so no packet is sent to a table being emptied.
        match self.remove_rules().await {
            Ok(n) => removed.rules = n,
            Err(e) => first = first.or(Some(e)),
        }
        match self.table_routes().await {
            Ok(routes) => {
                for (net, _, msg) in routes {
                    match self.delete_route(net, msg).await {
                        Ok(()) => removed.routes += 1,
                        Err(e) => first = first.or(Some(e)),
                    }
                }
            }
            Err(e) => first = first.or(Some(e)),
        }
        if let Err(e) = remove_nft_table().await {
            first = first.or(Some(e));
        }
        match restore_sysctls(&self.record_path()) {
            Ok(n) => removed.sysctls = n,
            Err(e) => first = first.or(Some(e)),
        }
        match first {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    async fn remove_rules(&self) -> Result<usize, OsNetError> {
        let mut n = 0;
        let families: &[Family] = if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for family in families {
            let version = match family {
                Family::V4 => rtnetlink::IpVersion::V4,
                Family::V6 => rtnetlink::IpVersion::V6,
            };
            let listed: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| OsNetError::ListRules { cause: e.into() })?;
            for msg in listed {
                let Some(rule) = parse_rule(&msg) else {
                    continue;
                };
                if !rules(rule.family).contains(&rule) {
                    continue;
                }
                match self.handle.rule().del(msg).execute().await {
                    Ok(()) => n += 1,
                    Err(e) => {
                        let cause = NetlinkCause::from(e);
                        if cause.errno() != Some(ENOENT) {
                            return Err(OsNetError::DeleteRule {
                                pref: rule.pref,
                                family: rule.family,
                                cause,
                            });
                        }
                    }
                }
            }
        }
        Ok(n)
    }

    fn enable_forwarding(&self) -> Result<(), OsNetError> {
        let record = self.record_path();
        let present: Vec<(&'static str, bool)> = FORWARDING
            .into_iter()
            .filter(|(_, v6)| self.ipv6 || !v6)
            .collect();
        if !record.exists() {
            let mut values = Vec::new();
            for (name, _) in &present {
                let value = std::fs::read_to_string(sysctl_path(name)).map_err(|source| {
                    OsNetError::Sysctl {
                        action: "reading",
                        name,
                        source,
                    }
                })?;
                values.push((*name, value.trim().to_string()));
            }
            write_record(&record, &format_sysctl_record(&values))?;
        }
        for (name, _) in present {
            write_sysctl(name, "1")?;
        }
        Ok(())
    }
}

/// What [`OsNet::remove_all`] found.
#[derive(Debug, Default)]
struct Removed {
    routes: usize,
    rules: usize,
    sysctls: usize,
}

impl Removed {
    fn any(&self) -> bool {
        self.routes + self.rules + self.sysctls > 0
    }
}

/// A route's kind and, for tunnel routes, its output interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    kind: RouteKind,
    oif: Option<u32>,
}

fn route_message(net: IpNet, kind: RouteKind, oif: Option<u32>) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = Family::of(&net).netlink();
    msg.header.destination_prefix_length = net.prefix_len();
    msg.header.table = ROUTE_TABLE as u8;
    msg.header.protocol = RouteProtocol::Static;
    msg.header.kind = match kind {
        RouteKind::Tunnel => RouteType::Unicast,
        RouteKind::Throw => RouteType::Throw,
    };
    // As iproute2: an IPv4 route through a device without a gateway is scope link.
    msg.header.scope = match (kind, net) {
        (RouteKind::Tunnel, IpNet::V4(_)) => RouteScope::Link,
        _ => RouteScope::Universe,
    };
    if net.prefix_len() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                net.network(),
            )));
    }
    msg.attributes.push(RouteAttribute::Table(ROUTE_TABLE));
    if let Some(oif) = oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}

/// A delete request matching any route to `net` in table 52 (scope, protocol and type
/// unspecified, as `ip route del` sends it).
fn delete_message(net: IpNet) -> RouteMessage {
    let mut msg = route_message(net, RouteKind::Tunnel, None);
    msg.header.protocol = RouteProtocol::Unspec;
    msg.header.scope = RouteScope::NoWhere;
    msg.header.kind = RouteType::Unspec;
    msg
}

fn parse_route(msg: &RouteMessage) -> Option<(IpNet, Slot)> {
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    if table != ROUTE_TABLE {
        return None;
    }
    let dst = match (dst, msg.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    let net = IpNet::new(dst, msg.header.destination_prefix_length).ok()?;
    // Anything but unicast through one device and throw (a blackhole, a multipath route)
    // reads as a tunnel route without a device, which nothing wanted equals: it is replaced
    // or deleted.
    let slot = match msg.header.kind {
        RouteType::Throw => Slot {
            kind: RouteKind::Throw,
            oif: None,
        },
        RouteType::Unicast => Slot {
            kind: RouteKind::Tunnel,
            oif,
        },
        _ => Slot {
            kind: RouteKind::Tunnel,
            oif: None,
        },
    };
    Some((net, slot))
}

fn rule_message(rule: Rule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = rule.family.netlink();
    msg.attributes.push(RuleAttribute::Priority(rule.pref));
    if rule.bypass {
        msg.attributes.push(RuleAttribute::FwMark(BYPASS_MARK));
        msg.attributes.push(RuleAttribute::FwMask(MARK_MASK));
    }
    match rule.target {
        RuleTarget::Table(table) => {
            msg.header.action = RuleAction::ToTable;
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            if let Ok(t) = u8::try_from(table) {
                msg.header.table = t;
            }
            msg.attributes.push(RuleAttribute::Table(table));
        }
        RuleTarget::Unreachable => {
            msg.header.action = RuleAction::Unreachable;
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
        }
    }
    msg
}

/// Reads a dumped rule as one of warren's shape, if it could be one (it is warren's when
/// [`rules`] holds it).
fn parse_rule(msg: &RuleMessage) -> Option<Rule> {
    let family = match msg.header.family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    if msg.header.src_len != 0 || msg.header.dst_len != 0 {
        return None;
    }
    let mut pref = None;
    let mut mark = None;
    let mut mask = None;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => pref = Some(*p),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Table(t) => table = *t,
            // Interface, address, port or uid matches: not one of warren's.
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::Source(_)
            | RuleAttribute::Destination(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_)
            | RuleAttribute::Goto(_) => return None,
            _ => {}
        }
    }
    let bypass = match (mark, mask) {
        (None, _) => false,
        (Some(BYPASS_MARK), Some(MARK_MASK)) => true,
        _ => return None,
    };
    let target = match msg.header.action {
        RuleAction::ToTable => RuleTarget::Table(table),
        RuleAction::Unreachable => RuleTarget::Unreachable,
        _ => return None,
    };
    Some(Rule {
        family,
        pref: pref?,
        bypass,
        target,
    })
}

/// Runs `nft -f -` with `script` on stdin, off the runtime's thread.
async fn run_nft(script: String) -> Result<(), NftCause> {
    let run = move || {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NftCause::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(NftCause::Spawn)?;
        }
        let out = child.wait_with_output().map_err(NftCause::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NftCause::Failed {
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    };
    match tokio::task::spawn_blocking(run).await {
        Ok(result) => result,
        Err(e) => Err(NftCause::Spawn(io::Error::other(e))),
    }
}

/// Removes the nft table; without `nft` there can be no table of ours, so that is no error.
async fn remove_nft_table() -> Result<(), OsNetError> {
    match run_nft(nft_remove_script()).await {
        Ok(()) => Ok(()),
        Err(NftCause::Spawn(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(cause) => Err(OsNetError::Nft {
            action: "removing",
            cause,
        }),
    }
}

fn write_sysctl(name: &'static str, value: &str) -> Result<(), OsNetError> {
    std::fs::write(sysctl_path(name), value).map_err(|source| OsNetError::Sysctl {
        action: "writing",
        name,
        source,
    })
}

fn write_record(path: &Path, text: &str) -> Result<(), OsNetError> {
    let err = |source| OsNetError::SysctlRecord {
        action: "writing",
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.write_all(text.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// Writes the recorded values back and removes the record; returns how many were restored.
fn restore_sysctls(record: &Path) -> Result<usize, OsNetError> {
    let text = match std::fs::read_to_string(record) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(OsNetError::SysctlRecord {
                action: "reading",
                path: record.to_path_buf(),
                source,
            });
        }
    };
    let values = parse_sysctl_record(&text).map_err(|line| OsNetError::BadSysctlRecord {
        path: record.to_path_buf(),
        line,
    })?;
    for (name, value) in &values {
        write_sysctl(name, value)?;
    }
    std::fs::remove_file(record).map_err(|source| OsNetError::SysctlRecord {
        action: "removing",
        path: record.to_path_buf(),
        source,
    })?;
    tracing::debug!(?values, "forwarding sysctls restored");
    Ok(values.len())
}

/// The host's own LAN prefixes, for allow-LAN-access: the networks of the addresses on every
/// interface but `tun` and loopback, without link-local ones. Empty when interfaces cannot be
/// listed.
pub fn lan_prefixes(tun: &str) -> Vec<IpNet> {
    let addrs = match if_addrs::get_if_addrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list interfaces for LAN access");
            return Vec::new();
        }
    };
    lan_prefixes_of(
        tun,
        addrs.iter().map(|i| {
            let (ip, len) = match &i.addr {
                if_addrs::IfAddr::V4(a) => (IpAddr::V4(a.ip), a.prefixlen),
                if_addrs::IfAddr::V6(a) => (IpAddr::V6(a.ip), a.prefixlen),
            };
            (i.name.as_str(), ip, len)
        }),
    )
}

/// [`lan_prefixes`] over a given list of `(interface, address, prefix length)`.
pub fn lan_prefixes_of<'a>(
    tun: &str,
    addrs: impl IntoIterator<Item = (&'a str, IpAddr, u8)>,
) -> Vec<IpNet> {
    let set: BTreeSet<IpNet> = addrs
        .into_iter()
        .filter(|(name, ip, _)| {
            *name != tun
                && !ip.is_loopback()
                && !ip.is_unspecified()
                && !match ip {
                    IpAddr::V4(a) => a.is_link_local(),
                    IpAddr::V6(a) => a.is_unicast_link_local(),
                }
        })
        .filter_map(|(_, ip, len)| IpNet::new(ip, len).ok().map(|n| n.trunc()))
        .collect();
    set.into_iter().collect()
}

/// Marks a socket so its traffic skips table 52 (`SO_MARK` = [`BYPASS_MARK`]): the node's
/// own WireGuard/STUN UDP, DERP TCP, control gRPC and DNS upstream sockets, which must leave
/// by the host's routes even when the tunnel routes everything. Needs `CAP_NET_ADMIN`.
pub fn mark_socket(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket2::SockRef::from(&fd).set_mark(BYPASS_MARK)
}

/// The mark for the node's own sockets when this process may set one, else `None`: probed
/// once per process on a throwaway socket; without `CAP_NET_ADMIN` a warning is logged once
/// and the node runs unmarked (its own traffic may then follow its routes into the tunnel).
pub fn own_socket_mark() -> Option<u32> {
    static MARK: OnceLock<Option<u32>> = OnceLock::new();
    *MARK.get_or_init(|| {
        let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .and_then(|s| s.set_mark(BYPASS_MARK));
        match probe {
            Ok(()) => Some(BYPASS_MARK),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot mark the node's own sockets (needs CAP_NET_ADMIN): with subnet \
                     routes or an exit node in use their traffic may loop into the tunnel"
                );
                None
            }
        }
    })
}

/// Marks one of the node's own sockets with [`own_socket_mark`] when there is one. Never
/// fails: a socket that cannot be marked is logged (`what` names it) and used as it is.
pub fn mark_own_socket(fd: BorrowedFd<'_>, what: &'static str) {
    if own_socket_mark().is_some()
        && let Err(e) = mark_socket(fd)
    {
        tracing::warn!(socket = what, error = %e, "cannot mark socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    #[test]
    fn route_plan_adds_new_replaces_changed_deletes_gone() {
        let current: BTreeMap<IpNet, RouteKind> = [
            (net("10.0.0.0/24"), RouteKind::Tunnel),
            (net("10.1.0.0/24"), RouteKind::Tunnel),
            (net("192.168.1.0/24"), RouteKind::Tunnel),
        ]
        .into();
        let wanted = wanted_routes(
            &[
                net("10.0.0.0/24"),
                net("10.2.0.5/16"),
                net("192.168.1.0/24"),
            ],
            &[net("192.168.1.0/24")],
        );
        let plan = plan_routes(&current, &wanted);
        assert_eq!(
            plan.add,
            [
                (net("10.2.0.0/16"), RouteKind::Tunnel),
                (net("192.168.1.0/24"), RouteKind::Throw)
            ]
        );
        assert_eq!(plan.delete, [net("10.1.0.0/24")]);
        let same = plan_routes(&wanted, &wanted);
        assert!(same.add.is_empty() && same.delete.is_empty());
        let none = plan_routes(&wanted, &BTreeMap::new());
        assert_eq!(none.delete.len(), 3);
    }

    #[test]
    fn nft_ruleset_matches_tailscale_forward_and_snat() {
        assert_eq!(
            nft_ruleset("wt0", RouterConfig { snat: true }),
            "table inet warren\n\
             delete table inet warren\n\
             table inet warren {\n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"wt0\" meta mark set meta mark & 0xff00ffff | 0x00040000 accept\n\
             \t\toifname \"wt0\" ip saddr 100.64.0.0/10 drop\n\
             \t\toifname \"wt0\" accept\n\
             \t}\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark & 0x00ff0000 == 0x00040000 masquerade\n\
             \t}\n\
             }\n"
        );
        let no_snat = nft_ruleset("wt0", RouterConfig { snat: false });
        assert!(!no_snat.contains("postrouting"), "{no_snat}");
        assert!(no_snat.ends_with("\t}\n}\n"), "{no_snat}");
        assert_eq!(
            nft_remove_script(),
            "table inet warren\ndelete table inet warren\n"
        );
    }

    #[test]
    fn sysctl_record_round_trips_and_refuses_anything_else() {
        let text = format_sysctl_record(&[
            ("net.ipv4.ip_forward", "0".into()),
            ("net.ipv6.conf.all.forwarding", "1".into()),
        ]);
        assert_eq!(
            parse_sysctl_record(&text),
            Ok(vec![
                ("net.ipv4.ip_forward", "0".to_string()),
                ("net.ipv6.conf.all.forwarding", "1".to_string())
            ])
        );
        assert_eq!(
            parse_sysctl_record("kernel.core_pattern=|/bin/sh"),
            Err("kernel.core_pattern=|/bin/sh".to_string())
        );
        assert_eq!(
            parse_sysctl_record("net.ipv4.ip_forward=1 2"),
            Err("net.ipv4.ip_forward=1 2".to_string())
        );
        assert_eq!(
            sysctl_path("net.ipv6.conf.all.forwarding"),
            Path::new("/proc/sys/net/ipv6/conf/all/forwarding")
        );
    }

    #[test]
    fn rules_are_tailscales_and_read_back_as_ours() {
        let shown: Vec<String> = rules(Family::V4).iter().map(Rule::to_string).collect();
        assert_eq!(
            shown,
            [
                "IPv4 5210: from all fwmark 0x80000/0xff0000 lookup main",
                "IPv4 5230: from all fwmark 0x80000/0xff0000 lookup default",
                "IPv4 5250: from all fwmark 0x80000/0xff0000 unreachable",
                "IPv4 5270: from all lookup 52",
            ]
        );
        for family in [Family::V4, Family::V6] {
            for rule in rules(family) {
                assert_eq!(parse_rule(&rule_message(rule)), Some(rule));
            }
        }
        // Same preference, another shape: not ours.
        let mut other = rule_message(rules(Family::V4)[3]);
        other.attributes.push(RuleAttribute::Iifname("eth0".into()));
        assert_eq!(parse_rule(&other), None);
        let mut other = rule_message(rules(Family::V4)[0]);
        other
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::FwMask(_)));
        assert_eq!(parse_rule(&other), None);
    }

    #[test]
    fn route_messages_read_back() {
        for (s, kind, oif) in [
            ("10.20.0.0/24", RouteKind::Tunnel, Some(7)),
            ("0.0.0.0/0", RouteKind::Tunnel, Some(7)),
            ("::/0", RouteKind::Tunnel, Some(7)),
            ("192.168.1.0/24", RouteKind::Throw, None),
        ] {
            let msg = route_message(net(s), kind, oif);
            assert_eq!(parse_route(&msg), Some((net(s), Slot { kind, oif })), "{s}");
        }
    }

    #[test]
    fn errors_name_operation_and_object() {
        let e = OsNetError::AddRoute {
            route: net("10.20.0.0/24"),
            kind: RouteKind::Tunnel,
            cause: NetlinkCause::Errno(Errno(17)),
        };
        assert_eq!(
            e.to_string(),
            "adding route 10.20.0.0/24 to table 52: File exists"
        );
        let e = OsNetError::AddRule {
            rule: rules(Family::V6)[2],
            cause: NetlinkCause::Errno(Errno(1)),
        };
        assert_eq!(
            e.to_string(),
            "adding ip rule IPv6 5250: from all fwmark 0x80000/0xff0000 unreachable: \
             Operation not permitted"
        );
    }

    #[test]
    fn lan_prefixes_skip_tunnel_loopback_and_link_local() {
        let addrs = [
            ("lo", "127.0.0.1".parse().expect("ip"), 8),
            ("wt0", "100.64.0.1".parse().expect("ip"), 32),
            ("eth0", "192.168.1.10".parse().expect("ip"), 24),
            ("eth0", "fd00:1::10".parse().expect("ip"), 64),
            ("eth0", "fe80::1".parse().expect("ip"), 64),
            ("eth1", "169.254.3.4".parse().expect("ip"), 16),
            ("eth2", "192.168.1.11".parse().expect("ip"), 24),
        ];
        assert_eq!(
            lan_prefixes_of("wt0", addrs),
            [net("192.168.1.0/24"), net("fd00:1::/64")]
        );
    }
}
