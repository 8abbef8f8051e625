# shellcheck shell=bash
# Shared by scripts/test and scripts/demo: root, tools, cargo, headers. Source it; don't run it.

# Repository root (the directory above scripts/).
WARREN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

section() {
    printf '\n\033[1m==> %s\033[0m\n' "$*"
}

die() {
    echo "error: $*" >&2
    exit 1
}

# Re-executes the calling script as root (with sudo if present), or explains and exits.
# Usage: ensure_root "$@"
ensure_root() {
    if [ "$(id -u)" -eq 0 ]; then
        return 0
    fi
    if command -v sudo >/dev/null 2>&1; then
        echo "not root: re-running with sudo" >&2
        # sudo sets HOME to root's: keep this user's rustup toolchains and cargo home.
        export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
        exec sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME,CARGO_TARGET_DIR,RUST_LOG \
            "$(realpath "$0")" "$@"
    fi
    die "this script needs root (network namespaces, TUN devices) and sudo is not installed; run it as root"
}

# netns_add NS: a network namespace with its own /etc/resolv.conf (/etc/netns/NS/resolv.conf,
# which `ip netns exec` mounts over the host's): a node inside that points "the" resolver at
# MagicDNS rewrites that copy, never the host's file. netns_del removes both.
netns_add() {
    mkdir -p "/etc/netns/$1"
    cat /etc/resolv.conf >"/etc/netns/$1/resolv.conf" 2>/dev/null || : >"/etc/netns/$1/resolv.conf"
    ip netns add "$1"
}
netns_del() {
    ip netns del "$1" 2>/dev/null
    rm -rf "/etc/netns/$1"
}

# Installs the packages of missing commands with apt-get (one `apt-get update` at most): what
# the node, the demo and the lab need. Usage: ensure_tools [command:package ...] for more.
ensure_tools() {
    local missing=() cmd pkg
    # command:package; cc is the linker rustc needs (and the C compiler of ring and SQLite),
    # libc6-dev its C library headers and crt files (only recommended by gcc on Debian).
    for pair in ip:iproute2 ping:iputils-ping nft:nftables conntrack:conntrack kill:procps sysctl:procps setpriv:util-linux cc:gcc cc:libc6-dev "$@"; do
        cmd="${pair%%:*}"
        pkg="${pair#*:}"
        # `type -P`: a program file, not a shell builtin (the lab runs /usr/bin/kill).
        if ! type -P "$cmd" >/dev/null 2>&1 && [[ " ${missing[*]} " != *" $pkg "* ]]; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages ${missing[*]} and no apt-get to install them; install them by hand"
    section "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Install from the current lists first; update them only when that fails.
    apt-get install -y --no-install-recommends "${missing[@]}" || {
        apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"
    }
}

# ensure_tools plus what only the tests use: a STUN client and xz (interop and the policy
# captures), dig (MagicDNS), systemd-analyze (contrib/systemd; a container has no systemd),
# chromium and its WebDriver, spoken with curl (the web admin page in a real browser), and
# PostgreSQL (several control instances on one database).
ensure_test_tools() {
    local postgres=()
    # Debian keeps PostgreSQL's initdb and pg_ctl off PATH (/usr/lib/postgresql/N/bin): the tests
    # of several control instances start a throwaway server with them.
    if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! type -P initdb >/dev/null 2>&1; then
        postgres=(initdb:postgresql)
    fi
    ensure_tools stun:stun-client xz:xz-utils dig:bind9-dnsutils systemd-analyze:systemd \
        chromium:chromium chromedriver:chromium-driver curl:curl "${postgres[@]}"
}

# Makes sure cargo is on PATH (root's PATH often lacks ~/.cargo/bin, also after sudo).
ensure_cargo() {
    if command -v cargo >/dev/null 2>&1; then
        return 0
    fi
    local home
    for home in "${CARGO_HOME:-}" "$HOME/.cargo" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo"}; do
        if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
            export PATH="$home/bin:$PATH"
            return 0
        fi
    done
    die "cargo not found: install Rust (https://rustup.rs), then run this again"
}

# Directory holding the built binaries ($WARREN_BIN_DIR overrides, as in the netns tests).
bin_dir() {
    echo "${WARREN_BIN_DIR:-${CARGO_TARGET_DIR:-$WARREN_ROOT/target}/debug}"
}

# Polls COMMAND until it succeeds or SECONDS pass. Usage: wait_for SECONDS WHAT COMMAND...
wait_for() {
    local secs="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "timed out after ${secs}s waiting until $what" >&2
            return 1
        fi
        sleep 0.2
    done
}
