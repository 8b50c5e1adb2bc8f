#!/usr/bin/env bash
# dnsperf against ferry dns, Unbound (local-data) and Knot DNS (authoritative), serving the same
# generated cluster.local zone on loopback. Each server gets CPU $CPU_SERVER and one thread;
# dnsperf runs on CPU $CPU_LOAD. Prints a Markdown table; raw output goes to $OUT.
#
#   FERRY_BIN=/work/target-bench/release/ferry benches/dns/run.sh
#
# Knobs: DUR (seconds per throughput run, default 10), ROUNDS (default 3), RATE (queries/s for the latency run,
# default 20000), LAT_DUR (seconds, default 10), SERVICES (default 1000), CONTENDERS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
FERRY_BIN="${FERRY_BIN:-${CARGO_TARGET_DIR:-target}/release/ferry}"
DUR="${DUR:-10}"
ROUNDS="${ROUNDS:-3}"
RATE="${RATE:-20000}"
LAT_DUR="${LAT_DUR:-10}"
SERVICES="${SERVICES:-1000}"
CPU_SERVER="${CPU_SERVER:-1}"
CPU_LOAD="${CPU_LOAD:-0}"
CONTENDERS="${CONTENDERS:-ferry unbound knot}"
OUT="${OUT:-$(mktemp -d /tmp/ferrydnsbench.XXXXXX)}"
for tool in dnsperf unbound knotd taskset python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install dnsperf unbound knot util-linux)" >&2; exit 1; }
done
[ -x "$FERRY_BIN" ] || { echo "no ferry binary at $FERRY_BIN (cargo build --release -p ferry)" >&2; exit 1; }

python3 "$here/gen.py" "$OUT" "$SERVICES"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

port_of() { case "$1" in ferry) echo 15353;; unbound) echo 15354;; knot) echo 15355;; esac; }

start() {
  local name=$1 port; port=$(port_of "$1")
  case "$name" in
    ferry)
      FERRY_LOG=warn taskset -c "$CPU_SERVER" "$FERRY_BIN" dns --config "$OUT/manifests" \
        --listen "127.0.0.1:$port" --no-forward --admin-address 127.0.0.1:0 --worker-threads 1 \
        >"$OUT/ferry.log" 2>&1 &
      pids+=($!) ;;
    unbound)
      cat >"$OUT/unbound.conf" <<CONF
server:
  interface: 127.0.0.1@$port
  num-threads: 1
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$OUT"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  msg-cache-size: 64m
  rrset-cache-size: 64m
$(cat "$OUT/unbound-local-data.conf")
remote-control:
  control-enable: no
CONF
      taskset -c "$CPU_SERVER" unbound -d -c "$OUT/unbound.conf" >"$OUT/unbound.log" 2>&1 &
      pids+=($!) ;;
    knot)
      mkdir -p "$OUT/knot"
      cat >"$OUT/knot.conf" <<CONF
server:
  rundir: "$OUT/knot"
  listen: 127.0.0.1@$port
  udp-workers: 1
  tcp-workers: 1
  background-workers: 1
database:
  storage: "$OUT/knot"
log:
  - target: stderr
    any: warning
zone:
  - domain: cluster.local
    file: "$OUT/cluster.local.zone"
    storage: "$OUT/knot"
