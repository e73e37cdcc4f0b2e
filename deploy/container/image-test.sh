#!/usr/bin/env bash
# Smoke-test a built cellstream image with podman (what `make image-test` runs).
#
#   deploy/container/image-test.sh [PYTHON]
#
# PYTHON (argument or $PYTHON; default: the repo's .venv/bin/python, else python3) must be able
# to import `cellstream` (the client talks gRPC from the host).
#
#  1. image config: non-root numeric user, HEALTHCHECK kept (docker format), ports, volume;
#  2. throwaway certificates and a token (dev-secrets.sh; the token by the image's own
#     `cellstream auth new-token`), made now, removed at exit;
#  3. container A with TLS and the auth file (mounted read-only, as compose and Kubernetes do),
#     a named volume on the state dir, published on loopback ports only;
#  4. healthy: poll `podman healthcheck run` (podman runs health checks only on demand here):
#     the image's HEALTHCHECK speaks TLS from CELLSTREAM_TLS_CA; health from the host over
#     TLS, and a plaintext client refused;
#  5. step a stream 3 times with the token; a step without a token, and one with a wrong
#     token, refused UNAUTHENTICATED and changing nothing; read /metrics;
#  6. `podman stop` (SIGTERM): exit code 0, no SIGKILL needed;
#  7. container B on the same volume: GetState with the token returns step 3 and the same state;
#  8. container C with the image's defaults (plaintext, no auth file): healthy, a step without
#     a token works.
# Every wait is bounded; containers, the volume and the secrets are removed on any exit.
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
# The host-side clients read these; each check below sets what it means to send.
unset CELLSTREAM_TLS_CA CELLSTREAM_TLS_CLIENT_CERT CELLSTREAM_TLS_CLIENT_KEY CELLSTREAM_TOKEN \
    CELLSTREAM_TOKEN_FILE
EXPECTED_UID=10001
STREAM=image-test-sensor
suffix="$$-$(date +%s)"
A=cellstream-test-a-$suffix
B=cellstream-test-b-$suffix
C=cellstream-test-c-$suffix
VOL=cellstream-test-state-$suffix
SECRETS=$(mktemp -d)
t0=$(date +%s)

log() { printf '[image-test %3ds] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
fail() {
    log "FAIL: $*"
    for c in "$A" "$B" "$C"; do
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
    for c in "$A" "$B" "$C"; do
        podman container exists "$c" 2>/dev/null && pm rm --force --volumes --time 5 "$c" >/dev/null
    done
    podman volume exists "$VOL" 2>/dev/null && pm volume rm --force "$VOL" >/dev/null
    rm -rf "$SECRETS"
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

# --- 2. certificates and a token ---------------------------------------------------------------
made=$(CELLSTREAM="podman run --rm --network none $IMAGE" "$here/dev-secrets.sh" "$SECRETS/s" 2>&1) \
    || fail "dev-secrets.sh: $made"
case $made in *"made by 'podman run"*"auth new-token'"*) ;; *) fail "the image's 'cellstream auth new-token' did not make the token: $made" ;; esac
sec=$SECRETS/s
log "certificates and token made in $sec (tenant dev)"

# --- 3. container A ----------------------------------------------------------------------------
pm volume create "$VOL" >/dev/null
# What compose.yaml and deploy/k8s give the server: the files read-only, variables naming them.
SECURE=(
    --volume "$sec/tls.crt:/etc/cellstream/tls/tls.crt:ro"
    --volume "$sec/tls.key:/etc/cellstream/tls/tls.key:ro"
    --volume "$sec/ca.crt:/etc/cellstream/tls/ca.crt:ro"
    --volume "$sec/auth.json:/etc/cellstream/auth/auth.json:ro"
    --env CELLSTREAM_TLS_CERT=/etc/cellstream/tls/tls.crt
    --env CELLSTREAM_TLS_KEY=/etc/cellstream/tls/tls.key
    --env CELLSTREAM_TLS_CA=/etc/cellstream/tls/ca.crt
    --env CELLSTREAM_AUTH_FILE=/etc/cellstream/auth/auth.json
)
start_container() {  # name [podman run options...]
    local name=$1
    shift
    pm run --detach --name "$name" \
        --publish 127.0.0.1::50051 --publish 127.0.0.1::9095 \
        --env CELLSTREAM_LOG_LEVEL=INFO \
        "$@" "$IMAGE" >/dev/null || fail "podman run $name failed"
}
# The host-side clients: TLS from the CA, the token from its file (never an argument).
tls() { CELLSTREAM_TLS_CA=$sec/ca.crt "$@"; }
secure() { CELLSTREAM_TLS_CA=$sec/ca.crt CELLSTREAM_TOKEN_FILE=$sec/token "$@"; }
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

