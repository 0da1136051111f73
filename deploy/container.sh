#!/usr/bin/env bash
# `make container`: the Bento's OCI image, built on this machine with buildah (no Docker engine,
# no registry): local base image (deploy/base-image.sh) -> `bentoml build` -> `bentoml
# containerize --backend buildah`. Needs `bonefrac:latest` in the BentoML model store
# (`make demo`, `bonefrac stage package`, or `bonefrac serve --bundle DIR` put it there).
#
#   deploy/container.sh [IMAGE]     # default IMAGE: bonefrac:latest (in containers-storage)
#
# Environment: BASE_IMAGE (default localhost/bonefrac-base:bookworm, built when missing),
# BENTOML_HOME (the model store and Bentos; BentoML's default ~/bentoml).
# Rebuilds reuse layers (BUILDAH_LAYERS) and uv's wheel cache (a build cache mount).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-bonefrac:latest}
BASE_IMAGE=${BASE_IMAGE:-localhost/bonefrac-base:bookworm}
BIN=${BIN:-$(dirname "$(command -v bentoml || echo .venv/bin/bentoml)")}
# chroot isolation builds on these machines; the default (an OCI runtime, crun) is what fails
# for `podman run` here (setrlimit not permitted). Layers are kept as a build cache.
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot} BUILDAH_LAYERS=${BUILDAH_LAYERS:-true}
export BENTOML_DO_NOT_TRACK=true

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "container: installing buildah and debootstrap with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq buildah debootstrap >/dev/null
    else
        echo "container: buildah and debootstrap are needed: apt-get install buildah debootstrap" >&2
        exit 2
    fi
fi

start=$(date +%s)
deploy/base-image.sh "$BASE_IMAGE"
echo "container: base image ready in $(( $(date +%s) - start )) s"

step=$(date +%s)
bento=$("$BIN/bentoml" build --output tag | tail -1)
bento=${bento#__tag__:}
echo "container: built Bento $bento in $(( $(date +%s) - step )) s"

step=$(date +%s)
# From the temp folder: BentoML 1.4.40 rebuilds the Dockerfile in a temp folder and refuses a
# dockerfile_template there unless it lies under the working directory.
bin=$(cd "$BIN" && pwd)
(cd "${TMPDIR:-/tmp}" && "$bin/bentoml" containerize "$bento" --backend buildah \
    --image-tag "$IMAGE" --opt build-arg=BASE_IMAGE="$BASE_IMAGE")
echo "container: built image $IMAGE in $(( $(date +%s) - step )) s (total $(( $(date +%s) - start )) s)"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -F "${IMAGE%%:*}" || true
