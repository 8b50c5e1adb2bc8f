#!/usr/bin/env bash
# ferry vs HAProxy (L4, loopback): one run, side by side, Markdown table on stdout.
#
# Everything runs inside a fresh network namespace `ferrybench-$$` (private loopback, private sysctls:
# tcp_tw_reuse=1 and ip_local_port_range 1024-65535 are set there only; the host is not touched).
#
#   backends (CPU0): nginx, 1 worker, ~100-byte file on 127.0.0.2:8080 and 127.0.0.3:8080
#                    iperf3 -s on 127.0.0.2:5201 (one endpoint: an iperf3 test must land on one server)
#   proxies  (CPU1): ferry  `ferry lb --worker-threads 1`  http 127.0.0.1:18080  bulk 127.0.0.1:15201
#                    haproxy `mode tcp`, nbthread 1         http 127.0.0.1:18081  bulk 127.0.0.1:15202
#   load     (CPU0): iperf3 -c (bulk1: -P1, bulk8: -P8); wrk -t2 -c64 (ka: keep-alive, close: Connection: close)
#
# Cells are interleaved: for each test, every contender in turn, ROUNDS times (order alternates per round).
# Per cell: throughput, p99 (wrk), the proxy's utime+stime delta from /proc/PID/stat (process tree),
# CPU1 busy from /proc/stat, and the CPU used by processes outside the namespace ("foreign", shared box).
# A cell with foreign CPU above FOREIGN_MAX % of the machine is re-run up to RETRIES times; the least
# contaminated attempt is kept and flagged.
#
# Environment (defaults in brackets):
#   DUR [10]          seconds per measured cell          TESTS ["bulk1 bulk8 ka close"]
#   ROUNDS [2]        rounds per (test, contender)        CONTENDERS ["ferry haproxy"] (also: direct)
#   FERRY_BIN [${CARGO_TARGET_DIR:-<repo>/target}/release/ferry]
#   OUT [mktemp -d /tmp/ferrybench.XXXXXX]  raw output, configs, results.tsv, report.md
#   QUIET_PCT [25] QUIET_MAX [5]    before a cell, wait (at most QUIET_MAX s) until machine busy < QUIET_PCT %
#   FOREIGN_MAX [10] RETRIES [1]    re-run cells with more foreign CPU (% of the machine) than this,
#   RETRY_UNTIL [240]               but only during the first RETRY_UNTIL seconds of the run (bounds runtime)
#   WARMUP [1]        seconds of unmeasured wrk before each HTTP cell
#   FERRY_ZERO_COPY [false]  set `zeroCopy: true` on ferry's listeners (splice for bulk data)
#   FERRY_LOG [warn]  ferry log filter (FERRY_LOG and RUST_LOG; HAProxy runs without logging)
#   CPU_PROXY [1] CPU_LOAD [0]
#
# Needs root, iproute2, taskset, haproxy, nginx (nginx-light), iperf3, wrk, jq.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

DUR=${DUR:-10}
ROUNDS=${ROUNDS:-2}
TESTS=${TESTS:-"bulk1 bulk8 ka close"}
CONTENDERS=${CONTENDERS:-"ferry haproxy"}
FERRY_BIN=${FERRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/ferry}
QUIET_PCT=${QUIET_PCT:-25}
QUIET_MAX=${QUIET_MAX:-5}
FOREIGN_MAX=${FOREIGN_MAX:-10}
RETRIES=${RETRIES:-1}
RETRY_UNTIL=${RETRY_UNTIL:-240}
WARMUP=${WARMUP:-1}
FERRY_LOG=${FERRY_LOG:-warn}
FERRY_ZERO_COPY=${FERRY_ZERO_COPY:-false}
CPU_PROXY=${CPU_PROXY:-1}
CPU_LOAD=${CPU_LOAD:-0}
WRK_THREADS=2
WRK_CONNS=64

NS=ferrybench-$$
NSX=(ip netns exec "$NS")
NS_MADE=0
declare -A PID_OF=()   # contender/backend name -> pid (only processes this script started)
declare -A READY=()    # contender -> 1 once it has accepted connections
LOAD_PID=
CLEANED=0

