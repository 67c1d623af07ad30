#!/usr/bin/env bash
# Builds the relay image with podman and runs it the way deploy/kubernetes/daemonset.yaml
# does, on this machine: the ConfigMap's relay.toml (loopback addresses, free ports, one
# worker), state in a volume, config and peer list read-only, /run/shroud a tmpfs,
# read-only root filesystem, no capabilities, no-new-privileges, host networking.
#   - under deploy/container/seccomp-shroud.json the relay must run on io_uring
#     (shroudctl status in the container, shroud_driver_info over HTTP with the bearer
#     token, /healthz and /readyz), and stop with exit 0 on SIGTERM (podman stop);
#   - under podman's default seccomp profile (which, like Docker's, has no io_uring)
#     it must fall back to recvmmsg and say so in its log.
# Which image: SHROUD_IMAGE_FROM=package (default) builds Containerfile.package from
# the Debian package deploy/package.sh left in $CARGO_TARGET_DIR/debian (SKIPPED if
# there is none); =source builds the multi-stage Containerfile (needs the Rust image:
# RUST_IMAGE, default the public one, and a full release build).
# Base image: SHROUD_DEBIAN_IMAGE, else docker.io/library/debian:bookworm-slim if
# present or pullable, else localhost/debian-minbase:bookworm, made by
# debian-base.sh (debootstrap, ~2 min) when missing. Removes its containers, its state
# directories and its image on exit (the base image stays). Needs root (the state
# directories belong to uid 10001). About 10 s with the base image present.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-$(pwd)/target}
from=${SHROUD_IMAGE_FROM:-package}
image=localhost/shroud:check-$$
name=shroud-check-$$
public_base=docker.io/library/debian:bookworm-slim
local_base=localhost/debian-minbase:bookworm

step() { printf -- '--> %s\n' "$*"; }
fail() { echo "check-image.sh: FAILED: $*" >&2; exit 1; }
t0=$SECONDS
elapsed() { echo "$((SECONDS - t0)) s"; }

[ "$(id -u)" -eq 0 ] || fail "run as root"
command -v podman >/dev/null || fail "podman is not installed"

case $from in
  package)
    deb=$(ls "$target"/debian/shroud_*.deb 2>/dev/null | tail -1 || true)
    if [ -z "$deb" ]; then
      echo "SKIPPED: image build (no package in $target/debian: run deploy/package.sh first)"
      exit 0
    fi ;;
  source) ;;
  *) fail "SHROUD_IMAGE_FROM=$from: package or source" ;;
esac

