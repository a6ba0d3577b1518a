#!/usr/bin/env bash
# Remove minicloud from this node (what scripts/install.sh and the agent put on it):
#
#     ./scripts/install.sh --uninstall [--purge] [--force]     (as root; or: sudo ./scripts/install.sh --uninstall)
#
# Stops, in this order: the agent (systemd unit or background process), the libvirt domains it defined (domains
# with minicloud metadata whose files are in this node's data directory) and the libvirt secrets they use, and every
# process started with a path in the data directory (the default network's dnsmasq, the etcd member, any other
# daemon it supervises). Then removes: the nftables tables (`ip minicloud-<bridge>`) and bridges of this node's
# networks (with the ports left on them), the systemd unit, /usr/local/bin/minicloud, the virtualenv
# ($MINICLOUD_PREFIX/venv), the runtime directory (/run/minicloud) and the bash completion file.
#
# Kept unless --purge: the data directory (/var/lib/minicloud: state, CA, images, disks), /etc/minicloud and
# /var/log/minicloud. System packages (libvirt, QEMU, dnsmasq, etcd, ...) are left installed.
#
# A node that is still a member of a cluster with other members is refused (its removal would cost the cluster a
# member without telling it): run `minicloud cluster remove NODE` on another member first, or pass --force.
#
# Environment (tests point these at temporary paths; the defaults are the real install's):
#   MINICLOUD_PREFIX=/opt/minicloud, MINICLOUD_CONFIG=/etc/minicloud/minicloud.toml,
#   MINICLOUD_UNIT_FILE=/etc/systemd/system/minicloud.service, MINICLOUD_BIN_LINK=/usr/local/bin/minicloud,
#   MINICLOUD_COMPLETION_FILE=/etc/bash_completion.d/minicloud, MINICLOUD_LOG_DIR=/var/log/minicloud,
#   MINICLOUD_DATA_DIR, MINICLOUD_SOCKET (as the agent reads them), MINICLOUD_LIBVIRT_URI=qemu:///system,
#   MINICLOUD_LIBVIRT_CONF_DIR=/etc/libvirt (where install.sh wrote libvirtd's TLS listener: scripts/libvirt-tls)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

PREFIX=${MINICLOUD_PREFIX:-/opt/minicloud}
VENV=$PREFIX/venv
CONFIG=${MINICLOUD_CONFIG:-/etc/minicloud/minicloud.toml}
UNIT_FILE=${MINICLOUD_UNIT_FILE:-/etc/systemd/system/minicloud.service}
BIN_LINK=${MINICLOUD_BIN_LINK:-/usr/local/bin/minicloud}
COMPLETION_FILE=${MINICLOUD_COMPLETION_FILE:-/etc/bash_completion.d/minicloud}
LOG_DIR=${MINICLOUD_LOG_DIR:-/var/log/minicloud}
LIBVIRT_URI=${MINICLOUD_LIBVIRT_URI:-qemu:///system}
PURGE=no
FORCE=no

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}
usage() {
    cat <<'EOF'
usage: scripts/install.sh --uninstall [--purge] [--force]
  --purge   also delete the data directory (state, CA, images, disks), /etc/minicloud and /var/log/minicloud
  --force   uninstall even though this node is still a member of a cluster with other members
EOF
}

for arg in "$@"; do
    case $arg in
    --purge) PURGE=yes ;;
    --force) FORCE=yes ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown option '$arg'"
        ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root (as root: ./scripts/install.sh --uninstall; otherwise with sudo)"