note() { # add a report note once
  local n
  for n in "${NOTES[@]}"; do [[ $n == "$1" ]] && return 0; done
  NOTES+=("$1")
}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# === cleanup ===

kill_pid() { # pid: TERM, bounded wait, KILL
  local pid=$1 i
  [[ -n $pid ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 30; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

cleanup() {
  ((CLEANED)) && return
  CLEANED=1
  kill_pid "$LOAD_PID"
  local name
  for name in "${!PID_OF[@]}"; do kill_pid "${PID_OF[$name]}"; done
  if ((NS_MADE)); then ip netns del "$NS" 2>/dev/null || log "could not delete netns $NS"; fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

# === preflight ===

[[ $(id -u) == 0 ]] || die "needs root (network namespace)"
for tool in ip taskset timeout haproxy nginx iperf3 wrk jq stat; do
  command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install haproxy nginx-light iperf3 wrk jq)"
done
[[ $DUR =~ ^[0-9]+$ && $DUR -ge 1 ]] || die "DUR must be a positive integer"
for c in $CONTENDERS; do
  case $c in
  ferry) [[ -x $FERRY_BIN ]] || die "FERRY_BIN=$FERRY_BIN not found; build it: cargo build --release -p ferry" ;;
  haproxy | direct) ;;
  *) die "unknown contender: $c" ;;
  esac
done
for t in $TESTS; do case $t in bulk1 | bulk8 | ka | close) ;; *) die "unknown test: $t" ;; esac; done
NCPU=$(nproc)
((NCPU >= 2)) || log "warning: fewer than 2 CPUs; pinning CPU_PROXY=$CPU_PROXY will fail"
CLK_TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)

OUT=${OUT:-$(mktemp -d /tmp/ferrybench.XXXXXX)}
mkdir -p "$OUT/raw" "$OUT/work/www" "$OUT/work/ferry" || die "cannot create $OUT"
RESULTS=$OUT/results.tsv
printf 'test\tcontender\tround\tattempt\tok\tvalue\tp99_ms\tunits\tcpu_s\twall_s\tproxy_pct\tcpu1_pct\tforeign_pct\terrors\n' >"$RESULTS"
NOTES=()
NOISY=0 CELLS=0

# === sampling ===

# Sum of utime+stime+cutime+cstime (ticks) of the given processes and their live descendants.
tree_ticks() {
  (($#)) || {
    echo 0
    return
  }
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v roots="$*" '
    { pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " ")
      ppid[pid] = f[2]; t[pid] = f[12] + f[13] + f[14] + f[15] }
    END { n = split(roots, r, " "); for (i = 1; i <= n; i++) inset[r[i]] = 1
      changed = 1
      while (changed) { changed = 0
        for (p in ppid) if (!(p in inset) && (ppid[p] in inset)) { inset[p] = 1; changed = 1 } }
      s = 0; for (p in inset) if (p in t) s += t[p]; print s }'
}

# Ticks used by everything this script runs: its own processes and trees (backends, proxies) plus
# this shell itself including reaped children (the load generator and the sampling tools).
# "Foreign" CPU in a cell = machine busy - this; it includes interrupt and kernel-thread time.
ours_ticks() {
  tree_ticks "${PID_OF[@]}" $$
}

# "busy total" jiffies from /proc/stat for a line prefix ("cpu" = machine, "cpu1" = CPU1).
cpu_jiffies() {
  awk -v k="$1" '$1 == k { b = $2 + $3 + $4 + $7 + $8; print b, b + $5 + $6 + $9 }' /proc/stat
}

now() { date +%s.%N; }

