#!/usr/bin/env bash
# Make throwaway TLS certificates and a token for a development or test cellstream: what
# deploy/compose.yaml mounts (from deploy/secrets/) and what image-test.sh uses.  Not for
# production: there the certificates come from cert-manager or your own CA, and the auth file
# from a secret store (docs/security.md).
#
#   deploy/container/dev-secrets.sh [DIR]          (default DIR: deploy/secrets)
#
# Writes into DIR (made 0700, so other users of this host cannot reach any of it):
#   ca.crt, ca.key          a fresh CA; ca.key never goes into a container
#   tls.crt, tls.key        the server's certificate and key (names: localhost, 127.0.0.1 and
#                           cellstream, plus $SERVER_NAMES); also good for client auth, so the
#                           health check can present it to an mTLS server
#   client.crt, client.key  a client certificate of the same CA, for mTLS clients
#   auth.json               one tenant ($TENANT) holding the token's sha256 line
#   token                   the token itself, for clients: CELLSTREAM_TOKEN_FILE=DIR/token
# The files the container reads (tls.*, ca.crt, auth.json) are 0644: the server runs as uid
# 10001, and compose and podman mount files with their host owner and mode.
#
# Environment:
#   SERVER_NAMES  more subjectAltNames for tls.crt, comma-separated (DNS:host.example,IP:10.0.0.5)
#   TENANT        the tenant of the token (default dev)
#   DAYS          validity of the certificates (default 30)
#   CELLSTREAM    the command whose `auth new-token` makes the token (default: `cellstream`, else
#                 the repository's .venv/bin/python -m cellstream); without that subcommand
#                 the token comes from `openssl rand`
#   FORCE=1       replace the files of an earlier run (else an existing DIR/ca.crt is an error)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
DIR=${1:-$root/deploy/secrets}
TENANT=${TENANT:-dev}
DAYS=${DAYS:-30}
FORCE=${FORCE:-0}

log() { printf '[dev-secrets] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
[[ $TENANT =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "TENANT '$TENANT' is not a tenant name ([A-Za-z0-9_.-], 1-64)"
if [ -e "$DIR/ca.crt" ] && [ "$FORCE" != 1 ]; then
    die "$DIR already holds secrets; FORCE=1 replaces them (clients then need the new ca.crt and token)"
fi
mkdir -p "$DIR"
chmod 0700 "$DIR"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# openssl chats on stderr even when all is well: show it only when a command fails.
quiet() { "$@" 2>"$work/stderr" || { cat "$work/stderr" >&2; die "failed: $*"; }; }
new_key() { quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
issue() {  # name subject extendedKeyUsage subjectAltName|''
    local name=$1
    new_key "$DIR/$name.key"
    quiet openssl req -new -key "$DIR/$name.key" -subj "$2" -out "$work/$name.csr"
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature"
        echo "extendedKeyUsage = $3"
        [ -z "$4" ] || echo "subjectAltName = $4"
    } >"$work/$name.ext"
    quiet openssl x509 -req -in "$work/$name.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -sha256 \
        -extfile "$work/$name.ext" -out "$DIR/$name.crt"
}

new_key "$DIR/ca.key"
quiet openssl req -x509 -new -key "$DIR/ca.key" -sha256 -days "$DAYS" \
    -subj "/CN=cellstream dev CA $(date +%Y%m%d%H%M%S)" \
    -addext "basicConstraints = critical, CA:TRUE, pathlen:0" \
    -addext "keyUsage = critical, keyCertSign, cRLSign" \
    -out "$DIR/ca.crt"
names="DNS:localhost,IP:127.0.0.1,DNS:cellstream${SERVER_NAMES:+,$SERVER_NAMES}"
issue tls "/CN=cellstream" "serverAuth, clientAuth" "$names"
issue client "/CN=cellstream-client" "clientAuth" ""
log "certificates: $DIR/ca.crt (CA), tls.crt ($names), client.crt (mTLS client)"

# --- the token -------------------------------------------------------------------------------
if [ -z "${CELLSTREAM:-}" ]; then
    if command -v cellstream >/dev/null; then
        CELLSTREAM=cellstream
    elif [ -x "$root/.venv/bin/python" ]; then
        CELLSTREAM="$root/.venv/bin/python -m cellstream"
    fi
fi
token='' hash=''
# shellcheck disable=SC2086 # CELLSTREAM is a command line, split on purpose
if [ -n "${CELLSTREAM:-}" ] && made=$($CELLSTREAM auth new-token 2>/dev/null); then
    hash=$(grep -o -E 'sha256:[0-9a-f]{64}' <<<"$made" | head -1 || true)
    # The token is the word of the output whose sha256 is that line: no reliance on its layout.
    read -r -a words <<<"$(tr '\n' ' ' <<<"$made")"
    for word in "${words[@]}"; do
        [ "sha256:$(printf '%s' "$word" | openssl dgst -sha256 -r | cut -d' ' -f1)" = "$hash" ] && token=$word
    done
    [ -n "$hash" ] && [ -n "$token" ] || die "'$CELLSTREAM auth new-token' printed no token with its sha256 line"
    log "token made by '$CELLSTREAM auth new-token'"
else
    token=$(openssl rand -hex 32)
    hash="sha256:$(printf '%s' "$token" | openssl dgst -sha256 -r | cut -d' ' -f1)"
    log "token made by openssl rand ('auth new-token' not available)"
fi
printf '%s\n' "$token" >"$DIR/token"
printf '{"tenants": {"%s": {"tokens": ["%s"]}}}\n' "$TENANT" "$hash" >"$DIR/auth.json"

chmod 0644 "$DIR/ca.crt" "$DIR/tls.crt" "$DIR/tls.key" "$DIR/auth.json"
chmod 0600 "$DIR/ca.key" "$DIR/client.key" "$DIR/token"
log "auth file: $DIR/auth.json (tenant $TENANT); token: $DIR/token"
