#!/usr/bin/env bash
# Makes a Debian bookworm base image without a container registry: debootstrap
# --variant=minbase from a Debian mirror (Release signatures checked against the host's
# debian-archive-keyring), apt's caches and lists removed, imported into podman's local
# storage. For machines that reach a Debian mirror but no registry; it stands in for
# docker.io/library/debian:bookworm-slim as the DEBIAN_IMAGE build argument of
# Containerfile and Containerfile.package (docs/OPERATIONS.md section 11).
#   bash deploy/container/debian-base.sh [IMAGE]   (default localhost/debian-minbase:bookworm)
# Needs root, debootstrap and podman (Debian packages). About 2 minutes; DEBIAN_MIRROR
# picks the mirror (default http://deb.debian.org/debian).
set -euo pipefail
image=${1:-localhost/debian-minbase:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" -eq 0 ] || { echo "debian-base.sh: run as root (debootstrap)" >&2; exit 1; }
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "debian-base.sh: $tool is not installed (apt-get install $tool)" >&2; exit 1; }
done

tmp=$(mktemp -d /var/tmp/shroud-debian-base.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
rootfs=$tmp/rootfs
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 ||
  { tail -20 "$tmp/debootstrap.log" >&2; echo "debian-base.sh: debootstrap failed" >&2; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
tar --numeric-owner -C "$rootfs" -c . |
  podman import --quiet --change 'CMD ["/bin/bash"]' --message "debootstrap --variant=minbase bookworm $mirror" - "$image" >/dev/null
echo "debian-base.sh: $image ($(podman image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