wait_quiet() { # bounded: at most QUIET_MAX seconds
  local deadline=$((SECONDS + QUIET_MAX)) b0 t0 b1 t1 pct
  while :; do
    read -r b0 t0 < <(cpu_jiffies cpu)
    sleep 1
    read -r b1 t1 < <(cpu_jiffies cpu)
    pct=$(((b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
    ((pct < QUIET_PCT)) && return 0
    if ((SECONDS >= deadline)); then
      log "machine still ${pct}% busy after ${QUIET_MAX}s; measuring anyway"
      return 0
    fi
  done
}

# === namespace and backends ===

setup_ns() {
  ip netns add "$NS" || die "ip netns add $NS failed"
  NS_MADE=1
  "${NSX[@]}" ip link set lo up || die "lo up failed"
  "${NSX[@]}" sysctl -qw net.ipv4.tcp_tw_reuse=1 || die "sysctl tcp_tw_reuse (netns) failed"
  "${NSX[@]}" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" || die "sysctl port range (netns) failed"
}

# Poll until HOST:PORT accepts a TCP connection inside the namespace (deadline in seconds).
wait_port() {
  local host=$1 port=$2 pid=$3 deadline=$((SECONDS + ${4:-15}))
  while ((SECONDS < deadline)); do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    "${NSX[@]}" timeout 1 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

start_backends() {
  local w=$OUT/work
  # 100-byte body.
  printf '%099d\n' 0 >"$w/www/index.html"
  cat >"$w/nginx.conf" <<EOF
user root;
daemon off;
worker_processes 1;
pid $w/nginx.pid;
error_log $w/nginx-error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections 8000; }
http {
  access_log off;
  client_body_temp_path $w/nginx-tmp;
  proxy_temp_path $w/nginx-tmp;
  fastcgi_temp_path $w/nginx-tmp;
  uwsgi_temp_path $w/nginx-tmp;
  scgi_temp_path $w/nginx-tmp;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  default_type text/html;
  server {
    listen 127.0.0.2:8080 backlog=4096;
    listen 127.0.0.3:8080 backlog=4096;
    root $w/www;
  }
}
EOF
  mkdir -p "$w/nginx-tmp"
  "${NSX[@]}" taskset -c "$CPU_LOAD" nginx -p "$w" -c "$w/nginx.conf" -e "$w/nginx-error.log" \
    >"$OUT/raw/nginx.log" 2>&1 &
  PID_OF[nginx]=$!
  if ! wait_port 127.0.0.2 8080 "${PID_OF[nginx]}" || ! wait_port 127.0.0.3 8080 "${PID_OF[nginx]}"; then
    die "nginx did not come up (see $OUT/raw/nginx.log, $w/nginx-error.log)"
  fi
  start_iperf_server
}

start_iperf_server() {
  kill_pid "${PID_OF[iperf3]:-}"
  "${NSX[@]}" taskset -c "$CPU_LOAD" iperf3 -s -B 127.0.0.2 -p 5201 --idle-timeout 30 \
    >>"$OUT/raw/iperf3-server.log" 2>&1 &
  PID_OF[iperf3]=$!
  wait_port 127.0.0.2 5201 "${PID_OF[iperf3]}" || die "iperf3 server did not come up"
}

# === contenders ===

http_port() { case $1 in ferry) echo 18080 ;; haproxy) echo 18081 ;; direct) echo 8080 ;; esac }
bulk_port() { case $1 in ferry) echo 15201 ;; haproxy) echo 15202 ;; direct) echo 5201 ;; esac }
front_ip() { case $1 in direct) echo 127.0.0.2 ;; *) echo 127.0.0.1 ;; esac }

write_configs() {
  local f=$OUT/work/ferry
  cat >"$f/http.yaml" <<'EOF'
apiVersion: ferry.ethercluster.io/v1alpha1
kind: Listener
metadata: {name: http}
spec:
  address: 127.0.0.1:18080
  protocol: TCP
  backends: ["127.0.0.2:8080", "127.0.0.3:8080"]
  balancing: RoundRobin
EOF
  cat >"$f/bulk.yaml" <<'EOF'
apiVersion: ferry.ethercluster.io/v1alpha1
kind: Listener
metadata: {name: bulk}
spec:
  address: 127.0.0.1:15201
  protocol: TCP
  backends: ["127.0.0.2:5201"]
  balancing: RoundRobin
EOF
  if [[ $FERRY_ZERO_COPY == true ]]; then
    printf '  zeroCopy: true\n' >>"$f/http.yaml"
    printf '  zeroCopy: true\n' >>"$f/bulk.yaml"
  fi
  cat >"$OUT/work/haproxy.cfg" <<'EOF'
global
  nbthread 1
  maxconn 8000

defaults
  mode tcp
  balance roundrobin
  maxconn 8000
  timeout connect 5s
  timeout client 120s
  timeout server 120s

listen http
  bind 127.0.0.1:18081
  server b1 127.0.0.2:8080
  server b2 127.0.0.3:8080

listen bulk
  bind 127.0.0.1:15202
  server b1 127.0.0.2:5201
EOF
}

