#!/usr/bin/env bash
# Build the cellstream image with podman (what `make image` runs).
#
# With no registry reachable, the base is the local Debian image that setup-podman.sh makes
# (it runs first and is a no-op when everything is in place).  With a registry, pass
# BASE_IMAGE=python:3.11-slim (the Dockerfile's own default) or build with plain
# `docker build .` / `podman build .` instead of this script.
#
# Environment:
#   IMAGE        tag to build                    (default localhost/cellstream:dev)
#   BASE_IMAGE   the Dockerfile's base           (default: the local base of setup-podman.sh)
#   SETUP=0      skip setup-podman.sh (use the engine and BASE_IMAGE as they are)
#   CA_BUNDLE    a PEM bundle that RUN steps trust for pip (mounted at build time only, never
#                copied into the image); needed behind TLS-intercepting proxies.
#                Default: $SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt when present;
#                CA_BUNDLE= (empty) mounts nothing.
#   PIP_INDEX_URL     an index for pip inside the build (default: pip's own, i.e. PyPI)
#   PIP_WHEELHOUSE    a host directory of wheels offered to pip first (find-links), e.g. one
#                     made with `pip wheel -w DIR . hatchling` on the host (hatchling: the build
#                     backend); mounted at build time only.
#   PIP_NO_INDEX=1    use the wheelhouse alone, no index: for machines that cannot reach PyPI
#                     (pip would otherwise retry it for every package before taking a wheel).
#   BUILD_ARGS   extra arguments for `podman build`
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
IMAGE=${IMAGE:-localhost/cellstream:dev}
LOCAL_BASE=${LOCAL_BASE:-localhost/cellstream-base:bookworm}
SETUP=${SETUP:-1}
if [ -z "${CA_BUNDLE+set}" ]; then
    CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$CA_BUNDLE" ] || CA_BUNDLE=
fi

log() { printf '[build] %s\n' "$*" >&2; }

if [ "$SETUP" = 1 ]; then
    BASE_TAG=$LOCAL_BASE "$here/setup-podman.sh"
fi
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}

# Build-time only settings for pip, given to every RUN step as /etc/pip.conf (pip's site-wide
# config in any base image).  The host's own pip config is not reused: it may name local
# paths that do not exist inside the build.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mounts=()
{
    echo "[global]"
    echo "timeout = 60"
    echo "retries = 3"
    echo "disable-pip-version-check = true"
    if [ -n "$CA_BUNDLE" ]; then
        [ -f "$CA_BUNDLE" ] || { log "CA_BUNDLE=$CA_BUNDLE is not a file"; exit 1; }
        cp "$CA_BUNDLE" "$tmp/ca.pem"
        mounts+=(--volume "$tmp/ca.pem:/run/cellstream-build/ca.pem:ro")
        echo "cert = /run/cellstream-build/ca.pem"
    fi
    if [ -n "${PIP_INDEX_URL:-}" ]; then
        echo "index-url = $PIP_INDEX_URL"
    fi
    if [ -n "${PIP_WHEELHOUSE:-}" ]; then
        mounts+=(--volume "$(cd "$PIP_WHEELHOUSE" && pwd):/run/cellstream-build/wheels:ro")
        echo "find-links = /run/cellstream-build/wheels"
    fi
    if [ "${PIP_NO_INDEX:-0}" = 1 ]; then
        [ -n "${PIP_WHEELHOUSE:-}" ] || { log "PIP_NO_INDEX=1 needs PIP_WHEELHOUSE"; exit 1; }
        echo "no-index = true"
    fi
} >"$tmp/pip.conf"
mounts+=(--volume "$tmp/pip.conf:/etc/pip.conf:ro")

# The images these tags point at now: replaced ones are removed after the build (they would
# pile up as <none> images, 200-300 MB each).
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" "$IMAGE-build" 2>/dev/null || true)

log "podman build $IMAGE from $BASE_IMAGE${CA_BUNDLE:+ (CA bundle: $CA_BUNDLE)}"
start=$(date +%s)
common=(--format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" --file "$root/Dockerfile")
# Two passes so that the build-time mounts touch only the stage that downloads: buildah
# leaves an empty file behind for every mount target that did not exist, which would put an
# empty /etc/pip.conf into the runtime image.  Pass 1 builds the wheel stage with the mounts
# (tagged, so its layers stay cached); pass 2 builds the whole Dockerfile without them and
# takes stage 1 from the layer cache.
# --format docker keeps HEALTHCHECK (the OCI image format has no such field).
# shellcheck disable=SC2086
podman build "${common[@]}" "${mounts[@]}" --target build --tag "$IMAGE-build" ${BUILD_ARGS:-} "$root"
# Pass 2 must take stage 1 from the cache (it has no pip settings): --no-cache is for pass 1 only.
pass2_args=${BUILD_ARGS:-}
pass2_args=${pass2_args//--no-cache/}
# shellcheck disable=SC2086
podman build "${common[@]}" --tag "$IMAGE" $pass2_args "$root"
secs=$(( $(date +%s) - start ))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in ${secs}s, $(( size / 1000000 )) MB (wheel stage kept as $IMAGE-build for the layer cache)"
for id in $previous; do
    if [ -z "$(podman image inspect --format '{{join .RepoTags " "}}' "$id" 2>/dev/null)" ]; then
        podman rmi "$id" >/dev/null 2>&1 || true
    fi
done
