#!/usr/bin/env bash
# Bootstrap everything splitrelay needs on a Debian 12 host, idempotently:
# system packages, kernel headers for bcc, bpffs, and the Python venv.
# Safe to run again: each step checks first and does nothing when satisfied.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPLITRELAY_VENV:-$ROOT/.venv}"
PY="${SPLITRELAY_PYTHON:-/usr/bin/python3}"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo make test)"

# Debian packages: what a relay, a transceiver and the demo run on, then what the tests
# and benchmarks add. SPLITRELAY_BOOTSTRAP=runtime (the Vagrant VMs) installs only the first.
PACKAGES=(
  python3-bpfcc python3-venv python3-dev libbpf1 bpftool iproute2 ethtool
  redis-server iputils-ping curl systemd libopus0
)
if [ "${SPLITRELAY_BOOTSTRAP:-full}" != runtime ]; then
  PACKAGES+=(netsniff-ng xdp-tools tcpdump vagrant vagrant-libvirt shellcheck)
  # An independent WebRTC stack for the interop tests: GStreamer's webrtcbin.
  PACKAGES+=(gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
             gstreamer1.0-nice python3-gst-1.0 gir1.2-gst-plugins-bad-1.0)
fi
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers: bcc compiles against /lib/modules/$(uname -r)/build. When the
# running kernel ships none, point it at Debian's generic headers package.
KREL="$(uname -r)"
MODDIR="/lib/modules/$KREL"
if [ ! -e "$MODDIR/build/include" ]; then
  flavour="$(dpkg --print-architecture)"  # Debian's header flavours: amd64, arm64, ...
  if ! compgen -G "/usr/src/linux-headers-*-$flavour" >/dev/null; then
    say "installing linux-headers-$flavour (no headers for kernel $KREL)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "linux-headers-$flavour" >/dev/null
  fi
  hdr="$(printf '%s\n' /usr/src/linux-headers-*-"$flavour" | sort -V | tail -1)"
  common="${hdr%-"$flavour"}-common"
  say "kernel $KREL ships no headers: linking $MODDIR/build -> $hdr and source -> $common"
  mkdir -p "$MODDIR"
  ln -sfn "$hdr" "$MODDIR/build"
  ln -sfn "$common" "$MODDIR/source"
fi

# bpffs, for the pinned maps.
if ! mountpoint -q /sys/fs/bpf; then
  say "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# The venv, with pinned dependencies; bcc comes from Debian via a symlink so
# that nothing else of the system's dist-packages leaks into the venv.
stamp="$VENV/.bootstrap-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "creating the Python environment in $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # --no-deps: the lock names every package, so nothing unpinned slips in; pip check
  # fails the bootstrap if the lock ever misses a dependency.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r "$ROOT/requirements.lock"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$ROOT"
  "$VENV/bin/pip" check >/dev/null || die "the pinned dependencies are incomplete: $("$VENV/bin/pip" check | head -1)"
  echo "$want" > "$stamp"
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -e "$site/bcc" ] || ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || die "bcc does not import in $VENV (is python3-bpfcc installed?)"