start_contender() {
  local c=$1
  case $c in
  direct) return 0 ;;
  ferry)
    "${NSX[@]}" env FERRY_LOG="$FERRY_LOG" RUST_LOG="$FERRY_LOG" taskset -c "$CPU_PROXY" "$FERRY_BIN" lb --config "$OUT/work/ferry" \
      --admin-address 127.0.0.1:0 --worker-threads 1 >>"$OUT/raw/ferry.log" 2>&1 &
    ;;
  haproxy)
    "${NSX[@]}" taskset -c "$CPU_PROXY" haproxy -db -f "$OUT/work/haproxy.cfg" >>"$OUT/raw/haproxy.log" 2>&1 &
    ;;
  esac
  PID_OF[$c]=$!
  if wait_port 127.0.0.1 "$(http_port "$c")" "${PID_OF[$c]}" && wait_port 127.0.0.1 "$(bulk_port "$c")" "${PID_OF[$c]}"; then
    READY[$c]=1
    return 0
  fi
  log "$c did not start listening (see $OUT/raw/$c.log)"
  note "$c failed to start (see raw/$c.log)"
  kill_pid "${PID_OF[$c]}"
  return 1
}

ensure_contender() { # restart a contender that died
  local c=$1
  [[ $c == direct ]] && return 0
  if [[ -n ${PID_OF[$c]:-} ]] && kill -0 "${PID_OF[$c]}" 2>/dev/null; then return 0; fi
  [[ -n ${READY[$c]:-} ]] && note "$c died between cells and was restarted (see raw/$c.log)"
  start_contender "$c"
}

# === load ===

# Runs a bounded load command inside the namespace on CPU_LOAD; output to $1.
run_load() {
  local out=$1
  shift
  "${NSX[@]}" timeout -k 5 $((DUR + 30)) taskset -c "$CPU_LOAD" "$@" >"$out" 2>&1 &
  LOAD_PID=$!
  wait "$LOAD_PID"
  local rc=$?
  LOAD_PID=
  return $rc
}

