#!/usr/bin/env bash
# Smoke-test a built cellstream image with podman (what `make image-test` runs).
#
#   deploy/container/image-test.sh [PYTHON]
#
# PYTHON (argument or $PYTHON; default: the repo's .venv/bin/python, else python3) must be able
# to import `cellstream` (the client talks gRPC from the host).
#
#  1. image config: non-root numeric user, HEALTHCHECK kept (docker format), ports, volume;
#  2. container A with a named volume on the state dir, published on loopback ports only;
#  3. healthy: poll `podman healthcheck run` (podman runs health checks only on demand here);
#  4. step a stream 3 times, read /metrics;
#  5. `podman stop` (SIGTERM): exit code 0, no SIGKILL needed;
#  6. container B on the same volume: GetState returns step 3 and the same state.
# Every wait is bounded; containers and the volume are removed on any exit.
#
# Environment: IMAGE (default localhost/cellstream:dev), HEALTH_TIMEOUT (s, default 60),
#              STOP_TIMEOUT (s, default 30).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
IMAGE=${IMAGE:-localhost/cellstream:dev}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-60}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
PYTHON=${1:-${PYTHON:-}}
if [ -z "$PYTHON" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
EXPECTED_UID=10001
STREAM=image-test-sensor
suffix="$$-$(date +%s)"
A=cellstream-test-a-$suffix
B=cellstream-test-b-$suffix
VOL=cellstream-test-state-$suffix
t0=$(date +%s)

log() { printf '[image-test %3ds] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
fail() {
    log "FAIL: $*"
    for c in "$A" "$B"; do
        if podman container exists "$c" 2>/dev/null; then
            log "--- logs of $c"
            timeout 20 podman logs --tail 40 "$c" >&2 2>&1 || true
        fi
    done
    exit 1
}
# podman 4.3 without systemd logs an error for every health check timer it cannot create;
# health checks are run on demand below, so hide that line.
pm() { timeout "${PM_TIMEOUT:-60}" podman "$@" 2> >(grep -v 'systemd connection' >&2); }

cleanup() {
    set +e
    for c in "$A" "$B"; do
        podman container exists "$c" 2>/dev/null && pm rm --force --volumes --time 5 "$c" >/dev/null
    done
    podman volume exists "$VOL" 2>/dev/null && pm volume rm --force "$VOL" >/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v podman >/dev/null || fail "podman not found (deploy/container/setup-podman.sh installs it)"
pm image exists "$IMAGE" || fail "image $IMAGE not found; run deploy/container/build.sh (make image) first"
"$PYTHON" -c 'import cellstream.client' 2>/dev/null || fail "$PYTHON cannot import cellstream.client"

# --- 1. image config ---------------------------------------------------------------------------
user=$(pm image inspect --format '{{.Config.User}}' "$IMAGE")
[ "${user%%:*}" = "$EXPECTED_UID" ] || fail "image user is '$user', want $EXPECTED_UID"
health=$(pm image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
case $health in *'cellstream'*'health'*) ;; *) fail "HEALTHCHECK missing from the image (build with --format docker): $health" ;; esac
ports=$(pm image inspect --format '{{json .Config.ExposedPorts}}' "$IMAGE")
case $ports in *50051/tcp*9095/tcp*|*9095/tcp*50051/tcp*) ;; *) fail "exposed ports: $ports" ;; esac
log "image $IMAGE: user $user, healthcheck and ports present"

