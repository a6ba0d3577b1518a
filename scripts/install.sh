#!/usr/bin/env bash
# Install (or upgrade) minicloud on this node from this checkout and start the agent:
#
#     ./scripts/install.sh            (as root; from another account: sudo ./scripts/install.sh)
#     ./scripts/install.sh --uninstall [--purge] [--force]     (remove it again: scripts/uninstall.sh)
#
# On a fresh Debian 12: installs the system packages (scripts/packages.txt), creates a virtual environment in
# $MINICLOUD_PREFIX/venv with this checkout installed (not editable), links /usr/local/bin/minicloud, writes
# /etc/minicloud/minicloud.toml (commented defaults) if there is none, starts libvirtd, starts the agent (a systemd
# service where systemd is PID 1, otherwise a background process), waits for it, gives libvirtd its TLS listener for
# migrations (scripts/libvirt-tls: a managed block in /etc/libvirt/libvirtd.conf and qemu.conf) and runs
# `minicloud init`.
#
# Running it again is safe: it upgrades the package and restarts the agent when the installed package (or the
# unit file) changed; an agent that is up to date and healthy is left running. The config file is never
# overwritten.
#
# Environment:
#   MINICLOUD_PREFIX=/opt/minicloud   where the virtual environment goes ($MINICLOUD_PREFIX/venv)
#   MINICLOUD_SKIP_APT=1              do not run apt-get (the packages are already there; tests)
#   MINICLOUD_LIBVIRT_TLS=off         leave libvirtd without its TLS listener (no migrations to this node)
#   MINICLOUD_CONFIG, MINICLOUD_DATA_DIR, MINICLOUD_SOCKET, MINICLOUD_LISTEN, ...
#                                     honoured as by `minicloud agent` when it is started in the background;
#                                     the systemd unit does not see them (use `systemctl edit minicloud`).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# `install.sh --uninstall [--purge] [--force]`: remove minicloud from this node (see scripts/uninstall.sh).
if [ "${1:-}" = "--uninstall" ]; then
    shift
    exec "$REPO/scripts/uninstall.sh" "$@"
fi
PREFIX=${MINICLOUD_PREFIX:-/opt/minicloud}
VENV=$PREFIX/venv
MINICLOUD=$VENV/bin/minicloud
CONFIG=${MINICLOUD_CONFIG:-/etc/minicloud/minicloud.toml}
UNIT_SRC=$REPO/systemd/minicloud.service
UNIT_DST=/etc/systemd/system/minicloud.service
LOG_DIR=/var/log/minicloud
AGENT_LOG=$LOG_DIR/agent.log
HEALTH_WAIT=60
STAMP=$PREFIX/.installed-fingerprint

# ---- helpers ----------------------------------------------------------------------------------------------------
step_started=$SECONDS
step() {
    printf '\n==> %s\n' "$*"
    step_started=$SECONDS
}
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '\nERROR: install.sh failed (exit %s) in the step above, after %s s in it.\n' \
            "$rc" "$((SECONDS - step_started))" >&2
    fi
}
trap on_exit EXIT