to_ms() { # wrk latency "123.45us|ms|s" -> ms
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

# Sets: OK VALUE P99 UNITS ERRORS
parse_wrk() {
  local f=$1 p99 reqs rps
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$f")
  reqs=$(awk '/requests in/ { print $1 }' "$f")
  p99=$(awk '$1 == "99%" { print $2 }' "$f")
  ERRORS=$(awk '/Socket errors:/ { gsub(",", ""); e = $4 + $6 + $8 + $10 } /Non-2xx/ { e += $NF } END { print e + 0 }' "$f")
  if [[ -n $rps && -n $reqs && -n $p99 && $reqs -gt 0 ]]; then
    OK=1 VALUE=$rps UNITS=$reqs P99=$(to_ms "$p99")
  else
    OK=0 VALUE=0 UNITS=0 P99=0
  fi
}

parse_iperf() {
  local f=$1 bps bytes
  bps=$(jq -r '.end.sum_received.bits_per_second // empty' "$f" 2>/dev/null)
  bytes=$(jq -r '.end.sum_received.bytes // empty' "$f" 2>/dev/null)
  P99=0 ERRORS=0
  if [[ -n $bps && -n $bytes ]] && [[ $(jq -r '.error // empty' "$f" 2>/dev/null) == "" ]]; then
    OK=1 VALUE=$(awk -v b="$bps" 'BEGIN { printf "%.3f", b / 1e9 }') UNITS=${bytes%.*}
  else
    OK=0 VALUE=0 UNITS=0 ERRORS=1
  fi
}

# One measured attempt of (test, contender). Sets OK VALUE P99 UNITS ERRORS CPU_S WALL_S PROXY_PCT CPU1_PCT FOREIGN_PCT.
measure() {
  local t=$1 c=$2 tag=$3 ip port url raw pid
  ip=$(front_ip "$c")
  pid=${PID_OF[$c]:-}
  raw=$OUT/raw/$tag
  local load=()
  case $t in
  bulk1 | bulk8)
    port=$(bulk_port "$c")
    load=(iperf3 -c "$ip" -p "$port" -t "$DUR" -P "${t#bulk}" -J --connect-timeout 3000)
    ;;
  ka | close)
    port=$(http_port "$c")
    url=http://$ip:$port/
    load=(wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${DUR}s" --latency)
    [[ $t == close ]] && load+=(-H "Connection: close")
    load+=("$url")
    if ((WARMUP > 0)); then
      local warm=("${load[@]}")
      warm[3]="-d${WARMUP}s"
      run_load "$raw.warmup" "${warm[@]}"
    fi
    ;;
  esac
  wait_quiet
  local p0 o0 m0 cb0 ct0 w0 p1 o1 m1 cb1 ct1 w1
  p0=$(tree_ticks ${pid:+"$pid"}) o0=$(ours_ticks) w0=$(now)
  read -r m0 _ < <(cpu_jiffies cpu)
  read -r cb0 ct0 < <(cpu_jiffies "cpu$CPU_PROXY")
  run_load "$raw.out" "${load[@]}"
  read -r cb1 ct1 < <(cpu_jiffies "cpu$CPU_PROXY")
  read -r m1 _ < <(cpu_jiffies cpu)
  p1=$(tree_ticks ${pid:+"$pid"}) o1=$(ours_ticks) w1=$(now)
  case $t in
  bulk*) parse_iperf "$raw.out" ;;
  *) parse_wrk "$raw.out" ;;
  esac
  read -r CPU_S WALL_S PROXY_PCT CPU1_PCT FOREIGN_PCT < <(awk -v p0="$p0" -v p1="$p1" -v f0="$((m0 - o0))" -v f1="$((m1 - o1))" \
    -v w0="$w0" -v w1="$w1" -v cb0="$cb0" -v cb1="$cb1" -v ct0="$ct0" -v ct1="$ct1" -v hz="$CLK_TCK" -v n="$NCPU" \
    'BEGIN { w = w1 - w0; cpu = (p1 - p0) / hz; dt = ct1 - ct0; if (dt <= 0) dt = 1
      f = 100 * (f1 - f0) / hz / w / n; if (f < 0) f = 0
      printf "%.3f %.3f %.1f %.1f %.1f\n", cpu, w, 100 * cpu / w, 100 * (cb1 - cb0) / dt, f }')
  if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
    OK=0
    note "$tag: $c exited during the cell"
  fi
}

