#!/usr/bin/env bash
# Builds the Debian package `shroud` with cargo-deb, installs it with dpkg -i on this
# machine, and walks docs/OPERATIONS.md section 1 on the installed result:
#   - the shipped /etc/shroud/relay.toml is refused by --verify-config until it names
#     an authority (exit 78, naming relay.authorities);
#   - keys generated as user shroud into the directories the package created, a
#     signed peer list, then --verify-config says "configuration OK:" (no warnings);
#   - the relay runs as user shroud from the installed files, answers
#     `shroudctl status`, and `shroudctl reload` (the unit's ExecReload) succeeds and
#     fails as it should;
#   - systemd-analyze verify on the installed units, their Documentation= targets
#     exist, and the relay unit's `systemd-analyze security` exposure is <= 1.5;
#   - man pages and completions are installed.
# Finally the package is purged again (KEEP_PACKAGE=1 keeps it installed).
# Needs root (dpkg -i). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target=${CARGO_TARGET_DIR:-$root/target}

step() { printf '\n--> %s\n' "$*"; }
fail() { echo "package.sh: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (dpkg -i)"

step "cargo-deb"
if ! command -v cargo-deb >/dev/null 2>&1; then
  cargo install cargo-deb --locked
fi
cargo deb --version

step "build (release) and generate man pages and completions"
cargo build --release --locked -p shroud-relay -p shroud-control
rm -rf "$target/release/assets"
cargo run --locked --quiet -p shroud-xtask -- assets "$target/release/assets"
gzip -9nf "$target"/release/assets/man/*.1

step "package"
rm -rf "$target/debian"
cargo deb --locked --no-build -p shroud-relay --output "$target/debian/"
deb=$(ls "$target"/debian/shroud_*.deb)
dpkg-deb --info "$deb" | sed -n '1,20p'
dpkg-deb --contents "$deb" > "$target/debian/contents.txt"
for f in ./usr/bin/shroud-relay ./usr/bin/shroudctl \
         ./usr/lib/systemd/system/shroud-relay.service ./usr/lib/systemd/system/shroudctl-rotate.service \
         ./usr/lib/sysusers.d/shroud.conf ./usr/lib/tmpfiles.d/shroud.conf ./etc/shroud/relay.toml \
         ./usr/share/doc/shroud/OPERATIONS.md ./usr/share/man/man1/shroud-relay.1.gz \
         ./usr/share/man/man1/shroudctl-peers-verify.1.gz \
         ./usr/share/bash-completion/completions/shroudctl; do
  grep -q " $f\$" "$target/debian/contents.txt" || fail "the package lacks $f"
done

step "install (dpkg -i)"
if dpkg -s shroud >/dev/null 2>&1; then dpkg --purge shroud >/dev/null; fi
dpkg -i "$deb"
getent passwd shroud >/dev/null || fail "the package did not create user shroud"
for d in /etc/shroud /var/lib/shroud /var/lib/shroud/onion-keys; do
  [ "$(stat -c '%U %a' "$d")" = "shroud 700" ] || fail "$d is $(stat -c '%U %a' "$d"), not shroud 700"
done
shroud-relay --version
shroudctl --version
man -w shroud-relay >/dev/null 2>&1 || [ -f /usr/share/man/man1/shroud-relay.1.gz ] || fail "no man page"

step "the shipped config is refused until it names an authority"
set +e
out=$(shroud-relay --config /etc/shroud/relay.toml --verify-config 2>&1); code=$?
set -e
echo "$out"
[ "$code" -eq 78 ] || fail "--verify-config on the shipped config exited $code, not 78"
grep -q "relay.authorities" <<<"$out" || fail "the refusal does not name relay.authorities"

step "OPERATIONS.md section 1-3: keys, authority, peer list (as user shroud)"
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${relay_pid:-}" ] && kill "$relay_pid" 2>/dev/null || true' EXIT
as_shroud() { runuser -u shroud -- "$@"; }
rm -f /etc/shroud/identity.key /var/lib/shroud/onion-keys/onion-*.key
identity_pub=$(as_shroud shroudctl genkey --type identity --out /etc/shroud/identity.key)
onion_pub=$(as_shroud shroudctl genkey --out "/var/lib/shroud/onion-keys/onion-$(date +%s).key")
authority_pub=$(shroudctl genkey --type identity --out "$work/authority.key")
shroudctl peers new --out "$work/network.peerlist" --serial 1 --valid-for 48h --valid-after now
shroudctl peers add "$work/network.peerlist" --identity "$identity_pub" --addr 127.0.0.1 \
  --ports 9000-9000 --onion "$onion_pub@$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)"
shroudctl peers sign "$work/network.peerlist" --key "$work/authority.key"
install -o shroud -g shroud -m 0644 "$work/network.peerlist" /var/lib/shroud/peers.list
sed -i "s|^authorities = \[\]|authorities = [\"$authority_pub\"]|" /etc/shroud/relay.toml
out=$(as_shroud shroud-relay --config /etc/shroud/relay.toml --verify-config)
echo "$out"
grep -q "^configuration OK: " <<<"$out" || fail "--verify-config did not accept the walked-through config cleanly"

step "the installed relay runs as shroud and answers shroudctl; reload succeeds and fails"
install -d -o shroud -g shroud -m 0700 /run/shroud   # RuntimeDirectory= under systemd
runuser -u shroud -- env NO_COLOR=1 shroud-relay --config /etc/shroud/relay.toml 2>"$work/relay.log" &
relay_pid=$!
for _ in $(seq 100); do
  as_shroud shroudctl status --interval 0 >/dev/null 2>&1 && break
  sleep 0.1
done
as_shroud shroudctl status --interval 0 | head -3
as_shroud shroudctl reload --socket /run/shroud/admin.sock   # ExecReload
as_shroud shroudctl peers list --running | head -3
cp /var/lib/shroud/peers.list "$work/good.list"
echo "not a peer list" > /var/lib/shroud/peers.list
if as_shroud shroudctl reload --socket /run/shroud/admin.sock 2>"$work/reload.err"; then
  fail "shroudctl reload succeeded on a tampered peer list"
fi
cat "$work/reload.err"
grep -q "refused" "$work/reload.err" || fail "the refused reload does not say so"
install -o shroud -g shroud -m 0644 "$work/good.list" /var/lib/shroud/peers.list
grep -q $'\e\[' "$work/relay.log" && fail "the relay coloured a log that is not a terminal"
kill "$relay_pid"; wait "$relay_pid" || true; relay_pid=""

step "systemd units"
units="/usr/lib/systemd/system/shroud-relay.service /usr/lib/systemd/system/shroudctl-rotate.service"
systemd-analyze verify $units
for u in $units; do
  for doc in $(sed -n 's/^Documentation=//p' "$u"); do
    case "$doc" in
      file://*) [ -f "${doc#file://}" ] || fail "$u: Documentation=$doc does not exist" ;;
      man:*) page=${doc#man:}; man -w "${page%%(*}" >/dev/null || fail "$u: no man page for $doc" ;;
    esac
  done
done
score=$(systemd-analyze security --offline=yes /usr/lib/systemd/system/shroud-relay.service 2>&1 |
  sed -n 's/.*Overall exposure level for shroud-relay.service: \([0-9.]*\).*/\1/p')
echo "shroud-relay.service exposure: $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }' || fail "exposure $score above 1.5"

if [ "${KEEP_PACKAGE:-0}" != 1 ]; then
  step "purge"
  dpkg --purge shroud
fi
echo "package.sh: OK ($deb)"