under_systemd() {
    [ -d /run/systemd/system ] || [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}

# Packages from scripts/packages.txt: '#' comments and blank lines ignored.
read_packages() {
    awk '{ sub(/#.*/, ""); for (i = 1; i <= NF; i++) print $i }' "$REPO/scripts/packages.txt"
}

# The value of an agent setting as the agent will see it (file < environment), e.g. `setting socket`.
setting() {
    "$MINICLOUD" -o json config show --config "$CONFIG" |
        "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["agent"][sys.argv[1]])' "$1"
}

healthy() {
    curl -fsS --max-time 3 --unix-socket "$SOCKET" -o /dev/null http://localhost/healthz 2>/dev/null
}

wait_healthy() {
    local deadline=$((SECONDS + HEALTH_WAIT))
    until healthy; do
        if [ -n "${1:-}" ] && ! kill -0 "$1" 2>/dev/null; then
            return 1
        fi
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

# What is installed, minus compiled bytecode and direct_url.json (it names the temporary build directory):
# changes exactly when the installed files or the unit file change.
fingerprint() {
    {
        "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
record = md.distribution("minicloud").read_text("RECORD") or ""
print("\n".join(sorted(line for line in record.splitlines() if ".pyc," not in line and "/direct_url.json," not in line)))
EOF
        if under_systemd; then cat "$UNIT_SRC"; fi
        printf 'prefix=%s\n' "$PREFIX"
    } | sha256sum | cut -d' ' -f1
}

# The pid of a background agent (our pid file, else <data_dir>/agent.json), if it is alive and is minicloud.
agent_pid() {
    local pid=""
    if [ -s "$PIDFILE" ]; then
        pid=$(cat "$PIDFILE")
    elif [ -s "$DATA_DIR/agent.json" ]; then
        pid=$("$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' \
            "$DATA_DIR/agent.json" 2>/dev/null || true)
    fi
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'minicloud.* agent' || return 1
    echo "$pid"
}

stop_background_agent() {
    local pid
    pid=$(agent_pid) || { rm -f "$PIDFILE"; return 0; }
    info "stopping the running agent (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "agent (pid $pid) did not stop within 30 s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$PIDFILE"
}

start_background_agent() {
    mkdir -p "$LOG_DIR" "$(dirname "$PIDFILE")"
    chmod 0755 "$(dirname "$PIDFILE")"
    chmod 0750 "$LOG_DIR"
    {
        printf '\n==== %s: starting minicloud agent (install.sh)\n' "$(date -Is)"
    } >>"$AGENT_LOG"
    # Same umask and file limit as the systemd unit. `exec` keeps the pid written to the pid file the agent's.
    (
        umask 0077
        ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        export PYTHONUNBUFFERED=1
        # shellcheck disable=SC2016  # $$ and "$@" are expanded by the inner shell
        setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" "$MINICLOUD" agent --config "$CONFIG" \
            </dev/null >>"$AGENT_LOG" 2>&1 &
    )
    for _ in $(seq 1 50); do
        [ -s "$PIDFILE" ] && break
        sleep 0.1
    done
    [ -s "$PIDFILE" ] || die "the agent did not start; see $AGENT_LOG"
}

# ---- 0. preconditions -------------------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root: as root, $0; from another account, sudo $0"
if [ ! -f "$REPO/pyproject.toml" ] || [ ! -f "$UNIT_SRC" ]; then
    die "run this from a minicloud checkout ($REPO lacks pyproject.toml or systemd/minicloud.service)"
fi
# shellcheck disable=SC1091
os=$( (. /etc/os-release && echo "$ID $VERSION_ID ${PRETTY_NAME:-}") 2>/dev/null || echo "unknown")
case $os in
"debian 12 "*) ;;
*) warn "this script is written for Debian 12; found ${os#* * }. Continuing." ;;
esac
SYSTEMD=no
if under_systemd; then SYSTEMD=yes; fi

# ---- 1. system packages -----------------------------------------------------------------------------------------
if [ "${MINICLOUD_SKIP_APT:-0}" = 1 ]; then
    step "System packages: skipped (MINICLOUD_SKIP_APT=1)"
else
    step "System packages (apt-get)"
    mapfile -t packages < <(read_packages)
    # With systemd, libvirtd runs as Debian's libvirtd.service (it comes with libvirt-daemon-system, which also
    # creates the libvirt-qemu user and /etc/libvirt/qemu.conf). Without systemd scripts/start-libvirtd runs
    # libvirtd itself, and that package would only pull in polkit, iptables and the libvirt default network.
    if [ "$SYSTEMD" = yes ]; then packages+=(libvirt-daemon-system); fi
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-o Acquire::Retries=3 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    apt-get "${apt_opts[@]}" -q update
    apt-get "${apt_opts[@]}" -q -y install --no-install-recommends "${packages[@]}"
    info "installed: ${packages[*]}"
    if [ "$SYSTEMD" = yes ]; then
        # etcd-server starts a stand-alone etcd.service, victoria-metrics a stand-alone victoria-metrics.service,
        # and libvirt-daemon-system a NATed 'default' network with iptables rules. minicloud supervises its own
        # etcd members and TSDB (agent/tsdb.py) and builds its own bridges, so none should run behind its back.
        systemctl disable --now etcd.service >/dev/null 2>&1 || true
        systemctl disable --now victoria-metrics.service >/dev/null 2>&1 || true
        virsh -c qemu:///system net-autostart default --disable >/dev/null 2>&1 || true
        virsh -c qemu:///system net-destroy default >/dev/null 2>&1 || true
    fi
fi
for cmd in /usr/bin/python3 libvirtd virsh curl; do
    command -v "$cmd" >/dev/null || die "$cmd is missing; run without MINICLOUD_SKIP_APT=1 (or install scripts/packages.txt)"
done

# ---- 2. the Python package --------------------------------------------------------------------------------------
step "minicloud into $VENV"
before=""
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(0)' 2>/dev/null; then
    before=$(cat "$STAMP" 2>/dev/null || true)
else
    rm -rf "$VENV"
    mkdir -p "$PREFIX"
    /usr/bin/python3 -m venv "$VENV"
    info "created $VENV ($("$VENV/bin/python" --version))"
fi
# Build from a copy: an in-tree build would leave root-owned build/ and *.egg-info in the user's checkout.
# --upgrade: the package is always rebuilt and reinstalled; dependencies are upgraded only where it requires it.
src=$(mktemp -d)
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C "$src" -xf -
"$VENV/bin/pip" install --disable-pip-version-check --no-input -q --upgrade "$src[agent]"
rm -rf "$src"
ln -sfn "$MINICLOUD" /usr/local/bin/minicloud
after=$(fingerprint)
info "$("$MINICLOUD" --version) installed; /usr/local/bin/minicloud -> $MINICLOUD"

# ---- 3. configuration -------------------------------------------------------------------------------------------
step "Configuration ($CONFIG)"
if [ -e "$CONFIG" ]; then
    info "exists; left as it is"
else
    mkdir -p "$(dirname "$CONFIG")"
    cat >"$CONFIG" <<'EOF'
# minicloud agent configuration. Every setting is optional: the commented-out values are the defaults.
# Precedence: built-in defaults < this file < environment (MINICLOUD_*) < `minicloud agent` flags.
# Check it with `minicloud config validate`, show the effective values with `minicloud config show`,
# and restart the agent after a change (`systemctl restart minicloud`).

[agent]
# State: the store, the cluster CA and certificates.
#data_dir = "/var/lib/minicloud"
# Unix socket for local root (trusted, no token needed).
#socket = "/run/minicloud/minicloud.sock"
# HTTPS address for remote clients and other nodes, "HOST:PORT" ("[::]:8443" for IPv6);
# port 0 picks a free port; "" disables HTTPS.
#listen = "0.0.0.0:8443"
# This node's name in the cluster; "" means the host name.
#node_name = ""
# "debug", "info", "warning" or "error".
#log_level = "info"
# Log one line per HTTP request at info level.
#access_log = true

[api]
# Largest accepted request body in bytes (1024 to 67108864).
#max_body_bytes = 1048576
# How long an Idempotency-Key is remembered, in seconds (at least 60).
#idempotency_ttl = 86400
# The most revisions of change history kept for resuming GET /v1/events (at least 1000).
#retain_changes = 100000
# Requests per second each principal may make over HTTPS (429 beyond it), and the burst allowed.
#rate_limit_rps = 200.0
#rate_limit_burst = 400

[cluster]
# The address other nodes reach this one on (default: the listen host if specific, else the first IPv4 address).
#address = ""
# etcd's client and peer ports (mutual TLS, cluster CA only); used once `minicloud cluster enable` or `join` ran.
#etcd_client_port = 2379
#etcd_peer_port = 2380

[network]
# Instances created without --nic get their project's default VPC (network, subnet and router "default", SNAT out
# through the "host" network: this node's default bridge). Set it on every node of a cluster. Off: such instances
# get a NIC on the node's default bridge (the built-in default, kept for existing setups).
default_vpc = true
EOF
    chmod 0644 "$CONFIG"
    info "written with commented defaults"
fi
"$MINICLOUD" config validate --config "$CONFIG" || die "$CONFIG is not valid (see above); fix it and re-run"
SOCKET=$(setting socket)
DATA_DIR=$(setting data_dir)
# Background agent only: next to the socket, so /run/minicloud/agent.pid by default.
PIDFILE=$(dirname "$SOCKET")/agent.pid

# ---- 4. libvirtd ------------------------------------------------------------------------------------------------
step "libvirtd"
"$REPO/scripts/start-libvirtd"

# ---- 5. the agent -----------------------------------------------------------------------------------------------
if [ "$SYSTEMD" = yes ]; then
    step "minicloud agent (systemd service minicloud.service)"
    for var in MINICLOUD_CONFIG MINICLOUD_DATA_DIR MINICLOUD_SOCKET MINICLOUD_LISTEN MINICLOUD_NODE_NAME MINICLOUD_LOG_LEVEL; do
        if [ -n "${!var:-}" ]; then
            warn "$var is set here but the systemd service does not see it; put it in $CONFIG or a drop-in (systemctl edit minicloud)"
        fi
    done
    # The unit names /opt/minicloud/venv; follow MINICLOUD_PREFIX.
    unit_tmp=$(mktemp)
    sed "s#/opt/minicloud/venv/#$VENV/#g" "$UNIT_SRC" >"$unit_tmp"
    if ! cmp -s "$unit_tmp" "$UNIT_DST" 2>/dev/null; then
        install -m 0644 "$unit_tmp" "$UNIT_DST"
        info "installed $UNIT_DST"
    fi
    rm -f "$unit_tmp"
    systemctl daemon-reload
    systemctl enable minicloud.service >/dev/null 2>&1 || die "systemctl enable minicloud failed"
    if systemctl is-active --quiet minicloud.service && [ "$before" = "$after" ] && healthy; then
        info "already running, healthy and up to date: left running"
    else
        # Type=notify: restart returns once the agent has sent READY=1 (or has failed).
        if ! systemctl restart minicloud.service; then
            journalctl -u minicloud.service -n 40 --no-pager >&2 || true
            die "minicloud.service failed to start (journalctl -u minicloud)"
        fi
        info "(re)started minicloud.service"
    fi
    LOGS="journalctl -u minicloud -f"
else
    step "minicloud agent (background process)"
    pid=""
    if pid=$(agent_pid) && healthy && [ "$before" = "$after" ]; then
        info "already running (pid $pid), healthy and up to date: left running"
        # Adopt an agent that was found through agent.json.
        [ -s "$PIDFILE" ] || echo "$pid" >"$PIDFILE"
    else
        stop_background_agent
        if healthy; then
            die "something else already answers on $SOCKET; stop it first"
        fi
        start_background_agent
        pid=$(cat "$PIDFILE")
        info "started (pid $pid), logging to $AGENT_LOG"
    fi
    cat <<EOF

    NOTE: systemd is not PID 1 here (a container, CI or a VM without systemd), so the agent runs as a
    background process (setsid), not as a service. It is NOT supervised: nothing restarts it if it crashes,
    and it does not start again after a reboot. Run this script again (or the command below) to start it.
      start:  setsid nohup $MINICLOUD agent --config $CONFIG </dev/null >>$AGENT_LOG 2>&1 &
      stop:   kill \$(cat $PIDFILE)
EOF
    LOGS="tail -f $AGENT_LOG"
fi

step "Waiting for the agent on $SOCKET"
if ! wait_healthy "${pid:-}"; then
    if [ "$SYSTEMD" = yes ]; then
        journalctl -u minicloud.service -n 40 --no-pager >&2 || true
    else
        tail -n 40 "$AGENT_LOG" >&2 || true
    fi
    die "the agent did not become healthy (GET /healthz on $SOCKET, waited up to ${HEALTH_WAIT} s); logs: $LOGS"
fi
info "healthy (curl --unix-socket $SOCKET http://localhost/healthz)"
echo "$after" >"$STAMP"

# ---- 5b. libvirtd's TLS listener: live migration between the nodes' libvirtds (docs/compute.md, "Migration") -------
# Only now: the agent made the node's certificate (<data_dir>/pki) at start-up, and libvirtd started with a TLS
# listener whose files are missing would not start at all. The files are laid out in libvirt's and QEMU's names by
# the agent's own function (it does the same at every compute resync), then scripts/libvirt-tls writes the managed
# blocks into libvirtd.conf and qemu.conf and scripts/start-libvirtd restarts libvirtd with the listener (guests keep
# running; the agent reconnects). A re-run changes nothing, or reloads a changed certificate (after `minicloud join`).
step "libvirtd TLS listener (migrations between nodes)"
if [ "${MINICLOUD_LIBVIRT_TLS:-on}" = off ]; then
    info "skipped (MINICLOUD_LIBVIRT_TLS=off): this node cannot be a migration target"
else
    tls_dir=$("$VENV/bin/python" -c 'import sys; from pathlib import Path; from agent.compute.migrate import write_tls_files; print(write_tls_files(Path(sys.argv[1])))' "$DATA_DIR") ||
        die "could not lay out the node's TLS files under $DATA_DIR/pki/libvirt (is $DATA_DIR/pki complete?)"
    changed=$("$REPO/scripts/libvirt-tls" enable "$DATA_DIR")
    if [ "$changed" = changed ]; then
        info "wrote the TLS listener (certificates in $tls_dir) into /etc/libvirt/libvirtd.conf and qemu.conf"
    fi
    LIBVIRTD_RESTART=$([ "$changed" = changed ] && echo 1 || echo 0) "$REPO/scripts/start-libvirtd"
    info "libvirtd listens on TLS port 16514 (cluster CA only: no plain TCP listener)"
fi

# ---- 6. first-time initialisation -------------------------------------------------------------------------------
step "minicloud init"
"$MINICLOUD" --socket "$SOCKET" init

# ---- 6b. storage: Ceph on this node (a file OSD under the data directory) when the node has room for it ----------
# MINICLOUD_STORAGE=auto (default) | on | off. auto: only a single node that has no storage yet, with at least
# 4 GiB of RAM and MINICLOUD_STORAGE_FILE_SIZE (default 10G) + 10 GiB free under the data directory. Ceph idles at
# ~0.75 GiB RSS; add real disks later with `minicloud storage disk add /dev/sdX`.
STORAGE=${MINICLOUD_STORAGE:-auto}
STORAGE_FILE_SIZE=${MINICLOUD_STORAGE_FILE_SIZE:-10G}
step "Storage (Ceph)"
if [ "$STORAGE" = off ]; then
    info "skipped (MINICLOUD_STORAGE=off); later: minicloud storage enable --wait"
elif "$MINICLOUD" --socket "$SOCKET" -o json storage show 2>/dev/null | grep -q '"enabled": *true'; then
    info "already enabled (minicloud storage show)"
else
    mem_kib=$(awk '/MemTotal/ { print $2 }' /proc/meminfo)
    size_gib=$("$VENV/bin/python" -c 'import sys; from minicloud.cli.storage import parse_size; print(parse_size(sys.argv[1]) >> 30)' "$STORAGE_FILE_SIZE" 2>/dev/null || echo 10)
    free_gib=$(df -P -BG "$DATA_DIR" 2>/dev/null | awk 'NR == 2 { sub("G", "", $4); print $4 }')
    # A node that enabled or joined a cluster has cluster.json: storage there is the operator's decision.
    single=yes
    [ ! -e "$DATA_DIR/cluster.json" ] || single=no
    if [ "$STORAGE" = on ] || { [ "${mem_kib:-0}" -ge $((4 << 20)) ] && [ "${free_gib:-0}" -ge $((size_gib + 10)) ] && [ "$single" = yes ]; }; then
        if "$MINICLOUD" --socket "$SOCKET" storage enable --file-size "$STORAGE_FILE_SIZE" --wait --timeout 300 >/dev/null; then
            info "Ceph is ready: one monitor, one manager and a $STORAGE_FILE_SIZE file OSD (minicloud storage show)"
        else
            warn "storage enable did not finish; see minicloud storage show"
        fi
    else
        info "skipped: needs 4 GiB of RAM and $((size_gib + 10)) GiB free in $DATA_DIR (MINICLOUD_STORAGE=on forces it)"
    fi
fi

# ---- 7. the default image: the small test guest, so a first `instance create` works offline ----------------------
step "Default image 'guest'"
if "$MINICLOUD" --socket "$SOCKET" image show guest >/dev/null 2>&1; then
    info "already imported (minicloud image show guest)"
else
    # <data_dir>/import is always an allowed image directory; the kernel package is cached for offline rebuilds.
    GUEST_DIR=$DATA_DIR/import/guest
    mkdir -p "$LOG_DIR"
    if "$REPO/scripts/build-guest-image" "$GUEST_DIR" >"$LOG_DIR/build-guest-image.log" 2>&1; then
        "$MINICLOUD" --socket "$SOCKET" -o json image import guest --kernel "$GUEST_DIR/vmlinuz" \
            --initrd "$GUEST_DIR/initrd.img" --os-distro busybox --description "minicloud test guest" >/dev/null
        info "imported from $GUEST_DIR (built by scripts/build-guest-image)"
    else
        warn "could not build the test guest (see $LOG_DIR/build-guest-image.log); import an image yourself"
    fi
fi

# For the "from another machine" hint: the HTTPS port and the CA fingerprint the agent published.
LISTEN=$(setting listen)
FINGERPRINT=$("$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["ca_fingerprint"])' \
    "$DATA_DIR/agent.json" 2>/dev/null || echo "sha256:...")
HOST=$(hostname -f 2>/dev/null || hostname)
NAME=$(hostname -s 2>/dev/null || echo mynode)

trap - EXIT
cat <<EOF

==> Done: $("$MINICLOUD" --version) is installed and the agent is running.

What to try next (as root on this node: the local socket needs no API key):
  minicloud node show                                   # this node: CPUs, memory, virtualisation
  minicloud keypair import NAME ~/.ssh/id_ed25519.pub   # an SSH public key to inject into instances
  minicloud keypair list
  minicloud instance create vm1 --image guest --type m1.tiny --wait   # a first VM (the small test guest)
  minicloud instance list                               # its address on the default network
  minicloud instance console vm1                        # its serial console
EOF
if [ -n "$LISTEN" ]; then
    cat <<EOF
From another machine, with the admin API key that \`minicloud init\` printed (it is shown only once):
  minicloud remote add $NAME https://$HOST:${LISTEN##*:} --token KEY --fingerprint $FINGERPRINT
  minicloud --remote $NAME node show
More API keys: minicloud apikey create NAME
EOF
else
    echo "HTTPS is disabled (agent.listen = \"\" in $CONFIG): only the local socket serves the API."
fi
cat <<EOF

Configuration: $CONFIG   (minicloud config validate; minicloud config show)
Logs:          $LOGS
Upgrade:       git pull && ./scripts/install.sh       (as root; from another account with sudo)
Uninstall:     ./scripts/install.sh --uninstall [--purge]   (--purge also deletes $DATA_DIR and $CONFIG)
EOF