run_cell() { # test contender round
  local t=$1 c=$2 r=$3 a best_f=1e9 line best_line=
  for ((a = 1; a <= RETRIES + 1; a++)); do
    ensure_contender "$c" || {
      best_line=$(printf '%s\t%s\t%s\t%s\t0\t0\t0\t0\t0\t0\t0\t0\t0\t1' "$t" "$c" "$r" "$a")
      note "$t/$c round $r: $c not running"
      break
    }
    measure "$t" "$c" "$t-$c-r$r-a$a"
    if ((!OK)) && [[ $t == bulk* ]]; then # a stuck iperf3 server fails every later cell: restart it
      note "$t/$c round $r attempt $a: iperf3 failed (raw/$t-$c-r$r-a$a.out); iperf3 server restarted"
      start_iperf_server
    fi
    line=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$t" "$c" "$r" "$a" "$OK" "$VALUE" \
      "$P99" "$UNITS" "$CPU_S" "$WALL_S" "$PROXY_PCT" "$CPU1_PCT" "$FOREIGN_PCT" "$ERRORS")
    log "$t $c r$r a$a: ok=$OK value=$VALUE p99=${P99}ms cpu=${CPU_S}s (${PROXY_PCT}%) cpu1=${CPU1_PCT}% foreign=${FOREIGN_PCT}% errors=$ERRORS"
    if awk -v f="$FOREIGN_PCT" -v b="$best_f" -v ok="$OK" 'BEGIN { exit !(ok && f < b) }' || [[ -z $best_line ]]; then
      best_line=$line best_f=$FOREIGN_PCT
    fi
    if ((OK)) && awk -v f="$FOREIGN_PCT" -v m="$FOREIGN_MAX" 'BEGIN { exit !(f <= m) }'; then break; fi
    ((SECONDS - START < RETRY_UNTIL)) || break
    ((OK)) && ((a <= RETRIES)) && log "foreign CPU ${FOREIGN_PCT}% > ${FOREIGN_MAX}%: re-running"
  done
  printf '%s\n' "$best_line" >>"$RESULTS"
  local kept_f kept_ok
  kept_ok=$(cut -f5 <<<"$best_line") kept_f=$(cut -f13 <<<"$best_line")
  if ((kept_ok)) && awk -v f="$kept_f" -v m="$FOREIGN_MAX" 'BEGIN { exit !(f > m) }'; then
    NOISY=$((NOISY + 1))
  fi
  CELLS=$((CELLS + 1))
  if ((kept_ok)) && (($(cut -f14 <<<"$best_line") > 0)); then
    note "$t/$c round $r: $(cut -f14 <<<"$best_line") wrk socket errors / non-2xx responses"
  fi
}

# === report ===

report() {
  local ratio=0
  [[ " $CONTENDERS " == *" ferry "* && " $CONTENDERS " == *" haproxy "* ]] && ratio=1
  {
    awk -F'\t' -v contenders="$CONTENDERS" -v tests="$TESTS" -v ratio="$ratio" '
      function median(key,   n, i, j, v, tmp) {
        n = cnt[key]; if (n == 0) return ""
        for (i = 1; i <= n; i++) v[i] = vals[key, i]
        for (i = 2; i <= n; i++) { tmp = v[i]; j = i - 1; while (j >= 1 && v[j] > tmp) { v[j + 1] = v[j]; j-- } v[j + 1] = tmp }
        return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
      }
      function add(key, v) { cnt[key]++; vals[key, cnt[key]] = v }
      function name(c) { return c == "haproxy" ? "HAProxy" : c }
      function fmt(v, f) { return v == "" ? "fail" : sprintf(f, v) }
      function row(label, t, m, f,   i, c, line, a, b) {
        line = "| " label
        for (i = 1; i <= nc; i++) { c = C[i]; line = line " | " (m ~ /^cpu/ && c == "direct" ? "–" : fmt(median(t SUBSEP c SUBSEP m), f)) }
        if (ratio && m == "foreign") line = line " | –"
        else if (ratio) {
          a = median(t SUBSEP "ferry" SUBSEP m); b = median(t SUBSEP "haproxy" SUBSEP m)
          line = line " | " ((a != "" && b != "" && b > 0) ? sprintf("%.2f", a / b) : "–")
        }
        print line " |"
      }
      NR == 1 { next }
      $5 == 1 {
        k = $1 SUBSEP $2
        add(k SUBSEP "value", $6); add(k SUBSEP "p99", $7); add(k SUBSEP "cpu_s", $9)
        if ($8 > 0) {
          if ($1 ~ /^bulk/) add(k SUBSEP "cpu_unit", $9 * 1000 / ($8 / 1e9)); else add(k SUBSEP "cpu_unit", $9 * 1e6 / $8)
        }
        add(k SUBSEP "cpu_pct", $11); add(k SUBSEP "foreign", $13)
      }
      END {
        nc = split(contenders, C, " "); nt = split(tests, T, " ")
        hdr = "| metric"; sep = "|---"
        for (i = 1; i <= nc; i++) { hdr = hdr " | " name(C[i]); sep = sep "|---:" }
        if (ratio) { hdr = hdr " | ferry/HAProxy"; sep = sep "|---:" }
        print hdr " |"; print sep "|"
        for (i = 1; i <= nt; i++) {
          t = T[i]
          if (t == "bulk1" || t == "bulk8") {
            s = (t == "bulk1") ? "1 stream" : "8 streams"
            row("TCP " s " (iperf3), Gbit/s ↑", t, "value", "%.2f")
            row("TCP " s ": proxy CPU, s", t, "cpu_s", "%.2f")
            row("TCP " s ": proxy CPU per GB, ms ↓", t, "cpu_unit", "%.0f")
            row("TCP " s ": CPU of other processes, % of machine", t, "foreign", "%.0f")
          } else if (t == "ka") {
            row("HTTP keep-alive (wrk -c64), req/s ↑", t, "value", "%.0f")
            row("keep-alive: p99 latency, ms ↓", t, "p99", "%.2f")
            row("keep-alive: proxy CPU, s", t, "cpu_s", "%.2f")
            row("keep-alive: proxy CPU per request, µs ↓", t, "cpu_unit", "%.1f")
            row("keep-alive: CPU of other processes, % of machine", t, "foreign", "%.0f")
          } else if (t == "close") {
            row("new connections (wrk -c64, Connection: close), conn/s ↑", t, "value", "%.0f")
            row("close: p99 latency, ms ↓", t, "p99", "%.2f")
            row("close: proxy CPU, s", t, "cpu_s", "%.2f")
            row("close: proxy CPU per connection, µs ↓", t, "cpu_unit", "%.1f")
            row("close: CPU of other processes, % of machine", t, "foreign", "%.0f")
          }
        }
      }' "$RESULTS"
  }
}