under_systemd() {
    [ -d /run/systemd/system ] || [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}

# Any Python will do for the small helpers below; the virtualenv's may already be gone.
PY=$(command -v python3 || true)
[ -x "$VENV/bin/python" ] && PY=$VENV/bin/python
[ -n "$PY" ] || die "python3 is missing"

# ---- 0. what this node's agent uses: data dir, socket, bridge (file < environment, as the agent reads them) ------
MINICLOUD=""
for candidate in "$VENV/bin/minicloud" "$BIN_LINK" "$(command -v minicloud || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        MINICLOUD=$candidate
        break
    fi
done
settings=""
if [ -n "$MINICLOUD" ]; then
    if [ -e "$CONFIG" ]; then
        settings=$("$MINICLOUD" -o json config show --config "$CONFIG" 2>/dev/null || true)
    else
        settings=$(env -u MINICLOUD_CONFIG "$MINICLOUD" -o json config show 2>/dev/null || true)
    fi
fi
if [ -z "$settings" ]; then
    # No minicloud left to ask (an uninstall run twice, a broken virtualenv): read the file and the environment
    # the same way (file < environment), so the data directory is the configured one, never a guessed default.
    settings=$("$PY" - "$CONFIG" <<'PYEOF'
import json, os, sys, tomllib
try:
    with open(sys.argv[1], "rb") as f:
        data = tomllib.load(f)
except FileNotFoundError:
    data = {}
for var, key in (("DATA_DIR", "data_dir"), ("SOCKET", "socket"), ("NODE_NAME", "node_name")):
    if os.environ.get(f"MINICLOUD_{var}"):
        data.setdefault("agent", {})[key] = os.environ[f"MINICLOUD_{var}"]
print(json.dumps(data))
PYEOF
    ) || die "cannot read $CONFIG; fix it, or set MINICLOUD_DATA_DIR and MINICLOUD_SOCKET"
fi
read_setting() { # section key default
    printf '%s' "$settings" | "$PY" -c '
import json, sys
data = json.load(sys.stdin)
value = data.get(sys.argv[1], {}).get(sys.argv[2])
print(sys.argv[3] if value in (None, "") else value)' "$1" "$2" "$3"
}
DATA_DIR=$(read_setting agent data_dir /var/lib/minicloud)
SOCKET=$(read_setting agent socket /run/minicloud/minicloud.sock)
NODE=$(read_setting agent node_name "$(hostname)")
BRIDGE=$(read_setting network bridge mcbr0)
RUN_DIR=$(dirname "$SOCKET")
PIDFILE=$RUN_DIR/agent.pid
DATA_DIR=${DATA_DIR%/}
case $DATA_DIR in
"" | / | /var | /var/lib | /etc | /usr | /home | /root) die "refusing to treat '$DATA_DIR' as minicloud's data directory" ;;
esac
step "Uninstalling minicloud (node $NODE, data $DATA_DIR, purge: $PURGE)"

# ---- 1. cluster membership ----------------------------------------------------------------------------------------
# cluster.json means this node enabled or joined a cluster. Ask etcd (any endpoint, with the node's certificate)
# whether it still lists this node among other members. Exit codes: 0 not a member (or alone), 3 still a member,
# 4 nobody answered.
if [ -s "$DATA_DIR/cluster.json" ]; then
    step "Cluster membership"
    set +e
    verdict=$("$PY" - "$DATA_DIR" "$NODE" <<'EOF'
import json, ssl, sys, urllib.request
data_dir, node = sys.argv[1], sys.argv[2]
try:
    state = json.load(open(f"{data_dir}/cluster.json"))
except (OSError, ValueError) as exc:
    print(f"{data_dir}/cluster.json cannot be read ({exc})")
    sys.exit(4)
node = state.get("node") or node
try:
    ctx = ssl.create_default_context(cafile=f"{data_dir}/pki/ca.crt")
    ctx.check_hostname = False
    ctx.load_cert_chain(f"{data_dir}/pki/server.crt", f"{data_dir}/pki/server.key")
except (OSError, ssl.SSLError) as exc:
    print(f"the node's certificates cannot be read ({exc}), so etcd cannot be asked")
    sys.exit(4)
for endpoint in state.get("endpoints", []):
    req = urllib.request.Request(f"{endpoint}/v3/cluster/member/list", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=3) as resp:
            members = [m.get("name", "") for m in json.load(resp).get("members", [])]
    except (OSError, ValueError):
        continue
    others = sorted(m for m in members if m and m != node)
    if node in members and others:
        print(f"{node} is a member of a cluster with {', '.join(others)}")
        sys.exit(3)
    print(f"{node} is no longer a member (members: {', '.join(members) or 'none'})" if node not in members
          else f"{node} is the cluster's only member")
    sys.exit(0)
print("no etcd endpoint of the cluster answered (" + ", ".join(state.get("endpoints", [])) + ")")
sys.exit(4)
EOF
    )
    rc=$?
    set -e
    info "$verdict"
    if [ "$rc" -ne 0 ]; then
        if [ "$FORCE" = yes ]; then
            warn "continuing because of --force; the other members still count this node until \`minicloud cluster remove $NODE\` runs on one of them"
        elif [ "$rc" -eq 3 ]; then
            die "this node is still in its cluster; run \`minicloud cluster remove $NODE\` on another member first (or pass --force)"
        else
            die "cannot tell whether this node is still in its cluster; check \`minicloud cluster list\` on another member, remove it there with \`minicloud cluster remove $NODE\`, then re-run with --force"
        fi
    fi
