#!/usr/bin/env bash
# The cluster map and HAProxy files of deploy/cluster, made by `cellstream cluster init` and
# `cellstream cluster haproxy` (never by hand: the proxy and the replicas must agree).
#
#   deploy/cluster/make-config.sh compose [REPLICAS]          -> deploy/cluster/config/
#   deploy/cluster/make-config.sh k8s [REPLICAS] [NAMESPACE]  -> deploy/cluster/k8s/config/
#
# REPLICAS defaults to 3, NAMESPACE to `default`; SHARDS (256), OUT (the folder above),
# CLUSTER_DOMAIN (cluster.local) and CELLSTREAM (the command, e.g. "python -m cellstream")
# may be set.  Kubernetes addresses are fully qualified because HAProxy's run-time resolver
# does not apply resolv.conf's search domains.  The first map is only a start: after a
# rebalance the replicas hold a newer one, and this script would overwrite the record of it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: make-config.sh compose|k8s [REPLICAS] [NAMESPACE]}
replicas=${2:-3}
namespace=${3:-default}
shards=${SHARDS:-256}
read -r -a cellstream <<<"${CELLSTREAM:-cellstream}"

case "$target" in
  compose)
    out=${OUT:-$here/config}
    address() { echo "cellstream-$1:50051"; }
    ;;
  k8s)
    out=${OUT:-$here/k8s/config}
    address() { echo "cellstream-$1.cellstream-headless.$namespace.svc.${CLUSTER_DOMAIN:-cluster.local}:50051"; }
    ;;
  *)
    echo "make-config.sh: the target is 'compose' or 'k8s', not '$target'" >&2
    exit 2
    ;;
esac
if ! [[ "$replicas" =~ ^[1-9][0-9]*$ ]]; then
  echo "make-config.sh: REPLICAS must be a whole number >= 1, not '$replicas'" >&2
  exit 2
fi

names=()
for ((i = 0; i < replicas; i++)); do
  names+=("cellstream-$i=$(address "$i")")
done

mkdir -p "$out/haproxy"
"${cellstream[@]}" cluster init --shards "$shards" "${names[@]}" >"$out/map.json.tmp"
mv "$out/map.json.tmp" "$out/map.json"
# Paths as the HAProxy container sees them: the files are mounted at /usr/local/etc/haproxy
# (the official image's config folder), the runtime socket in a writable /var/run/haproxy.
"${cellstream[@]}" cluster haproxy --map "$out/map.json" --out "$out/haproxy" \
  --bind 0.0.0.0:50051 --metrics-bind 0.0.0.0:8405 \
  --map-path /usr/local/etc/haproxy/shards.map --socket /var/run/haproxy/admin.sock >&2
echo "wrote $out/map.json and $out/haproxy/{haproxy.cfg,shards.map} for $replicas replicas" >&2