# === main ===

# One function, so that bash has read all of it before it starts: editing this file during a run
# cannot change what the run executes.
main() {

START=$SECONDS
log "output: $OUT (netns $NS, DUR=${DUR}s, ROUNDS=$ROUNDS, tests: $TESTS, contenders: $CONTENDERS, nofile=$NOFILE)"
setup_ns
write_configs
start_backends
for c in $CONTENDERS; do start_contender "$c"; done

read -ra r_order <<<"$CONTENDERS"
for t in $TESTS; do
  for ((r = 1; r <= ROUNDS; r++)); do
    order=("${r_order[@]}")
    if ((r % 2 == 0)); then # alternate order per round so drift hits every contender alike
      order=()
      for ((i = ${#r_order[@]} - 1; i >= 0; i--)); do order+=("${r_order[$i]}"); done
    fi
    for c in "${order[@]}"; do run_cell "$t" "$c" "$r"; done
  done
done
ELAPSED=$((SECONDS - START))

ferry_ver=$([[ " $CONTENDERS " == *" ferry "* ]] && "$FERRY_BIN" --version 2>/dev/null | head -1)
git_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)
git_dirty=$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l)
((git_dirty > 0)) || git_dirty=
{
  echo "ferry vs HAProxy, L4 on loopback (netns), $(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), ${NCPU} CPUs,"
  echo "DUR=${DUR}s × ROUNDS=$ROUNDS (median), proxy on CPU$CPU_PROXY, wrk/iperf3/nginx on CPU$CPU_LOAD; run took ${ELAPSED}s."
  echo "ferry: ${ferry_ver:-?} (zeroCopy=$FERRY_ZERO_COPY, $FERRY_BIN, repo ${git_rev:-?}${git_dirty:+, $git_dirty uncommitted files}); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1 | cut -d' ' -f3)"
  echo
  report
  echo
  echo "↑ higher is better, ↓ lower is better. Proxy CPU = utime+stime of the proxy process (all threads)"
  echo "during the measured window; per-unit figures divide it by bytes received by iperf3, completed requests,"
  echo "or completed requests = connections (close test). \"CPU of other processes\" = machine busy time"
  echo "(/proc/stat) minus everything this run started: other tenants of the box; above ~10 % expect noise."
  ((NOISY)) && note "$NOISY of $CELLS cells ran with more than ${FOREIGN_MAX}% of the machine used by other processes (after up to $RETRIES re-run(s) each): throughput and latency are noisy; CPU per unit holds up better"
  if ((${#NOTES[@]})); then
    echo
    echo "Notes:"
    printf -- '- %s\n' "${NOTES[@]}"
  fi
} | tee "$OUT/report.md"
log "raw data: $RESULTS"
}

main