fi

# ---- 2. the agent -------------------------------------------------------------------------------------------------
step "The agent"
if under_systemd && [ -e "$UNIT_FILE" ]; then
    systemctl disable --now minicloud.service >/dev/null 2>&1 || true
    info "stopped and disabled minicloud.service"
fi
agent_pid() {
    local pid=""
    if [ -s "$PIDFILE" ]; then
        pid=$(cat "$PIDFILE")
    elif [ -s "$DATA_DIR/agent.json" ]; then
        pid=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$DATA_DIR/agent.json" 2>/dev/null || true)
    fi
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'minicloud.* agent' || return 1
    echo "$pid"
}
stop_pid() { # pid what
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 1 60); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.5
    done
    warn "$2 (pid $1) did not stop within 30 s of SIGTERM; killing it"
    kill -KILL "$1" 2>/dev/null || true
    sleep 0.5
}
if pid=$(agent_pid); then
    stop_pid "$pid" "the agent"
    info "stopped the agent (pid $pid)"
else
    info "no agent running"
fi

# ---- 3. libvirt domains and their secrets ------------------------------------------------------------------------
step "Instances (libvirt domains)"
if command -v virsh >/dev/null && virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1; then
    secrets=()
    while read -r dom; do
        [ -n "$dom" ] || continue
        xml=$(virsh -c "$LIBVIRT_URI" dumpxml "$dom" 2>/dev/null) || continue
        # Ours: minicloud's metadata, and files in this node's data directory (another installation's are not).
        case $xml in *"https://minicloud.dev/xmlns/instance/1"*) ;; *) continue ;; esac
        case $xml in *"$DATA_DIR/"*) ;; *) continue ;; esac
        while read -r uuid; do secrets+=("$uuid"); done < <(printf '%s' "$xml" | grep -o "<secret [^>]*uuid=['\"][0-9a-f-]*" | grep -o '[0-9a-f-]\{36\}' || true)
        virsh -c "$LIBVIRT_URI" destroy "$dom" >/dev/null 2>&1 || true
        virsh -c "$LIBVIRT_URI" undefine "$dom" --nvram --managed-save --snapshots-metadata >/dev/null 2>&1 ||
            virsh -c "$LIBVIRT_URI" undefine "$dom" >/dev/null 2>&1 || warn "could not undefine domain $dom"
        info "removed domain $dom"
    done < <(virsh -c "$LIBVIRT_URI" list --all --name 2>/dev/null)
    # Secrets our domains used, and secrets that name this data directory in their description.
    while read -r uuid _; do
        [[ $uuid =~ ^[0-9a-f-]{36}$ ]] || continue
        if virsh -c "$LIBVIRT_URI" secret-dumpxml "$uuid" 2>/dev/null | grep -q -- "$DATA_DIR/"; then secrets+=("$uuid"); fi
    done < <(virsh -c "$LIBVIRT_URI" secret-list 2>/dev/null | tail -n +3)
    for uuid in "${secrets[@]}"; do
        virsh -c "$LIBVIRT_URI" secret-undefine "$uuid" >/dev/null 2>&1 && info "removed libvirt secret $uuid"
    done
else
    info "libvirt is not running: no domains to remove"
fi

# ---- 3b. libvirtd's TLS listener (install.sh's blocks in libvirtd.conf and qemu.conf) ----------------------------
step "libvirtd TLS listener"
LIBVIRT_CONF_DIR=${MINICLOUD_LIBVIRT_CONF_DIR:-/etc/libvirt}
if [ "$(LIBVIRT_CONF_DIR=$LIBVIRT_CONF_DIR "$REPO/scripts/libvirt-tls" disable)" = changed ]; then
    info "removed minicloud's blocks from $LIBVIRT_CONF_DIR/libvirtd.conf and qemu.conf"
    # libvirtd still listens with what it read at start: restart it without the listener (guests keep running).
    restart=no
    if under_systemd; then
        if systemctl is-enabled --quiet libvirtd-tls.socket 2>/dev/null || systemctl is-active --quiet libvirtd-tls.socket; then
            systemctl stop libvirtd.service >/dev/null 2>&1 || true
            systemctl disable --now libvirtd-tls.socket >/dev/null 2>&1 || true
            info "disabled libvirtd-tls.socket"
            restart=yes
        fi
        if [ -e /etc/systemd/system/libvirtd.service.d/minicloud-listen.conf ]; then
            rm -f /etc/systemd/system/libvirtd.service.d/minicloud-listen.conf
            systemctl daemon-reload || true
            restart=yes
        fi
    else
        for comm in /proc/[0-9]*/comm; do
            [ "$(cat "$comm" 2>/dev/null)" = libvirtd ] || continue
            if tr '\0' ' ' <"${comm%/comm}/cmdline" 2>/dev/null | grep -q -- ' --listen'; then restart=yes; fi
        done
    fi
    if [ "$restart" = yes ] && [ "$LIBVIRT_CONF_DIR" = /etc/libvirt ]; then
        LIBVIRTD_RESTART=1 "$REPO/scripts/start-libvirtd" || warn "could not restart libvirtd; restart it yourself"
        info "restarted libvirtd without its TLS listener"
    fi
