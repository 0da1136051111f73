#!/usr/bin/env bash
# Build the Bento's base image locally, with no container registry: a minimal Debian bookworm
# (python3 = 3.11) from a Debian mirror, the CA bundle pip/uv must trust, imported with buildah.
#
#   deploy/base-image.sh [IMAGE]        # default IMAGE: localhost/bonefrac-base:bookworm
#
# Environment: MIRROR (Debian mirror, default http://deb.debian.org/debian; a hospital's own
# mirror works the same), CA_BUNDLE (PEM bundle the image trusts, default the host's: where TLS
# is intercepted or a private CA signs the package index, the image needs that CA), INDEX_URL
# (a private Python package index the Bento's build installs from; default PyPI).
# Reuses the image when it already exists (delete it with `buildah rmi IMAGE` to rebuild).
set -euo pipefail
IMAGE=${1:-localhost/bonefrac-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "base-image: $IMAGE exists, reused"
    exit 0
fi
for tool in debootstrap buildah; do
    command -v "$tool" >/dev/null || { echo "base-image: $tool not found: apt-get install -y buildah debootstrap" >&2; exit 2; }
done
[ -r "$CA_BUNDLE" ] || { echo "base-image: CA bundle $CA_BUNDLE not readable: set CA_BUNDLE" >&2; exit 2; }

root=$(mktemp -d /var/tmp/bonefrac-rootfs.XXXXXX)
trap 'rm -rf "$root" "$root.tar"' EXIT
# minbase: dpkg, apt, bash, passwd (useradd for the Bento's user); python3 is 3.11 on bookworm.
# python3-pip installs uv in the Bento's Dockerfile; python3-venv lets uv/pip make the venv.
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$MIRROR"
cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" -cf "$root.tar" . && rm -rf "$root"
ctr=$(buildah from scratch)
trap 'rm -rf "$root" "$root.tar"; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$ctr" "$root.tar" /   # a tar archive is unpacked into the image
# Debian marks its python "externally managed" (PEP 668); the Bento's Dockerfile pip-installs
# uv into it, then installs everything else into its own venv (/app/.venv).
# Both pip and uv verify TLS against the image's bundle (uv's own roots would miss a private CA).
buildah config \
    --env LANG=C.UTF-8 \
    --env PIP_BREAK_SYSTEM_PACKAGES=1 \
    --env PIP_DISABLE_PIP_VERSION_CHECK=1 \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --env UV_NATIVE_TLS=1 \
    ${INDEX_URL:+--env PIP_INDEX_URL=$INDEX_URL --env UV_DEFAULT_INDEX=$INDEX_URL} \
    --cmd /bin/bash \
    --label org.opencontainers.image.description="bonefrac base: Debian bookworm minbase + python3.11" \
    "$ctr"
buildah commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
trap 'rm -rf "$root" "$root.tar"' EXIT
echo "base-image: built $IMAGE"
