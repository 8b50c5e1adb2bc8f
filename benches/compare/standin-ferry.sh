#!/usr/bin/env bash
# Stand-in for `ferry lb` when testing run.sh itself: FERRY_BIN=benches/compare/standin-ferry.sh
# Accepts `lb --config DIR [--admin-address A] [--worker-threads N]`, reads the Listener YAMLs
# (spec.address and a one-line spec.backends list) and execs HAProxy (mode tcp) on those addresses,
# so the PID run.sh measures is the proxy's. Not a benchmark of anything; it only exercises the harness.
set -euo pipefail
[[ ${1:-} == lb ]] || {
  echo "usage: $0 lb --config DIR [--admin-address A] [--worker-threads N]" >&2
  exit 2
}
shift
dir='' threads=1
while (($#)); do
  case $1 in
  --config)
    dir=$2
    shift 2
    ;;
  --worker-threads)
    threads=$2
    shift 2
    ;;
  --admin-address) shift 2 ;;
  --version)
    echo "standin-ferry (haproxy)"
    exit 0
    ;;
  *) shift ;;
  esac
done
[[ -d $dir ]] || {
  echo "--config DIR required" >&2
  exit 2
}
cfg=$dir/../standin-ferry-haproxy.cfg
{
  printf 'global\n  nbthread %s\n  maxconn 8000\ndefaults\n  mode tcp\n  balance roundrobin\n  maxconn 8000\n' "$threads"
  printf '  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n'
  n=0
  for f in "$dir"/*.yaml; do
    n=$((n + 1))
    addr=$(awk '$1 == "address:" { print $2 }' "$f")
    printf 'listen l%d\n  bind %s\n' "$n" "$addr"
    awk '$1 == "backends:" { s = $0; sub(/^[^[]*\[/, "", s); sub(/\].*$/, "", s); gsub(/[" ]/, "", s)
      k = split(s, b, ","); for (i = 1; i <= k; i++) printf "  server s%d %s\n", i, b[i] }' "$f"
  done
} >"$cfg"
exec haproxy -db -f "$cfg"
