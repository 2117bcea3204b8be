#!/usr/bin/env bash
# Make a Debian bookworm base image without a registry: debootstrap a minimal root file system and import it.
#   docker/base.sh NAME
set -euo pipefail
NAME=${1:?usage: docker/base.sh IMAGE_NAME}
ROOT=$(mktemp -d /var/tmp/efedllm-rootfs.XXXXXX)
chmod 755 "$ROOT"  # it becomes the image's /, which every user must be able to enter
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase bookworm "$ROOT" http://deb.debian.org/debian >/dev/null
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | docker import - "$NAME" >/dev/null
echo "base image $NAME: $(du -sh "$ROOT" | cut -f1) root file system"