# --- 2. container A ----------------------------------------------------------------------------
pm volume create "$VOL" >/dev/null
start_container() {  # name
    pm run --detach --name "$1" \
        --volume "$VOL:/var/lib/cellstream" \
        --publish 127.0.0.1::50051 --publish 127.0.0.1::9095 \
        --env CELLSTREAM_LOG_LEVEL=INFO \
        "$IMAGE" >/dev/null || fail "podman run $1 failed"
}
host_port() {  # name container-port -> 127.0.0.1:PORT
    local p
    p=$(pm port "$1" "$2/tcp" | head -1)
    [ -n "$p" ] || fail "no host port for $1 $2"
    echo "127.0.0.1:${p##*:}"
}
wait_healthy() {  # name
    local deadline=$(( $(date +%s) + HEALTH_TIMEOUT )) state
    while :; do
        state=$(pm inspect --format '{{.State.Status}}' "$1" 2>/dev/null || echo gone)
        [ "$state" = running ] || fail "$1 is $state before becoming healthy"
        if PM_TIMEOUT=15 pm healthcheck run "$1" >/dev/null 2>&1; then
            log "$1 healthy"
            return 0
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "$1 not healthy within ${HEALTH_TIMEOUT}s"
        sleep 0.5
    done
}

start_container "$A"
wait_healthy "$A"
uid=$(pm exec "$A" id -u)
[ "$uid" = "$EXPECTED_UID" ] || fail "server runs as uid $uid"
grpc_a=$(host_port "$A" 50051)
metrics_a=$(host_port "$A" 9095)

# --- 4. traffic and metrics --------------------------------------------------------------------
stepped=$(timeout 60 "$PYTHON" "$here/probe.py" step "$grpc_a" "$STREAM" 3) || fail "stepping $STREAM failed"
log "stepped: $stepped"
case $stepped in *'"step": 3'*) ;; *) fail "expected step 3 after 3 readings" ;; esac
digest=$(printf '%s' "$stepped" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["state"])')
scraped=$(timeout 30 "$PYTHON" "$here/probe.py" metrics "http://$metrics_a/metrics" \
    cellstream_request_duration_seconds cellstream_steps_total cellstream_streams \
    cellstream_queue_depth cellstream_max_queue cellstream_max_streams) || fail "metrics check failed"
log "metrics: $scraped"

# --- 5. SIGTERM --------------------------------------------------------------------------------
stop_start=$(date +%s)
PM_TIMEOUT=$(( STOP_TIMEOUT + 30 )) pm stop --time "$STOP_TIMEOUT" "$A" >/dev/null || fail "podman stop failed"
stop_secs=$(( $(date +%s) - stop_start ))
code=$(pm inspect --format '{{.State.ExitCode}}' "$A")
[ "$code" = 0 ] || fail "$A exited $code after SIGTERM (want 0)"
[ "$stop_secs" -lt "$STOP_TIMEOUT" ] || fail "$A needed ${stop_secs}s to stop (SIGKILL at ${STOP_TIMEOUT}s)"
log "$A stopped by SIGTERM in ${stop_secs}s, exit 0"
snapshots=$(pm run --rm --volume "$VOL:/data" --entrypoint sh "$IMAGE" -c 'ls -A /data')
[ -n "$snapshots" ] || fail "the state volume is empty after SIGTERM (no final snapshot)"
log "state volume holds: $(echo "$snapshots" | tr '\n' ' ')"
pm rm --volumes "$A" >/dev/null

# --- 6. container B restores -------------------------------------------------------------------
start_container "$B"
wait_healthy "$B"
grpc_b=$(host_port "$B" 50051)
restored=$(timeout 30 "$PYTHON" "$here/probe.py" state "$grpc_b" "$STREAM") || fail "GetState on $B failed"
log "restored: $restored"
case $restored in *'"step": 3'*) ;; *) fail "the restored stream is not at step 3" ;; esac
case $restored in *"\"state\": \"$digest\""*) ;; *) fail "the restored state differs (want digest $digest)" ;; esac
PM_TIMEOUT=$(( STOP_TIMEOUT + 30 )) pm stop --time "$STOP_TIMEOUT" "$B" >/dev/null
code=$(pm inspect --format '{{.State.ExitCode}}' "$B")
[ "$code" = 0 ] || fail "$B exited $code after SIGTERM"

log "PASS: $IMAGE (health, step, metrics, SIGTERM, snapshot restore) in $(( $(date +%s) - t0 ))s"
