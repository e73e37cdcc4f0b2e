#!/usr/bin/env bash
# Make this Debian machine able to build and run the cellstream image with podman, from
# Debian's own packages and without any container registry.  Idempotent: each step checks
# first and does nothing when it is already done, so `make image` can call it every time.
#
#   1. apt-get install podman buildah runc mmdebstrap (only those missing; apt-get update once).
#   2. /etc/containers/containers.conf: runtime = "runc" and default_ulimits within this
#      machine's hard limits (crun fails here on setrlimit and on hybrid cgroups).
#   3. A local base image (default tag localhost/cellstream-base:bookworm): a minimal Debian
#      with python3 + python3-venv, made by mmdebstrap from this machine's apt sources and
#      `podman import`ed.  build.sh passes it as BASE_IMAGE.  Users who can reach a registry
#      never need it: the Dockerfile defaults to python:3.11-slim.
#
# Environment:
#   BASE_TAG     the base image tag to create           (default localhost/cellstream-base:bookworm)
#   SUITE        the Debian suite for the base image    (default: this machine's VERSION_CODENAME)
#   REBUILD_BASE=1  rebuild the base image even if it exists
#   SKIP_APT=1   do not install packages (fail if they are missing)
set -euo pipefail

BASE_TAG=${BASE_TAG:-localhost/cellstream-base:bookworm}
REBUILD_BASE=${REBUILD_BASE:-0}
SKIP_APT=${SKIP_APT:-0}
CONF=/etc/containers/containers.conf

log() { printf '[setup-podman] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- 1. packages -----------------------------------------------------------------------------
need_pkgs=()
for cmd_pkg in podman:podman buildah:buildah runc:runc mmdebstrap:mmdebstrap; do
    cmd=${cmd_pkg%%:*}
    pkg=${cmd_pkg##*:}
    command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    [ "$SKIP_APT" = 1 ] && die "missing: ${need_pkgs[*]} (SKIP_APT=1)"
    log "installing ${need_pkgs[*]}"
    as_root apt-get update -q
    # With recommends: they bring podman's networking (netavark, aardvark-dns for compose
    # service names), slirp4netns, fuse-overlayfs, uidmap and catatonit.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}"
else
    log "packages present"
fi

# --- 2. containers.conf ----------------------------------------------------------------------
hard_nofile=$(ulimit -Hn)
hard_nproc=$(ulimit -Hu)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
[ "$hard_nproc" = unlimited ] && hard_nproc=1048576
# A container's limits cannot exceed what podman/conmon run with (root here lacks
# CAP_SYS_RESOURCE, and podman lowers its own nproc limit to 32768), so cap both.
hard_nofile=$(( hard_nofile < 65536 ? hard_nofile : 65536 ))
hard_nproc=$(( hard_nproc < 32768 ? hard_nproc : 32768 ))
soft_nofile=$hard_nofile
soft_nproc=$hard_nproc
want_conf=$(cat <<EOF
# Written by deploy/container/setup-podman.sh (cellstream).  crun fails on this kind of host
# (setrlimit above the hard limits, hybrid cgroup v1/v2), so use runc and limits that fit.
[containers]
default_ulimits = [
  "nofile=${soft_nofile}:${hard_nofile}",
  "nproc=${soft_nproc}:${hard_nproc}",
]

[engine]
runtime = "runc"
EOF
)
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$want_conf" ]; then
    log "$CONF up to date"
else
    if [ -f "$CONF" ] && ! grep -q 'setup-podman.sh (cellstream)' "$CONF"; then
        as_root cp -p "$CONF" "$CONF.cellstream-backup"
        log "saved the previous $CONF as $CONF.cellstream-backup"
    fi
    printf '%s\n' "$want_conf" | as_root tee "$CONF" >/dev/null
    log "wrote $CONF"
fi

podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null \
    || die "podman info failed"
log "podman: $(podman info --format 'runtime={{.Host.OCIRuntime.Name}} storage={{.Store.GraphDriverName}} cgroups={{.Host.CgroupsVersion}}')"

probe_run() {
    # A container actually starts (catches runtime and rlimit problems early, with the fix).
    if ! out=$(timeout 120 podman run --rm --network none "$1" true 2>&1); then
        log "$out"
        die "podman cannot start a container from $1; check $CONF (runtime, default_ulimits)"
    fi
}

# --- 3. base image ---------------------------------------------------------------------------
if [ "$REBUILD_BASE" != 1 ] && podman image exists "$BASE_TAG"; then
    log "base image $BASE_TAG present"
    probe_run "$BASE_TAG"
    exit 0
fi

if [ -z "${SUITE:-}" ]; then
    # shellcheck disable=SC1091
    SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
fi
work=$(mktemp -d /var/tmp/cellstream-base.XXXXXX)
trap 'as_root rm -rf "$work"' EXIT
# This machine's apt sources (mmdebstrap pastes each file into the chroot's sources), and the
# host's apt settings that decide whether downloads work here (proxies, validity checks of
# snapshot mirrors).  APT_SOURCES overrides the list (space-separated files or mirror URIs).
if [ -n "${APT_SOURCES:-}" ]; then
    read -r -a sources <<<"$APT_SOURCES"
else
    sources=()
    if [ -s /etc/apt/sources.list ] && grep -q '^[[:space:]]*deb' /etc/apt/sources.list; then
        sources+=(/etc/apt/sources.list)
    fi
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && sources+=("$f")
    done
fi
[ ${#sources[@]} -gt 0 ] || die "no apt sources found; set APT_SOURCES"
aptopts=()
for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
    [ -f "$f" ] && grep -q -i -E 'proxy|Check-Valid-Until|Check-Date' "$f" && aptopts+=("--aptopt=$f")
done
log "mmdebstrap $SUITE -> $BASE_TAG (sources: ${sources[*]})"
start=$(date +%s)
# python3-venv brings ensurepip, which the Dockerfile uses for its venvs;
# passwd brings useradd; ca-certificates lets pip verify PyPI.  Docs and caches are left out.
# The customize hook is run by mmdebstrap with the chroot as $1: single quotes on purpose.
# shellcheck disable=SC2016
as_root mmdebstrap \
    --variant=minbase \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=python3,python3-venv,passwd,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --aptopt='APT::Install-Recommends "false"' \
    "${aptopts[@]}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
    "$SUITE" "$work/rootfs.tar" "${sources[@]}" </dev/null
as_root podman import \
    --change 'CMD ["python3"]' \
    --change 'ENV LANG=C.UTF-8' \
    --message "cellstream local base: Debian $SUITE minbase + python3 (mmdebstrap)" \
    "$work/rootfs.tar" "$BASE_TAG" >/dev/null
log "base image $BASE_TAG built in $(( $(date +%s) - start ))s ($(podman image inspect --format '{{.Size}}' "$BASE_TAG") bytes)"
probe_run "$BASE_TAG"