start_container "$A" --volume "$VOL:/var/lib/cellstream" "${SECURE[@]}"
wait_healthy "$A"
uid=$(pm exec "$A" id -u)
[ "$uid" = "$EXPECTED_UID" ] || fail "server runs as uid $uid"
grpc_a=$(host_port "$A" 50051)
metrics_a=$(host_port "$A" 9095)

# --- 4. health over TLS ------------------------------------------------------------------------
said=$(timeout 30 "$PYTHON" -m cellstream health --address "$grpc_a" --tls-ca "$sec/ca.crt" 2>&1) \
    || fail "health over TLS from the host: $said"
if said=$(timeout 30 "$PYTHON" -m cellstream health --address "$grpc_a" 2>&1); then
    fail "a plaintext health check of the TLS port succeeded: $said"
fi
log "health over TLS: SERVING; plaintext refused (${said##*: })"

# --- 5. traffic with and without the token, metrics --------------------------------------------
stepped=$(secure timeout 60 "$PYTHON" "$here/probe.py" step "$grpc_a" "$STREAM" 3) || fail "stepping $STREAM with the token failed"
log "stepped with the token: $stepped"
case $stepped in *'"step": 3'*) ;; *) fail "expected step 3 after 3 readings" ;; esac
json_field() { "$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
digest=$(json_field "$stepped" state)
size=$(json_field "$stepped" input_size)
refusal=$(tls timeout 30 "$PYTHON" "$here/probe.py" refused "$grpc_a" "$STREAM" UNAUTHENTICATED "$size") \
    || fail "a step without a token was not refused UNAUTHENTICATED"
log "without a token: $refusal"
refusal=$(CELLSTREAM_TOKEN=not-the-token tls timeout 30 "$PYTHON" "$here/probe.py" refused "$grpc_a" "$STREAM" UNAUTHENTICATED "$size") \
    || fail "a step with a wrong token was not refused UNAUTHENTICATED"
log "with a wrong token: $refusal"
after=$(secure timeout 30 "$PYTHON" "$here/probe.py" state "$grpc_a" "$STREAM") || fail "GetState with the token failed"
case $after in *'"step": 3'*"\"state\": \"$digest\""*) ;; *) fail "a refused step changed the stream: $after" ;; esac
scraped=$(timeout 30 "$PYTHON" "$here/probe.py" metrics "http://$metrics_a/metrics" \
    cellstream_request_duration_seconds cellstream_steps_total cellstream_streams \
    cellstream_queue_depth cellstream_max_queue cellstream_max_streams) || fail "metrics check failed"
log "metrics: $scraped"

# --- 6. SIGTERM --------------------------------------------------------------------------------
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

# --- 7. container B restores -------------------------------------------------------------------
start_container "$B" --volume "$VOL:/var/lib/cellstream" "${SECURE[@]}"
wait_healthy "$B"
grpc_b=$(host_port "$B" 50051)
restored=$(secure timeout 30 "$PYTHON" "$here/probe.py" state "$grpc_b" "$STREAM") || fail "GetState on $B failed"
log "restored (the token's tenant kept): $restored"
case $restored in *'"step": 3'*) ;; *) fail "the restored stream is not at step 3" ;; esac
case $restored in *"\"state\": \"$digest\""*) ;; *) fail "the restored state differs (want digest $digest)" ;; esac
PM_TIMEOUT=$(( STOP_TIMEOUT + 30 )) pm stop --time "$STOP_TIMEOUT" "$B" >/dev/null
code=$(pm inspect --format '{{.State.ExitCode}}' "$B")
[ "$code" = 0 ] || fail "$B exited $code after SIGTERM"
pm rm --volumes "$B" >/dev/null

# --- 8. container C: the image's defaults ------------------------------------------------------
start_container "$C"
wait_healthy "$C"
plain=$(timeout 60 "$PYTHON" "$here/probe.py" step "$(host_port "$C" 50051)" "$STREAM" 1) \
    || fail "a plaintext step without a token failed on $C (no --auth-file)"
case $plain in *'"step": 1'*) ;; *) fail "expected step 1 on $C: $plain" ;; esac
log "$C (plaintext, no auth file): healthy, stepped without a token"

log "PASS: $IMAGE (TLS health, token auth, step, metrics, SIGTERM, snapshot restore, plaintext defaults) in $(( $(date +%s) - t0 ))s"