# This machine's limits, not the image's: podman's defaults for root (nofile 1048576)
# can exceed the hard limits of a sandbox without CAP_SYS_RESOURCE, and crun refuses a
# hybrid cgroup hierarchy (v1 controllers plus a cgroup2 mount holding controllers),
# runc does not. Lowering the limits is always allowed; the relay needs far less.
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ] && nofile=65536
nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
run=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
build=("${run[@]}")
podman_=(podman)
if [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
  command -v runc >/dev/null ||
    fail "hybrid cgroup hierarchy: crun refuses it; install runc (Debian package runc)"
  podman_=(podman --runtime runc)
fi
P() { timeout 300 "${podman_[@]}" "$@"; }

work=$(mktemp -d)
cleanup() {
  P rm -f -i -t 0 "$name" "$name-setup" "$name-fallback" >/dev/null 2>&1 || true
  P rmi -f "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # cleanup also when timeout(1) stops this

step "base image"
base=${SHROUD_DEBIAN_IMAGE:-}
if [ -z "$base" ]; then
  if P image exists "$public_base"; then base=$public_base
  elif P image exists "$local_base"; then base=$local_base
  elif timeout 60 podman pull -q "$public_base" >/dev/null 2>&1; then base=$public_base
  else
    command -v debootstrap >/dev/null ||
      fail "no base image: $public_base cannot be pulled and debootstrap is not installed"
    echo "$public_base cannot be pulled: making $local_base with debootstrap"
    bash deploy/container/debian-base.sh "$local_base"
    base=$local_base
  fi
fi
echo "base: $base ($(elapsed))"

step "build ($from)"
if [ "$from" = package ]; then
  P build --quiet --pull=never --layers=false "${build[@]}" \
    --build-arg "DEBIAN_IMAGE=$base" -f deploy/container/Containerfile.package -t "$image" \
    "$(dirname "$deb")" >/dev/null
else
  P build --quiet --layers=false "${build[@]}" \
    --build-arg "DEBIAN_IMAGE=$base" ${RUST_IMAGE:+--build-arg "RUST_IMAGE=$RUST_IMAGE"} \
    -f deploy/container/Containerfile -t "$image" . >/dev/null
fi
P image inspect --format '{{.Size}} {{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$image" |
  awk '{ printf "image: %.0f MB, user %s, entrypoint %s, cmd %s\n", $1 / 1e6, $2, $3, $4 }'
[ "$(P image inspect --format '{{.Config.User}}' "$image")" = 10001:10001 ] || fail "the image does not run as 10001"
layout=$(P run --rm "${run[@]}" --network none --entrypoint /bin/sh "$image" -c \
  'stat -c "%n %u %a" /etc/shroud /var/lib/shroud /var/lib/shroud/onion-keys /run/shroud; shroud-relay --version; shroudctl --version')
echo "$layout"
for d in /etc/shroud /var/lib/shroud /var/lib/shroud/onion-keys /run/shroud; do
  grep -qx "$d 10001 700" <<<"$layout" || fail "$d in the image is not uid 10001, mode 0700"
done
echo "built ($(elapsed) so far)"

step "keys, a signed peer list and the DaemonSet's relay.toml, made with the image's shroudctl"
read -r port metrics_port < <(python3 - <<'PY'
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
t = socket.socket(); t.bind(("127.0.0.1", 0))
print(u.getsockname()[1], t.getsockname()[1])
PY
)
install -d -o 10001 -g 10001 -m 0700 "$work/state" "$work/state/onion-keys" "$work/peer-list"
install -d -m 0755 "$work/config"
python3 -c 'import secrets; print(secrets.token_hex(24))' >"$work/state/metrics.token"
chown 10001:10001 "$work/state/metrics.token"; chmod 0600 "$work/state/metrics.token"
authority=$(P run --rm --name "$name-setup" "${run[@]}" --network none --entrypoint /bin/sh \
  -v "$work/state:/var/lib/shroud" -v "$work/peer-list:/out" "$image" -ec "
  id=\$(shroudctl genkey --type identity --out /var/lib/shroud/identity.key)
  onion=\$(shroudctl genkey --out /var/lib/shroud/onion-keys/onion-\$(date +%s).key)
  authority=\$(shroudctl genkey --type identity --out /tmp/authority.key)
  shroudctl peers new --out /tmp/peers.list --serial 1 --valid-for 48h --valid-after now >&2
  shroudctl peers add /tmp/peers.list --identity \"\$id\" --addr 127.0.0.1 --ports $port-$port \
    --onion \"\$onion@\$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)\" >&2
  shroudctl peers sign /tmp/peers.list --key /tmp/authority.key >&2
  cp /tmp/peers.list /out/peers.list
  echo \"\$authority\"")
AUTHORITY=$authority PORT=$port METRICS_PORT=$metrics_port python3 - "$work/config/relay.toml" <<'PY'
import os, re, sys, tomllib, yaml
docs = list(yaml.safe_load_all(open("deploy/kubernetes/configmap.yaml")))
text = next(d for d in docs if d and d["metadata"]["name"] == "shroud-config")["data"]["relay.toml"]
subs = [(r'^authorities = .*$', f'authorities = ["{os.environ["AUTHORITY"]}"]'),
        (r'^listen = \["0\.0\.0\.0"\]$', 'listen = ["127.0.0.1"]'),
        (r'^base_port = .*$', f'base_port = {os.environ["PORT"]}'),
        (r'^workers = .*$', 'workers = 1'),
        (r'^listen = "0\.0\.0\.0:9478"$', f'listen = "127.0.0.1:{os.environ["METRICS_PORT"]}"')]
for pattern, repl in subs:
    text, n = re.subn(pattern, repl, text, flags=re.M)
    assert n == 1, f"configmap.yaml's relay.toml: {pattern} matched {n} times"
tomllib.loads(text)
open(sys.argv[1], "w").write(text)
PY
volumes=(-v "$work/state:/var/lib/shroud" -v "$work/config:/etc/shroud/config:ro"
         -v "$work/peer-list:/etc/shroud/peer-list:ro" --tmpfs /run/shroud:rw,mode=0700,size=1m,U)
hardening=(--read-only --cap-drop all --security-opt no-new-privileges)
echo "relay on 127.0.0.1:$port/udp, metrics on 127.0.0.1:$metrics_port ($(elapsed))"

# wait_status NAME: shroudctl status in the container, once the relay answers and its
# worker has picked a driver (it reports "none" until then).
wait_status() {
  local out
  for _ in $(seq 100); do
    if out=$(P exec "$1" shroudctl status --interval 0 2>/dev/null) &&
       [ "$(awk '$1 == "0" { print $3 }' <<<"$out")" != none ]; then
      echo "$out"; return 0
    fi
    [ "$(P inspect --format '{{.State.Running}}' "$1")" = true ] || break
    sleep 0.2
  done
  P logs "$1" 2>&1 | tail -20 >&2
  fail "$1: the relay did not answer shroudctl status with a driver chosen"
}
# scrape PATH: the relay's metrics endpoint with the bearer token.
scrape() {
  python3 - "$metrics_port" "$1" "$work/state/metrics.token" <<'PY'
import sys, urllib.request
port, path, token = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, timeout=5) as r:
    print(r.status)
    print(r.read().decode())
PY
}

step "run under seccomp-shroud.json: io_uring"
P run -d --name "$name" "${run[@]}" --network host "${hardening[@]}" \
  --security-opt seccomp=deploy/container/seccomp-shroud.json "${volumes[@]}" \
  "$image" --config /etc/shroud/config/relay.toml >/dev/null
status=$(wait_status "$name")
echo "$status" | sed -n '1p;/^ *WORKER/,/^$/p'
[ "$(awk '$1 == "0" { print $3 }' <<<"$status")" = io_uring ] || fail "the relay's worker 0 does not run on io_uring"
metrics=$(scrape /metrics)
grep -E '^shroud_driver_info\{' <<<"$metrics" || fail "no shroud_driver_info"
grep -qE '^shroud_driver_info\{.*driver="io_uring".*\} 1$' <<<"$metrics" || fail "shroud_driver_info does not say io_uring"
[ "$(scrape /healthz | sed -n 1p)" = 200 ] || fail "/healthz is not 200"
[ "$(scrape /readyz | sed -n 1p)" = 200 ] || fail "/readyz is not 200"
echo "/healthz and /readyz: 200"
log=$(P logs "$name" 2>&1)
grep -q 'io_uring unavailable' <<<"$log" && fail "the relay fell back under seccomp-shroud.json"
P stop -t 10 "$name" >/dev/null
code=$(P inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { P logs "$name" 2>&1 | tail -20; fail "the relay exited $code on SIGTERM, not 0"; }
echo "stopped (SIGTERM): exit 0 ($(elapsed))"
P rm "$name" >/dev/null

step "run under podman's default seccomp profile: falls back to recvmmsg"
P run -d --name "$name-fallback" "${run[@]}" --network host "${hardening[@]}" "${volumes[@]}" \
  "$image" --config /etc/shroud/config/relay.toml >/dev/null
status=$(wait_status "$name-fallback")
echo "$status" | sed -n '/^ *WORKER/,/^$/p'
[ "$(awk '$1 == "0" { print $3 }' <<<"$status")" = recvmmsg ] || fail "worker 0 does not run on recvmmsg under the default profile"
log=$(P logs "$name-fallback" 2>&1)
grep -m 1 'io_uring unavailable' <<<"$log" || fail "the relay did not log its fallback"
P stop -t 10 "$name-fallback" >/dev/null

echo "image: OK ($from, base $base, $(elapsed))"