else
    info "none configured"
fi

# ---- 4. daemons the agent started (dnsmasq, etcd, Ceph, RGW, VictoriaMetrics, a leftover QEMU) with the data directory in their command line
step "Processes started by the agent"
bridges=("$BRIDGE")
found=no
for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [ "$pid" != "$$" ] || continue
    # Daemons only (an operator's `tail -f $DATA_DIR/etcd.log` is not ours to stop).
    case $(cat "$proc/comm" 2>/dev/null) in dnsmasq | etcd | ceph-* | radosgw | victoria-metric* | qemu-*) ;; *) continue ;; esac
    cmd=$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null) || continue
    case $cmd in *"$DATA_DIR/"*) ;; *) continue ;; esac
    # A dnsmasq of one of this node's networks names its bridge: that bridge and its table go too.
    if [[ $cmd =~ --interface=([^ ]+) ]]; then bridges+=("${BASH_REMATCH[1]}"); fi
    stop_pid "$pid" "${cmd%% *}"
    info "stopped pid $pid: ${cmd:0:100}"
    found=yes
done
[ "$found" = yes ] || info "none running"

# ---- 5. networks: nftables tables and bridges --------------------------------------------------------------------
step "Networks"
mapfile -t bridges < <(printf '%s\n' "${bridges[@]}" | sort -u)
for br in "${bridges[@]}"; do
    if command -v nft >/dev/null && nft list table ip "minicloud-$br" >/dev/null 2>&1; then
        nft delete table ip "minicloud-$br" && info "deleted nftables table ip minicloud-$br"
    fi
    if ip link show dev "$br" >/dev/null 2>&1; then
        # Ports left on it (taps of destroyed guests, VXLAN devices) go with it.
        for port in $(ip -o link show master "$br" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
            ip link delete dev "$port" 2>/dev/null && info "deleted $port (a port of $br)"
        done
        ip link delete dev "$br" && info "deleted bridge $br"
    fi
done
if command -v nft >/dev/null; then
    others=$(nft list tables 2>/dev/null | awk '$3 ~ /^minicloud-/ {print $2 " " $3}' | tr '\n' ',' || true)
    [ -z "$others" ] || info "left alone (another installation's data directory): ${others%,}"
fi

# ---- 6. files -----------------------------------------------------------------------------------------------------
step "Files"
remove() { # path...
    local p
    for p in "$@"; do
        if [ -e "$p" ] || [ -L "$p" ]; then
            rm -rf -- "$p"
            info "removed $p"
        fi
    done
}
if [ -e "$UNIT_FILE" ]; then
    remove "$UNIT_FILE"
    if under_systemd; then
        systemctl daemon-reload || true
        systemctl reset-failed minicloud.service >/dev/null 2>&1 || true
    fi
fi
# The link only if it is ours (points into the virtualenv).
if [ -L "$BIN_LINK" ] && [[ "$(readlink "$BIN_LINK")" == "$VENV/"* ]]; then remove "$BIN_LINK"; fi
remove "$VENV" "$PREFIX/.installed-fingerprint" "$COMPLETION_FILE" "$SOCKET" "$PIDFILE" "$DATA_DIR/agent.json"
rmdir "$PREFIX" 2>/dev/null && info "removed $PREFIX" || true
rmdir "$RUN_DIR" 2>/dev/null && info "removed $RUN_DIR" || true

if [ "$PURGE" = yes ]; then
    step "Purge: data, configuration, logs"
    remove "$DATA_DIR" "$CONFIG" "$LOG_DIR"
    rmdir "$(dirname "$CONFIG")" 2>/dev/null && info "removed $(dirname "$CONFIG")" || true
else
    info "kept $DATA_DIR, $CONFIG and $LOG_DIR (--purge deletes them)"
fi

printf '\n==> Done: minicloud is removed from this node.\n'
