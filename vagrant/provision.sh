#!/usr/bin/env bash
# Provision one VM of the Vagrant testbed as a host of the netns testbed's plan.
#
#   provision.sh HOST            install the project (ctl/bootstrap.sh), then install,
#                                enable and (re)start the role's systemd units
#   provision.sh --network HOST  only configure the network (splitrelay-net.service runs
#                                this at every boot)
#
# HOST is relay1 (or relay), c1 (or client), tx1, tx2 or redis. This script knows no
# address, route, sysctl or command line: it asks vagrant/roles.py, which reads them from
# ctl/testbed.py, so the VMs and the namespaces cannot drift apart. Every step is
# idempotent: run it again (`vagrant provision`) after changing the checkout.
set -euo pipefail

say() { printf 'provision: %s\n' "$*" >&2; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

# The checkout: SPLITRELAY_ROOT (the Vagrantfile sets it: Vagrant runs an uploaded copy of
# this script), else the checkout this script is in.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${SPLITRELAY_ROOT:-$(dirname "$here")}"
VENV="${SPLITRELAY_VENV:-$ROOT/.venv}"
UNIT_SRC="$ROOT/vagrant/units"
UNIT_DIR=/etc/systemd/system
WAIT_SECONDS=120 # the relay compiles its XDP program with clang at start

roles() { "$VENV/bin/python" "$ROOT/vagrant/roles.py" "$@"; }

usage() {
  printf 'usage: %s [--network] HOST   (HOST: relay1|relay, c1|client, tx1, tx2, redis)\n' "$0" >&2
  exit 2
}

# The name of the interface whose MAC address is $1, if there is one.
nic_by_mac() {
  local f
  for f in /sys/class/net/*/address; do
    if [ "$(cat "$f")" = "$1" ]; then
      basename "$(dirname "$f")"
      return 0
    fi
  done
  return 1
}

# NIC names, sysctls, addresses and routes of HOST, as the netns testbed sets them.
configure_network() {
  local host=$1 plan ifname mac addr4 addr6 dev key value dst via _
  if command -v udevadm >/dev/null; then
    udevadm settle --timeout=30 || say "udev is still busy; looking for the NICs anyway"
  fi
  # Sysctls first: accept_dad and forwarding must hold before the addresses exist.
  plan="$(roles sysctls "$host")"
  while read -r key value; do
    [ -n "$key" ] || continue
    sysctl -qw "$key=$value"
  done <<<"$plan"
  plan="$(roles links "$host")"
  while read -r ifname mac addr4 addr6; do
    [ -n "$ifname" ] || continue
    dev=""
    for _ in $(seq 1 30); do
      if dev="$(nic_by_mac "$mac")"; then break; fi
      sleep 1
    done
    [ -n "$dev" ] || die "no NIC with MAC $mac (for $ifname): the Vagrantfile attaches it; is this VM $host?"
    if [ "$dev" != "$ifname" ]; then
      say "naming NIC $dev ($mac) $ifname"
      ip link set dev "$dev" down
      ip link set dev "$dev" name "$ifname"
    fi
    # As on the testbed's veths: the stack writes full UDP checksums before any XDP sees them.
    ethtool -K "$ifname" tx off >/dev/null 2>&1 || say "$ifname: cannot turn transmit checksum offload off"
    ip link set dev "$ifname" up
    ip addr replace "$addr4" dev "$ifname"
    ip -6 addr replace "$addr6" dev "$ifname" nodad
  done <<<"$plan"
  plan="$(roles routes "$host")"
  while read -r dst via; do
    [ -n "$dst" ] || continue
    ip route replace "$dst" via "$via"
  done <<<"$plan"
  say "network of $host configured"
}

# Kernel headers, the project and its venv, and the CLIs on PATH.
install_project() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # bcc compiles against the running kernel's headers. The archive usually still has the
  # exact package; if not, bootstrap links the generic linux-headers-amd64 instead.
  if [ ! -e "/lib/modules/$(uname -r)/build/include" ]; then
    apt-get install -y -qq --no-install-recommends "linux-headers-$(uname -r)" >/dev/null ||
      say "no linux-headers-$(uname -r) in the archive; ctl/bootstrap.sh falls back"
  fi
  # curl scrapes metrics in vagrant/README.md's walk-through.
  if ! command -v curl >/dev/null; then
    apt-get install -y -qq --no-install-recommends curl >/dev/null
  fi
  # runtime: a VM runs the services, not the test suite (no vagrant, trafgen, shellcheck).
  SPLITRELAY_BOOTSTRAP=runtime SPLITRELAY_VENV="$VENV" bash "$ROOT/ctl/bootstrap.sh"
  ln -sfn "$VENV/bin/relayctl" /usr/local/bin/relayctl
  ln -sfn "$VENV/bin/transceiver" /usr/local/bin/transceiver
}

# The role's units, each with the drop-in that holds its command line.
install_units() {
  local host=$1 unit
  for unit in "${UNITS[@]}"; do
    install -m 0644 "$UNIT_SRC/$unit.service" "$UNIT_DIR/$unit.service"
    mkdir -p "$UNIT_DIR/$unit.service.d"
    roles dropin "$host" "$unit" --root "$ROOT" --bin-dir "$VENV/bin" >"$UNIT_DIR/$unit.service.d/exec.conf.new"
    mv "$UNIT_DIR/$unit.service.d/exec.conf.new" "$UNIT_DIR/$unit.service.d/exec.conf"
  done
  # The testbed's Redis is splitrelay-redis on the redis VM; bootstrap installs Debian's
  # redis-server (for the tests) everywhere, whose own instance only holds port 6379.
  if systemctl is-enabled --quiet redis-server.service 2>/dev/null; then
    systemctl disable --now redis-server.service
  fi
  systemctl daemon-reload
  systemctl enable --quiet "${UNITS[@]}"
  # One transaction: systemd orders the restarts (network first) and restarts each once.
  systemctl restart "${UNITS[@]}"
}

# Wait (bounded) until each service of the role answers; show its journal if one does not.
wait_ready() {
  local host=$1 plan kind a b ok unit deadline
  plan="$(roles checks "$host")"
  while read -r kind a b; do
    [ -n "$kind" ] || continue
    ok=""
    deadline=$((SECONDS + WAIT_SECONDS))
    while [ -z "$ok" ] && [ "$SECONDS" -lt "$deadline" ]; do
      case "$kind" in
        http) if curl -fs -o /dev/null --max-time 2 "$a"; then ok=1; fi ;;
        redis) if [ "$(redis-cli -h "$a" -p "$b" ping 2>/dev/null)" = PONG ]; then ok=1; fi ;;
        *) die "unknown check $kind" ;;
      esac
      [ -n "$ok" ] || sleep 1
    done
    if [ -z "$ok" ]; then
      for unit in "${UNITS[@]}"; do
        journalctl -u "$unit" -n 30 --no-pager >&2 || true
      done
      die "$host: $kind $a $b did not answer within ${WAIT_SECONDS}s"
    fi
    say "$host: $kind $a $b answers"
  done <<<"$plan"
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
network_only=""
if [ "${1:-}" = "--network" ]; then
  network_only=1
  shift
fi
[ "$#" -eq 1 ] || usage
HOST=$1
[ -f "$ROOT/ctl/bootstrap.sh" ] || die "no checkout at $ROOT (set SPLITRELAY_ROOT)"

if [ -n "$network_only" ]; then
  configure_network "$HOST"
  exit 0
fi

install_project
units="$(roles units "$HOST")"
mapfile -t UNITS <<<"$units"
[ -n "$units" ] || die "no units for $HOST"
install_units "$HOST"
wait_ready "$HOST"
say "$HOST is up: $(printf '%s ' "${UNITS[@]}")"