CONF
      taskset -c "$CPU_SERVER" knotd -c "$OUT/knot.conf" >"$OUT/knot.log" 2>&1 &
      pids+=($!) ;;
  esac
  # Ready when it answers.
  for _ in $(seq 1 100); do
    if dig @127.0.0.1 -p "$port" +tries=1 +time=1 +short svc-0.ns-0.svc.cluster.local A 2>/dev/null | grep -q 10.96; then
      # Knot pins its UDP worker threads to CPUs of its own choosing (worker i -> CPU i), which
      # would put its worker next to dnsperf; re-pin every thread of every server to CPU_SERVER.
      taskset -a -p -c "$CPU_SERVER" "${pids[-1]}" >/dev/null
      grep -h Cpus_allowed_list /proc/"${pids[-1]}"/task/*/status | sort -u >"$OUT/$name.cpus"
      return 0
    fi
    sleep 0.1
  done
  echo "$name did not start; see $OUT/$name.log" >&2
  exit 1
}

# Same answers from every server (rcode + sorted rdata) for a sample of the query file.
check_same() {
  local name=$1 port; port=$(port_of "$1")
  head -200 "$OUT/queries.txt" | while read -r q t; do
    printf '%s %s ' "$q" "$t"
    dig @127.0.0.1 -p "$port" +norec +tries=1 +time=2 "$q" "$t" | awk '/status:/{s=$6} /^[^;].*IN/{print $NF}' | sort | tr '\n' ' '
    dig @127.0.0.1 -p "$port" +norec +tries=1 +time=2 "$q" "$t" | grep -o 'status: [A-Z]*'
  done >"$OUT/answers-$name.txt"
}

for c in $CONTENDERS; do
  start "$c"
  check_same "$c"
  taskset -c "$CPU_LOAD" dnsperf -s 127.0.0.1 -p "$(port_of "$c")" -d "$OUT/queries.txt" -l 2 -c 4 -q 200 >/dev/null 2>&1 # warm-up
done

# Interleaved rounds (the order reverses every other round); the table shows medians.
order="$CONTENDERS"
for r in $(seq 1 "$ROUNDS"); do
  for c in $order; do
    port=$(port_of "$c")
    taskset -c "$CPU_LOAD" dnsperf -s 127.0.0.1 -p "$port" -d "$OUT/queries.txt" -l "$DUR" -c 4 -q 200 >"$OUT/$c-qps-$r.txt" 2>&1
    taskset -c "$CPU_LOAD" dnsperf -s 127.0.0.1 -p "$port" -d "$OUT/queries.txt" -l "$LAT_DUR" -Q "$RATE" -c 4 -v >"$OUT/$c-lat-$r.txt" 2>&1
    qps=$(awk '/Queries per second/{printf "%.0f", $4}' "$OUT/$c-qps-$r.txt")
    lost=$(awk '/Queries lost/{print $3}' "$OUT/$c-qps-$r.txt")
    read -r p50 p99 < <(awk '/^> /{print $NF*1000}' "$OUT/$c-lat-$r.txt" | sort -g | awk '{a[NR]=$1} END{printf "%.3f %.3f\n", a[int(NR*0.5)], a[int(NR*0.99)]}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$r" "$qps" "$lost" "$p50" "$p99" | tee -a "$OUT/results.tsv" >&2
  done
  order=$(echo "$order" | tr ' ' '\n' | tac | tr '\n' ' ')
done

median() { sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '| server | queries/s (saturated, %ss, median of %s) | lost queries (max) | p50 ms at %s q/s | p99 ms at %s q/s |\n|---|---:|---:|---:|---:|\n' "$DUR" "$ROUNDS" "$RATE" "$RATE" >"$OUT/table.md"
for c in $CONTENDERS; do
  col() { awk -v c="$c" -v k="$1" -F'\t' '$1==c{print $k}' "$OUT/results.tsv"; }
  printf '| %s | %s | %s | %s | %s |\n' "$c" "$(col 3 | median)" "$(col 4 | sort -g | tail -1)" "$(col 5 | median)" "$(col 6 | median)" >>"$OUT/table.md"
done
for c in $CONTENDERS; do
  if [ "$c" != "ferry" ] && [ -f "$OUT/answers-ferry.txt" ] && ! diff -q "$OUT/answers-ferry.txt" "$OUT/answers-$c.txt" >/dev/null; then
    echo "note: $c answers differ from ferry's on the sample (see $OUT/answers-*.txt)" >&2
  fi
done
cat "$OUT/table.md"
echo "raw output: $OUT" >&2
