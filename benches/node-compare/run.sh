#!/usr/bin/env bash
# The ClusterIP path in network namespaces, one run, side by side: the kernel's own DNAT (kube-proxy
# iptables-mode and nftables-mode rulesets), HAProxy (mode tcp), nginx (stream) and `ferry node`.
# Markdown table on stdout (and $OUT/report.md), with ferry's ratio to every other contender.
#
#  ns cl (client, CPU0)          ns nd (node, CPU1)                        ns be (backends, CPU0)
#  veth-cl 10.10.1.2/24 ──────── veth-ndc 10.10.1.1/24
#  default via 10.10.1.1         veth-ndb 10.10.2.1/24 ────────────────── veth-be 10.10.2.2/24 + .11 .12
#                                ip_forward=1, RPS of both veths -> CPU1   default via 10.10.2.1
#  ClusterIP 10.96.0.10:80   -> nginx 10.10.2.11:80, 10.10.2.12:80 (1 worker, 100-byte file, keep-alive)
#  ClusterIP 10.96.0.11:5201 -> iperf3 -s 10.10.2.11:5201 (one endpoint: an iperf3 test must reach one server)
#  ClusterIP 10.96.0.12:53/UDP -> Knot DNS 10.10.2.11:53 and 10.10.2.12:53 (1 UDP worker; test "udp" only)
#
# Contenders (one active at a time; each cell starts it, measures, stops it):
#   iptables  kube-proxy iptables-mode rules via iptables-restore (nf_tables backend by default):
#             PREROUTING/OUTPUT -> KUBE-SERVICES -> KUBE-SVC (statistic random) -> KUBE-SEP DNAT,
#             KUBE-MARK-MASQ / KUBE-POSTROUTING, KUBE-FORWARD, KUBE-NODEPORTS (addrtype LOCAL)
#   nft       kube-proxy nftables-mode layout: service-ips verdict map -> service chain
#             (numgen random mod N vmap) -> endpoint chains with dnat; masquerading, firewall checks
#   haproxy   HAProxy mode tcp, roundrobin, nbthread 1, VIPs /32 on lo of nd, bind VIP:port
#             (HAProxy has no UDP proxying: its udp cells are "n/a")
#   nginx     nginx stream proxy_pass (round robin), 1 worker, VIPs on lo of nd (udp: `listen ... udp`)
#   ferry     `ferry node` in nd (VIP device ferry0, --worker-threads 1), Services + EndpointSlices as
#             YAML, annotated `ferry.ethercluster.io/balancing: RoundRobin`
#   direct    (optional) no VIP: the client talks to 10.10.2.11 routed through nd; the floor
#
# Tests (load from ns cl under `timeout`): bulk1 / bulk8 = iperf3 -P1 / -P8; ka = wrk -t2 -c64 keep-alive;
# close = the same with `Connection: close` (new connections per second). HTTP cells get WARMUP s of wrk first.
# udp = dnsperf -c DNS_CLIENTS -q 200 (4 client sockets by default, 200 queries outstanding) against the DNS ClusterIP: UDP
# datagrams per second through the ClusterIP, as a cluster's DNS traffic takes (WARMUP s first).
#
# PIN=split (default): client tools and backends on CPU_LOAD (0), the proxy on CPU_NODE (1), RPS puts
# nd's receive processing (forwarding, NAT, the proxy's sockets) on CPU_NODE and cl/be's on CPU_LOAD.
# So CPU_NODE busy time (incl. softirq, /proc/stat) per unit of work is a like-for-like datapath cost for
# the kernel path and the proxies alike ("node CPU"). PIN=none: no affinity, no RPS.
#
# Shared machine: before each cell, wait (at most QUIET_MAX s; QUIET_BUDGET s in all) until the machine
# is < QUIET_PCT % busy for QUIET_SECS consecutive seconds. After a cell, "foreign" = CPU of every process
# outside this run (kernel threads excluded) as % of the machine, and packets received in every other
# network namespace that has a process (kpps; other tenants' softirq lands on our CPUs). A cell above FOREIGN_MAX % or FOREIGN_KPPS kpps is re-run
# (RETRIES, only during the first RETRY_UNTIL s); the least contaminated attempt is kept and flagged.
#
# Environment (defaults in brackets):
#   DUR [10] ROUNDS [1] TESTS ["bulk1 bulk8 ka close"; also "udp"] CONTENDERS ["iptables nft haproxy nginx ferry"]
#   FERRY_BIN [${CARGO_TARGET_DIR:-<repo>/target}/release/ferry]  FERRY_LOG [warn]
#   FERRY_ARGS  extra `ferry node` flags (e.g. --preserve-source-ip=false)
#   FERRY_BUILT_FROM  free text for the report header (e.g. the commit FERRY_BIN was built from)
#   IPTABLES_RESTORE [iptables-restore]  (iptables-legacy-restore for x_tables)
#   OUT [mktemp -d /tmp/nodebench.XXXXXX]  PIN [split] CPU_LOAD [0] CPU_NODE [1] WARMUP [1]
#   DNS_CLIENTS [4]  dnsperf's client sockets in the udp test (each is one flow / conntrack entry)
#   PROXY_THREADS [1]  HAProxy nbthread, nginx worker_processes and ferry --worker-threads (the
#     backends keep one worker); more than 1 only makes sense with PIN=none
#   QUIET_PCT [15] QUIET_SECS [2] QUIET_MAX [10] (per cell) QUIET_BUDGET [60] (whole run, seconds)
#   FOREIGN_MAX [8] FOREIGN_KPPS [5] RETRIES [1] RETRY_UNTIL [200]
#   DIAG [""]  diagnostics per cell, in raw/: "switches" = context switches per command name
#     (raw/TAG.switches, from /proc/*/task/*/status; the load tool's own in raw/TAG.time via
#     /usr/bin/time), "pages" = page allocator events per CPU for DUR/2 s (raw/TAG.pages, perf stat),
#     "syscalls" = system calls of the proxy's processes by name for DUR/2 s (raw/TAG.syscalls, perf trace -s),
#     "profile" = the node CPU's samples by DSO and symbol for DUR/2 s (raw/TAG.profile, perf record -C)
#
# Needs root, iproute2, taskset, nft, iptables, haproxy, nginx + libnginx-mod-stream, iperf3, wrk, jq;
# the udp test also needs dnsperf, knotd (knot) and kdig (knot-dnsutils).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

DUR=${DUR:-10}
ROUNDS=${ROUNDS:-1}
TESTS=${TESTS:-"bulk1 bulk8 ka close"}
CONTENDERS=${CONTENDERS:-"iptables nft haproxy nginx ferry"}
FERRY_BIN=${FERRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/ferry}
FERRY_LOG=${FERRY_LOG:-warn}
IPTABLES_RESTORE=${IPTABLES_RESTORE:-iptables-restore}
PIN=${PIN:-split}
CPU_LOAD=${CPU_LOAD:-0}
CPU_NODE=${CPU_NODE:-1}
WARMUP=${WARMUP:-1}
PROXY_THREADS=${PROXY_THREADS:-1}
DIAG=${DIAG:-}
QUIET_PCT=${QUIET_PCT:-15}
QUIET_SECS=${QUIET_SECS:-2}
QUIET_MAX=${QUIET_MAX:-10}
QUIET_BUDGET=${QUIET_BUDGET:-60}
QUIET_SPENT=0
FOREIGN_MAX=${FOREIGN_MAX:-8}
FOREIGN_KPPS=${FOREIGN_KPPS:-5}
RETRIES=${RETRIES:-1}
RETRY_UNTIL=${RETRY_UNTIL:-200}
WRK_THREADS=2
WRK_CONNS=64

VIP_HTTP=10.96.0.10
VIP_BULK=10.96.0.11
VIP_DNS=10.96.0.12
DNS_CLIENTS=${DNS_CLIENTS:-4}
DNS_OUTSTANDING=200
EP1=10.10.2.11
EP2=10.10.2.12
CLUSTER_CIDR=10.10.1.0/24

TAG=pb$$
NS_CL=$TAG-cl NS_ND=$TAG-nd NS_BE=$TAG-be
CL=(ip netns exec "$NS_CL")
ND=(ip netns exec "$NS_ND")
BE=(ip netns exec "$NS_BE")
NS_MADE=()
declare -A PID_OF=() # name -> pid (only processes this script started)
ACTIVE=              # the contender whose datapath is installed right now
LOAD_PID=
CLEANED=0
NOTES=()

note() {
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
  for ((i = 0; i < 50; i++)); do
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
  [[ -n $ACTIVE ]] && stop_contender "$ACTIVE"
  local name ns
  for name in "${!PID_OF[@]}"; do kill_pid "${PID_OF[$name]}"; done
  for ns in "${NS_MADE[@]}"; do ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"; done
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

# === preflight ===

[[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
for tool in ip taskset timeout nft haproxy nginx iperf3 wrk jq find "$IPTABLES_RESTORE"; do
  command -v "$tool" >/dev/null ||
    die "missing tool: $tool (apt-get install iptables nftables haproxy nginx-light libnginx-mod-stream iperf3 wrk jq)"
done
[[ $DIAG != *switches* || -x /usr/bin/time ]] || die "DIAG=switches needs /usr/bin/time (apt-get install time)"
[[ $DIAG != *pages* && $DIAG != *syscalls* && $DIAG != *profile* ]] || command -v perf >/dev/null ||
  die "DIAG=pages, syscalls and profile need perf (apt-get install linux-perf)"
STREAM_MOD=/usr/lib/nginx/modules/ngx_stream_module.so
[[ $DUR =~ ^[0-9]+$ && $DUR -ge 1 ]] || die "DUR must be a positive integer"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS must be a positive integer"
for c in $CONTENDERS; do
  case $c in
  ferry) [[ -x $FERRY_BIN ]] || die "FERRY_BIN=$FERRY_BIN not found; build it: cargo build --release -p ferry" ;;
  nginx) [[ -f $STREAM_MOD ]] || die "$STREAM_MOD missing (apt-get install libnginx-mod-stream)" ;;
  iptables | nft | haproxy | direct) ;;
  *) die "unknown contender: $c" ;;
  esac
done
for t in $TESTS; do case $t in bulk1 | bulk8 | ka | close | udp) ;; *) die "unknown test: $t" ;; esac; done
if [[ " $TESTS " == *" udp "* ]]; then
  for tool in dnsperf knotd kdig; do
    command -v "$tool" >/dev/null || die "the udp test needs $tool (apt-get install dnsperf knot knot-dnsutils)"
  done
fi
case $PIN in
split)
  TS_LOAD=(taskset -c "$CPU_LOAD")
  TS_NODE=(taskset -c "$CPU_NODE")
  ;;
none) TS_LOAD=() TS_NODE=() ;;
*) die "PIN must be split or none" ;;
esac
NCPU=$(nproc)
((NCPU >= 2)) || [[ $PIN == none ]] || die "PIN=split needs 2 CPUs"
CLK_TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
MAXCONN=$((NOFILE / 2 - 100 < 8000 ? NOFILE / 2 - 100 : 8000))

OUT=${OUT:-$(mktemp -d /tmp/nodebench.XXXXXX)}
W=$OUT/work
mkdir -p "$OUT/raw" "$W/www" "$W/ferry" "$W/nginx-be" "$W/nginx-nd" "$W/knot" || die "cannot create $OUT"
RESULTS=$OUT/results.tsv
printf 'test\tcontender\tround\tattempt\tok\tvalue\tp99_ms\tunits\tproxy_s\tcpu0_s\tnode_s\tnode_si_s\twall_s\tsteal_pct\tforeign_pct\tforeign_kpps\terrors\tquiet\n' >"$RESULTS"
NOISY=0 CELLS=0 UNQUIET=0
WITH_UDP=0
[[ " $TESTS " == *" udp "* ]] && WITH_UDP=1

# === sampling ===

# utime+stime+cutime+cstime (ticks) of the given processes and their live descendants.
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

# The given process and its live descendants, space-separated.
tree_pids() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v root="$1" '
    { pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " "); ppid[pid] = f[2] }
    END { inset[root] = 1; changed = 1
      while (changed) { changed = 0
        for (p in ppid) if (!(p in inset) && (ppid[p] in inset)) { inset[p] = 1; changed = 1 } }
      out = ""; for (p in inset) if (p in ppid) out = out (out == "" ? "" : " ") p; print out }'
}

# CPU ticks of every process that is neither a kernel thread nor this script or its descendants
# (reaped children count through their parent's cutime/cstime).
foreign_ticks() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v me="$$" '
    { pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " ")
      ppid[pid] = f[2]; t[pid] = f[12] + f[13] + f[14] + f[15] }
    END { inset[me] = 1; changed = 1
      while (changed) { changed = 0
        for (p in ppid) if (!(p in inset) && (ppid[p] in inset)) { inset[p] = 1; changed = 1 } }
      s = 0
      for (p in t) if (!(p in inset) && p != 2 && ppid[p] != 2) s += t[p]
      print s }'
}

# "command sleeps preempted": voluntary and involuntary context switches summed per command name.
switches() {
  cat /proc/[0-9]*/task/[0-9]*/status 2>/dev/null | awk '
    /^Name:/ { n = $2 } /^voluntary_ctxt_switches:/ { v[n] += $2 } /^nonvoluntary_ctxt_switches:/ { i[n] += $2 }
    END { for (k in v) print k, v[k], i[k] }'
}

# "inode rx_packets" for every network namespace that has a process, except ours (one /proc/PID/net/dev each).
foreign_netns_packets() {
  find /proc/[0-9]*/ns/net -maxdepth 0 -printf '%p %l\n' 2>/dev/null | awk -v skip="$OUR_NETNS" '
    BEGIN { n = split(skip, s, " "); for (i = 1; i <= n; i++) ours[s[i]] = 1 }
    { ino = $2; gsub(/[^0-9]/, "", ino); if (ino == "" || ino in ours || ino in seen) next
      seen[ino] = 1; p = $1; sub(/\/ns\/net$/, "/net/dev", p); print ino, p }' |
    while read -r ino dev; do
      awk -v ino="$ino" 'NR > 2 { sub(/^[^:]*:/, ""); s += $2 } END { if (NR > 2) print ino, s }' "$dev" </dev/null 2>/dev/null
    done
}

# Per-CPU jiffies from /proc/stat: "busy softirq steal total" (busy = user+nice+system+irq+softirq).
cpu_jiffies() {
  awk -v k="$1" '$1 == k { b = $2 + $3 + $4 + $7 + $8; print b, $8, $9, b + $5 + $6 + $9 }' /proc/stat
}

now() { date +%s.%N; }

# Waits (at most QUIET_MAX s, and at most what is left of QUIET_BUDGET for the whole run) for
# QUIET_SECS consecutive seconds with the machine < QUIET_PCT % busy. Sets QUIET to the seconds
# waited, or to "-N" when it gave up after N seconds.
wait_quiet() {
  local start=$SECONDS ok=0 b0 t0 b1 t1 pct max=$QUIET_MAX
  ((QUIET_BUDGET - QUIET_SPENT < max)) && max=$((QUIET_BUDGET - QUIET_SPENT))
  if ((max < QUIET_SECS)); then
    QUIET=-0
    return 0
  fi
  while ((ok < QUIET_SECS)); do
    read -r b0 _ _ t0 < <(cpu_jiffies cpu)
    sleep 1
    read -r b1 _ _ t1 < <(cpu_jiffies cpu)
    pct=$(((b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
    if ((pct < QUIET_PCT)); then ok=$((ok + 1)); else ok=0; fi
    if ((ok < QUIET_SECS && SECONDS - start >= max)); then
      QUIET=-$((SECONDS - start))
      QUIET_SPENT=$((QUIET_SPENT + SECONDS - start))
      return 0
    fi
  done
  QUIET=$((SECONDS - start))
  QUIET_SPENT=$((QUIET_SPENT + SECONDS - start))
}

# === topology and backends ===

rps() { # ns-command... dev mask
  local mask=${*: -1} dev=${*: -2:1}
  "${@:1:$#-2}" sh -c "echo $mask > /sys/class/net/$dev/queues/rx-0/rps_cpus" ||
    log "warning: could not set RPS on $dev"
}

setup_topology() {
  local ns
  for ns in "$NS_CL" "$NS_ND" "$NS_BE"; do
    ip netns add "$ns" || die "ip netns add $ns failed"
    NS_MADE+=("$ns")
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
  done
  ip -n "$NS_ND" link add veth-ndc type veth peer name veth-cl netns "$NS_CL" || die "veth cl-nd failed"
  ip -n "$NS_ND" link add veth-ndb type veth peer name veth-be netns "$NS_BE" || die "veth nd-be failed"
  ip -n "$NS_CL" addr add 10.10.1.2/24 dev veth-cl
  ip -n "$NS_ND" addr add 10.10.1.1/24 dev veth-ndc
  ip -n "$NS_ND" addr add 10.10.2.1/24 dev veth-ndb
  ip -n "$NS_BE" addr add 10.10.2.2/24 dev veth-be
  ip -n "$NS_BE" addr add "$EP1/24" dev veth-be
  ip -n "$NS_BE" addr add "$EP2/24" dev veth-be
  ip -n "$NS_CL" link set veth-cl up
  ip -n "$NS_ND" link set veth-ndc up
  ip -n "$NS_ND" link set veth-ndb up
  ip -n "$NS_BE" link set veth-be up
  ip -n "$NS_CL" route add default via 10.10.1.1 || die "route in cl failed"
  ip -n "$NS_BE" route add default via 10.10.2.1 || die "route in be failed"
  "${ND[@]}" sysctl -qw net.ipv4.ip_forward=1 || die "ip_forward in nd failed"
  if [[ $PIN == split ]]; then
    local mnode mload
    mnode=$(printf '%x' $((1 << CPU_NODE))) mload=$(printf '%x' $((1 << CPU_LOAD)))
    rps "${ND[@]}" veth-ndc "$mnode"
    rps "${ND[@]}" veth-ndb "$mnode"
    rps "${CL[@]}" veth-cl "$mload"
    rps "${BE[@]}" veth-be "$mload"
  fi
  OUR_NETNS=$(for ns in "${NS_MADE[@]}"; do stat -L -c %i "/run/netns/$ns"; done | tr '\n' ' ')
}

# Polls until HOST:PORT accepts a TCP connection from ns cl (deadline in seconds).
wait_port() {
  local host=$1 port=$2 pid=${3:-} deadline=$((SECONDS + ${4:-15}))
  while ((SECONDS < deadline)); do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    "${CL[@]}" timeout 1 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# Polls until HOST answers a DNS query over UDP from ns cl (deadline in seconds).
wait_dns() {
  local host=$1 pid=${2:-} deadline=$((SECONDS + ${3:-15}))
  while ((SECONDS < deadline)); do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    "${CL[@]}" kdig @"$host" +notcp +time=1 +retry=0 +short svc.bench. A 2>/dev/null | grep -q '^10\.' && return 0
    sleep 0.1
  done
  return 1
}

# Knot DNS on both endpoints, authoritative for `bench.`: the UDP test's backend. One UDP worker,
# pinned like the other backends (Knot pins its workers itself, so every thread is re-pinned).
start_dns_backend() {
  local k=$W/knot i
  cat >"$k/bench.zone" <<EOF
\$ORIGIN bench.
\$TTL 30
@ SOA ns.bench. hostmaster.bench. 1 3600 600 86400 30
@ NS ns.bench.
ns A $EP1
svc A 10.96.0.100
EOF
  cat >"$k/knot.conf" <<EOF
server:
  rundir: "$k"
  listen: [ $EP1@53, $EP2@53 ]
  udp-workers: 1
  tcp-workers: 1
  background-workers: 1
database:
  storage: "$k"
log:
  - target: stderr
    any: warning
zone:
  - domain: bench.
    file: "$k/bench.zone"
    storage: "$k"
EOF
  for ((i = 0; i < 1000; i++)); do echo "svc.bench. A"; done >"$W/dns-queries.txt"
  "${BE[@]}" "${TS_LOAD[@]}" knotd -c "$k/knot.conf" >"$OUT/raw/knot-be.log" 2>&1 &
  PID_OF[knot-be]=$!
  wait_dns "$EP1" "${PID_OF[knot-be]}" && wait_dns "$EP2" "${PID_OF[knot-be]}" ||
    die "Knot DNS did not come up (see $OUT/raw/knot-be.log)"
  [[ $PIN == split ]] && taskset -a -p -c "$CPU_LOAD" "${PID_OF[knot-be]}" >/dev/null
}

start_backends() {
  printf '%099d\n' 0 >"$W/www/index.html"
  local b=$W/nginx-be
  cat >"$b/nginx.conf" <<EOF
user root;
daemon off;
worker_processes 1;
pid $b/nginx.pid;
error_log $b/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $MAXCONN; }
http {
  access_log off;
  client_body_temp_path $b/tmp;
  proxy_temp_path $b/tmp;
  fastcgi_temp_path $b/tmp;
  uwsgi_temp_path $b/tmp;
  scgi_temp_path $b/tmp;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  default_type text/html;
  server {
    listen $EP1:80 backlog=4096;
    listen $EP2:80 backlog=4096;
    root $W/www;
  }
}
EOF
  mkdir -p "$b/tmp"
  "${BE[@]}" "${TS_LOAD[@]}" nginx -p "$b" -c "$b/nginx.conf" -e "$b/error.log" >"$OUT/raw/nginx-be.log" 2>&1 &
  PID_OF[nginx-be]=$!
  wait_port "$EP1" 80 "${PID_OF[nginx-be]}" && wait_port "$EP2" 80 "${PID_OF[nginx-be]}" ||
    die "backend nginx did not come up (see $OUT/raw/nginx-be.log, $b/error.log)"
  start_iperf_server
}

start_iperf_server() {
  kill_pid "${PID_OF[iperf3]:-}"
  "${BE[@]}" "${TS_LOAD[@]}" iperf3 -s -B "$EP1" -p 5201 --idle-timeout 60 >>"$OUT/raw/iperf3-server.log" 2>&1 &
  PID_OF[iperf3]=$!
  wait_port "$EP1" 5201 "${PID_OF[iperf3]}" || die "iperf3 server did not come up"
}

# === contenders ===

# The Services of the benchmark, one per line: NAME PORT_NAME CLUSTER_IP PROTOCOL PORT ENDPOINT_IP...
# (every endpoint serves on PORT). The kernel contenders' rules are generated from this table.
services() {
  echo "web http $VIP_HTTP tcp 80 $EP1 $EP2"
  echo "bulk iperf $VIP_BULK tcp 5201 $EP1"
  if ((WITH_UDP)); then echo "dns dns $VIP_DNS udp 53 $EP1 $EP2"; fi
}

# Runs `ARGS... FIELDS...` for each line of `services`, in order.
each_service() {
  local line
  services | while read -r line; do
    # shellcheck disable=SC2086 # the fields are words
    "$@" $line
  done
}

# Stands in for kube-proxy's hash in a chain name: WORDS in upper case, padded with zeros to LEN.
fake_hash() {
  local h=${1^^}
  h=${h//[^A-Z0-9]/}0000000000000000
  echo "${h:0:$2}"
}

# One Service's part of kube-proxy's iptables nat table, as its proxier writes it:
#   ipt_service chains|jump|rules NAME PORT_NAME CLUSTER_IP PROTOCOL PORT ENDPOINT_IP...
# chains: its KUBE-SVC and KUBE-SEP chain declarations; jump: its KUBE-SERVICES rule; rules: its
# KUBE-SVC rules (masquerade from outside the cluster CIDR, then a random pick with kube-proxy's
# probabilities 1/n, 1/(n-1), ...) and its KUBE-SEP rules (DNAT).
ipt_service() {
  local part=$1 name=$2 port_name=$3 vip=$4 proto=$5 port=$6
  shift 6
  local n=$# i=0 ip svc sep comment="default/$name:$port_name"
  svc=KUBE-SVC-$(fake_hash "$name$port_name" 16)
  case $part in
  chains)
    echo ":$svc - [0:0]"
    for ip in "$@"; do
      i=$((i + 1))
      echo ":KUBE-SEP-$(fake_hash "$name$i" 16) - [0:0]"
    done
    ;;
  jump)
    echo "-A KUBE-SERVICES -d $vip/32 -p $proto -m comment --comment \"$comment cluster IP\" -m $proto --dport $port -j $svc"
    ;;
  rules)
    echo "-A $svc ! -s $CLUSTER_CIDR -d $vip/32 -p $proto -m comment --comment \"$comment cluster IP\" -m $proto --dport $port -j KUBE-MARK-MASQ"
    for ip in "$@"; do
      i=$((i + 1))
      sep=KUBE-SEP-$(fake_hash "$name$i" 16)
      if ((i < n)); then
        echo "-A $svc -m comment --comment \"$comment -> $ip:$port\" -m statistic --mode random --probability $(awk -v k=$((n - i + 1)) 'BEGIN { printf "%.11f", 1 / k }') -j $sep"
      else
        echo "-A $svc -m comment --comment \"$comment -> $ip:$port\" -j $sep"
      fi
    done
    i=0
    for ip in "$@"; do
      i=$((i + 1))
      sep=KUBE-SEP-$(fake_hash "$name$i" 16)
      echo "-A $sep -s $ip/32 -m comment --comment \"$comment\" -j KUBE-MARK-MASQ"
      echo "-A $sep -p $proto -m comment --comment \"$comment\" -m $proto -j DNAT --to-destination $ip:$port"
    done
    ;;
  esac
}

# kube-proxy's iptables mode for the Services, as `iptables-save` would show it (--cluster-cidr set,
# so traffic from outside the cluster CIDR is marked for masquerade; our client is inside it).
write_iptables_rules() {
  cat >"$W/iptables.rules" <<EOF
*filter
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
$(each_service ipt_service chains)
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
$(each_service ipt_service jump)
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
$(each_service ipt_service rules)
COMMIT
EOF

  sed -i '/^$/d' "$W/iptables.rules"
  # The nfacct match needs a kernel module that may be missing; kube-proxy drops it then too.
  printf '*filter\nCOMMIT\n*nat\nCOMMIT\n' >"$W/iptables.empty"
}

# One Service's part of kube-proxy's nftables table (pkg/proxy/nftables):
#   nft_service element|chains NAME PORT_NAME CLUSTER_IP PROTOCOL PORT ENDPOINT_IP...
# element: its entry in the service-ips map; chains: its service chain (masquerade from outside the
# cluster CIDR, then a numgen pick) and one endpoint chain per endpoint (DNAT).
nft_service() {
  local part=$1 name=$2 port_name=$3 vip=$4 proto=$5 port=$6
  shift 6
  local chain ip i=0 vmap='' endpoints=()
  chain="service-$(fake_hash "$name$port_name" 8)-default/$name/$proto/$port_name"
  if [[ $part == element ]]; then
    echo "$vip . $proto . $port : goto $chain"
    return
  fi
  for ip in "$@"; do
    i=$((i + 1))
    endpoints+=("endpoint-$(fake_hash "$name$i" 8)-default/$name/$proto/${port_name}__$ip/$port")
    vmap+="${vmap:+, }$((i - 1)) : goto ${endpoints[i - 1]}"
  done
  echo "  chain $chain {"
  echo "    ip daddr $vip $proto dport $port ip saddr != $CLUSTER_CIDR jump mark-for-masquerade"
  echo "    numgen random mod $# vmap { $vmap }"
  echo "  }"
  i=0
  for ip in "$@"; do
    echo "  chain ${endpoints[i]} {"
    echo "    ip saddr $ip jump mark-for-masquerade"
    echo "    meta l4proto $proto dnat to $ip:$port"
    echo "  }"
    i=$((i + 1))
  done
}

# kube-proxy's nftables mode for the Services.
write_nft_rules() {
  cat >"$W/nft.rules" <<EOF
table ip kube-proxy {
  comment "rules for kube-proxy"
  set cluster-ips {
    type ipv4_addr
    comment "Active ClusterIPs"
    elements = { $(services | awk '{print $3}' | paste -sd, | sed 's/,/, /g') }
  }
  set nodeport-ips {
    type ipv4_addr
    comment "IPs that accept NodePort traffic"
    elements = { 10.10.1.1 }
  }
  map no-endpoint-services {
    type ipv4_addr . inet_proto . inet_service : verdict
    comment "vmap to drop or reject packets to services with no endpoints"
  }
  map no-endpoint-nodeports {
    type inet_proto . inet_service : verdict
    comment "vmap to drop or reject packets to service nodeports with no endpoints"
  }
  map firewall-ips {
    type ipv4_addr . inet_proto . inet_service : verdict
    comment "destinations that are subject to LoadBalancerSourceRanges"
  }
  map service-nodeports {
    type inet_proto . inet_service : verdict
    comment "NodePort traffic"
  }
  map service-ips {
    type ipv4_addr . inet_proto . inet_service : verdict
    comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
    elements = { $(each_service nft_service element | paste -sd, | sed 's/,/, /g') }
  }
  chain filter-prerouting {
    type filter hook prerouting priority -110; policy accept;
    ct state new jump firewall-check
  }
  chain filter-input {
    type filter hook input priority -110; policy accept;
    ct state new jump nodeport-endpoints-check
    ct state new jump service-endpoints-check
  }
  chain filter-forward {
    type filter hook forward priority -110; policy accept;
    ct state new jump service-endpoints-check
    ct state new jump cluster-ips-check
  }
  chain filter-output {
    type filter hook output priority -110; policy accept;
    ct state new jump service-endpoints-check
    ct state new jump firewall-check
  }
  chain filter-output-post-dnat {
    type filter hook output priority -90; policy accept;
    ct state new jump cluster-ips-check
  }
  chain nat-prerouting {
    type nat hook prerouting priority -100; policy accept;
    jump services
  }
  chain nat-output {
    type nat hook output priority -100; policy accept;
    jump services
  }
  chain nat-postrouting {
    type nat hook postrouting priority 100; policy accept;
    jump masquerading
  }
  chain cluster-ips-check {
    ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
  }
  chain firewall-check {
    ip daddr . meta l4proto . th dport vmap @firewall-ips
  }
  chain nodeport-endpoints-check {
    ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
  }
  chain service-endpoints-check {
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
  }
  chain mark-for-masquerade {
    mark set mark or 0x4000
  }
  chain masquerading {
    meta mark & 0x4000 == 0 return
    meta mark set meta mark ^ 0x4000
    masquerade fully-random
  }
  chain services {
    ip daddr . meta l4proto . th dport vmap @service-ips
    ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
  }
$(each_service nft_service chains)
}
EOF
}

write_proxy_configs() {
  cat >"$W/haproxy.cfg" <<EOF
global
  nbthread $PROXY_THREADS
  maxconn $MAXCONN

defaults
  mode tcp
  balance roundrobin
  maxconn $MAXCONN
  timeout connect 5s
  timeout client 120s
  timeout server 120s

listen web
  bind $VIP_HTTP:80
  server ep1 $EP1:80
  server ep2 $EP2:80

listen bulk
  bind $VIP_BULK:5201
  server ep1 $EP1:5201
EOF
  local n=$W/nginx-nd
  mkdir -p "$n/tmp"
  cat >"$n/nginx.conf" <<EOF
load_module $STREAM_MOD;
user root;
daemon off;
worker_processes $PROXY_THREADS;
pid $n/nginx.pid;
error_log $n/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $MAXCONN; }
stream {
  upstream web { server $EP1:80; server $EP2:80; }
  upstream bulk { server $EP1:5201; }
  server { listen $VIP_HTTP:80 backlog=4096; proxy_pass web; }
  server { listen $VIP_BULK:5201 backlog=4096; proxy_pass bulk; }
$( ((WITH_UDP)) && printf '  upstream dns { server %s:53; server %s:53; }\n  server { listen %s:53 udp; proxy_pass dns; proxy_timeout 10s; }' "$EP1" "$EP2" "$VIP_DNS")
}
EOF
  local f=$W/ferry
  cat >"$f/node.yaml" <<EOF
apiVersion: v1
kind: Node
metadata:
  name: nd
status:
  addresses:
  - {type: InternalIP, address: 10.10.1.1}
EOF
  ferry_service web http TCP "$VIP_HTTP" 80 "$EP1" "$EP2" >"$f/web.yaml"
  ferry_service bulk iperf TCP "$VIP_BULK" 5201 "$EP1" >"$f/bulk.yaml"
  ((WITH_UDP)) && ferry_service dns dns UDP "$VIP_DNS" 53 "$EP1" "$EP2" >"$f/dns.yaml"
  return 0
}

# A ClusterIP Service and its EndpointSlice (ready endpoints on node be), as ferry reads them.
ferry_service() { # name port-name protocol cluster-ip port endpoint...
  local name=$1 port_name=$2 proto=$3 vip=$4 port=$5 ep
  shift 5
  cat <<EOF
apiVersion: v1
kind: Service
metadata:
  name: $name
  namespace: default
  annotations:
    ferry.ethercluster.io/balancing: RoundRobin
spec:
  type: ClusterIP
  clusterIP: $vip
  ports:
  - {name: $port_name, protocol: $proto, port: $port, targetPort: $port}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $name-1
  namespace: default
  labels: {kubernetes.io/service-name: $name}
addressType: IPv4
endpoints:
EOF
  for ep in "$@"; do echo "- {addresses: [\"$ep\"], nodeName: be, conditions: {ready: true}}"; done
  printf 'ports:\n- {name: %s, protocol: %s, port: %s}\n' "$port_name" "$proto" "$port"
}

http_ip() { [[ $1 == direct ]] && echo "$EP1" || echo "$VIP_HTTP"; }
bulk_ip() { [[ $1 == direct ]] && echo "$EP1" || echo "$VIP_BULK"; }
dns_ip() { [[ $1 == direct ]] && echo "$EP1" || echo "$VIP_DNS"; }

vips_on_lo() { # add|del
  ip -n "$NS_ND" addr "$1" "$VIP_HTTP/32" dev lo 2>/dev/null
  ip -n "$NS_ND" addr "$1" "$VIP_BULK/32" dev lo 2>/dev/null
  ((WITH_UDP)) && ip -n "$NS_ND" addr "$1" "$VIP_DNS/32" dev lo 2>/dev/null
  return 0
}

start_contender() {
  local c=$1 pid=
  case $c in
  direct) ;;
  iptables)
    "${ND[@]}" "$IPTABLES_RESTORE" <"$W/iptables.rules" >>"$OUT/raw/iptables.log" 2>&1 || {
      # Kernels without nfacct: drop that one match, as a cluster without it would have.
      sed -i 's/ -m nfacct --nfacct-name ct_state_invalid_dropped_pkts//' "$W/iptables.rules"
      "${ND[@]}" "$IPTABLES_RESTORE" <"$W/iptables.rules" >>"$OUT/raw/iptables.log" 2>&1
    } || {
      note "iptables: $IPTABLES_RESTORE failed (raw/iptables.log)"
      return 1
    }
    ;;
  nft)
    "${ND[@]}" nft -f "$W/nft.rules" >>"$OUT/raw/nft.log" 2>&1 || {
      note "nft: nft -f failed (raw/nft.log)"
      return 1
    }
    ;;
  haproxy)
    vips_on_lo add
    "${ND[@]}" "${TS_NODE[@]}" haproxy -db -f "$W/haproxy.cfg" >>"$OUT/raw/haproxy.log" 2>&1 &
    pid=$!
    ;;
  nginx)
    vips_on_lo add
    "${ND[@]}" "${TS_NODE[@]}" nginx -p "$W/nginx-nd" -c "$W/nginx-nd/nginx.conf" -e "$W/nginx-nd/error.log" \
      >>"$OUT/raw/nginx.log" 2>&1 &
    pid=$!
    ;;
  ferry)
    "${ND[@]}" env FERRY_LOG="$FERRY_LOG" RUST_LOG="$FERRY_LOG" "${TS_NODE[@]}" "$FERRY_BIN" node --config "$W/ferry" \
      --node-name nd --vip-device ferry0 --nodeport-addresses 10.10.1.1/32 --cluster-cidr "$CLUSTER_CIDR" \
      --worker-threads "$PROXY_THREADS" --admin-address 127.0.0.1:0 --metrics-bind-address 127.0.0.1:0 \
      --healthz-bind-address 127.0.0.1:0 --drain-timeout 1s ${FERRY_ARGS:-} >>"$OUT/raw/ferry.log" 2>&1 &
    pid=$!
    ;;
  esac
  [[ -n $pid ]] && PID_OF[$c]=$pid
  ACTIVE=$c
  if wait_port "$(http_ip "$c")" 80 "$pid" && wait_port "$(bulk_ip "$c")" 5201 "$pid" &&
    { ((!WITH_UDP)) || [[ $c == haproxy ]] || wait_dns "$(dns_ip "$c")" "$pid"; }; then
    return 0
  fi
  log "$c: the ClusterIPs did not answer (see $OUT/raw/$c.log)"
  note "$c failed to start (see raw/$c.log)"
  stop_contender "$c"
  return 1
}

stop_contender() {
  local c=$1
  case $c in
  iptables)
    "${ND[@]}" "$IPTABLES_RESTORE" <"$W/iptables.empty" >/dev/null 2>&1
    "${ND[@]}" nft flush ruleset
    ;;
  nft) "${ND[@]}" nft flush ruleset ;;
  haproxy | nginx)
    kill_pid "${PID_OF[$c]:-}"
    vips_on_lo del
    ;;
  ferry)
    kill_pid "${PID_OF[$c]:-}"
    "${ND[@]}" timeout 10 "$FERRY_BIN" node --cleanup --vip-device ferry0 >>"$OUT/raw/ferry.log" 2>&1 ||
      ip -n "$NS_ND" link del ferry0 2>/dev/null
    ;;
  esac
  unset "PID_OF[$c]"
  ACTIVE=
}

# === load ===

run_load() { # out-file command...: bounded, inside ns cl, on CPU_LOAD
  local out=$1
  shift
  "${CL[@]}" timeout -k 5 $((DUR + 30)) "${TS_LOAD[@]}" "$@" >"$out" 2>&1 &
  LOAD_PID=$!
  wait "$LOAD_PID"
  local rc=$?
  LOAD_PID=
  return $rc
}

to_ms() { # wrk latency "123.45us|ms|s" -> ms
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

parse_wrk() { # sets OK VALUE P99 UNITS ERRORS
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

parse_dnsperf() { # sets OK VALUE P99 (here: the mean latency) UNITS ERRORS
  local f=$1 qps completed mean
  qps=$(awk '/Queries per second:/ { print $4 }' "$f")
  completed=$(awk '/Queries completed:/ { print $3 }' "$f")
  mean=$(awk '/Average Latency \(s\):/ { printf "%.3f", $4 * 1000 }' "$f")
  ERRORS=$(awk '/Queries lost:/ { print $3 + 0 }' "$f")
  ERRORS=${ERRORS:-0}
  if [[ -n $qps && -n $completed && -n $mean && $completed -gt 0 ]]; then
    OK=1 VALUE=$qps UNITS=$completed P99=$mean
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

# One measured attempt; the contender is running. Sets the fields of one results.tsv line.
measure() {
  local t=$1 c=$2 tag=$3 raw=$OUT/raw/$3 pid=${PID_OF[$2]:-} load=()
  case $t in
  bulk1 | bulk8)
    load=(iperf3 -c "$(bulk_ip "$c")" -p 5201 -t "$DUR" -P "${t#bulk}" -J --connect-timeout 3000)
    ;;
  ka | close)
    load=(wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${DUR}s" --latency)
    [[ $t == close ]] && load+=(-H "Connection: close")
    load+=("http://$(http_ip "$c")/")
    if ((WARMUP > 0)); then
      local warm=("${load[@]}")
      warm[3]="-d${WARMUP}s"
      run_load "$raw.warmup" "${warm[@]}"
    fi
    ;;
  udp)
    load=(dnsperf -s "$(dns_ip "$c")" -p 53 -d "$W/dns-queries.txt" -c "$DNS_CLIENTS" -q "$DNS_OUTSTANDING")
    ((WARMUP > 0)) && run_load "$raw.warmup" "${load[@]}" -l "$WARMUP"
    load+=(-l "$DUR")
    ;;
  esac
  wait_quiet
  local p0 p1 f0 f1 w0 w1 a0 s0 a1 s1 c0 c1 pk0=$OUT/raw/.pk0 pk1=$OUT/raw/.pk1
  foreign_netns_packets >"$pk0"
  f0=$(foreign_ticks) p0=$(tree_ticks ${pid:+"$pid"})
  local st0 tt0 st1 tt1
  read -r a0 s0 _ _ < <(cpu_jiffies "cpu$CPU_NODE")
  read -r c0 _ _ _ < <(cpu_jiffies "cpu$CPU_LOAD")
  read -r _ _ st0 tt0 < <(cpu_jiffies cpu)
  local diag_pid='' timed=()
  if [[ $DIAG == *switches* ]]; then
    switches >"$raw.switches0"
    timed=(/usr/bin/time -o "$raw.time" -f "load: %U s user, %S s system, %w sleeps, %c preempted")
  fi
  if [[ $DIAG == *pages* ]]; then
    (sleep 1 && exec perf stat -a -A -x, -o "$raw.pages" -e kmem:mm_page_alloc --filter 'order == 3' \
      -e kmem:mm_page_alloc -e kmem:mm_page_free -e kmem:mm_page_alloc_zone_locked -- sleep $((DUR / 2))) \
      >/dev/null 2>&1 &
    diag_pid=$!
  fi
  if [[ $DIAG == *syscalls* && -n $pid ]]; then
    local pids
    pids=$(tree_pids "$pid")
    (sleep 1 && exec perf trace -s -p "${pids// /,}" -o "$raw.syscalls" -- sleep $((DUR / 2))) >/dev/null 2>&1 &
    diag_pid="$diag_pid $!"
  fi
  if [[ $DIAG == *profile* ]]; then
    (sleep 1 && perf record -q -C "$CPU_NODE" -F 999 -o "$raw.perf" -- sleep $((DUR / 2)) &&
      exec perf report -q -i "$raw.perf" --no-children --sort dso,sym --percent-limit 0.3 --stdio) \
      >"$raw.profile" 2>/dev/null &
    diag_pid="$diag_pid $!"
  fi
  w0=$(now)
  run_load "$raw.out" "${timed[@]}" "${load[@]}"
  w1=$(now)
  [[ -n $diag_pid ]] && wait $diag_pid
  if [[ $DIAG == *switches* ]]; then # changed counts only: "command sleeps preempted"
    switches | awk 'NR == FNR { v[$1] = $2; i[$1] = $3; next }
      ($1 in v) && ($2 > v[$1] || $3 > i[$1]) { print $1, $2 - v[$1], $3 - i[$1] }' "$raw.switches0" - \
      | sort -k2,2nr >"$raw.switches"
    rm -f "$raw.switches0"
  fi
  read -r _ _ st1 tt1 < <(cpu_jiffies cpu)
  read -r a1 s1 _ _ < <(cpu_jiffies "cpu$CPU_NODE")
  read -r c1 _ _ _ < <(cpu_jiffies "cpu$CPU_LOAD")
  p1=$(tree_ticks ${pid:+"$pid"}) f1=$(foreign_ticks)
  foreign_netns_packets >"$pk1"
  case $t in
  bulk*) parse_iperf "$raw.out" ;;
  udp) parse_dnsperf "$raw.out" ;;
  *) parse_wrk "$raw.out" ;;
  esac
  local kpkts
  kpkts=$(awk 'NR == FNR { a[$1] = $2; next } ($1 in a) && $2 > a[$1] { s += $2 - a[$1] } END { print s / 1000 }' "$pk0" "$pk1")
  read -r PROXY_S CPU0_S NODE_S NODE_SI_S WALL_S STEAL_PCT FOREIGN_PCT FOREIGN_KPPS < <(awk \
    -v p0="$p0" -v p1="$p1" -v f0="$f0" -v f1="$f1" -v w0="$w0" -v w1="$w1" -v a0="$a0" -v a1="$a1" \
    -v s0="$s0" -v s1="$s1" -v c0="$c0" -v c1="$c1" -v st0="$st0" -v st1="$st1" -v tt0="$tt0" -v tt1="$tt1" \
    -v hz="$CLK_TCK" -v n="$NCPU" -v kp="$kpkts" \
    'BEGIN { w = w1 - w0; f = 100 * (f1 - f0) / hz / w / n; if (f < 0) f = 0
      dt = tt1 - tt0; if (dt <= 0) dt = 1
      printf "%.3f %.3f %.3f %.3f %.3f %.1f %.1f %.1f\n", (p1 - p0) / hz, (c1 - c0) / hz, (a1 - a0) / hz,
        (s1 - s0) / hz, w, 100 * (st1 - st0) / dt, f, kp / w }')
  if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
    OK=0
    note "$tag: $c exited during the cell"
  fi
}

run_cell() { # test contender round
  local t=$1 c=$2 r=$3 a best_s=1e9 score line best_line=
  if [[ $t == udp && $c == haproxy ]]; then # ok=2: not applicable, shown as n/a
    note "HAProxy has no UDP proxying: its udp cells are n/a"
    printf '%s\t%s\t%s\t1\t2\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t-\n' "$t" "$c" "$r" >>"$RESULTS"
    return
  fi
  for ((a = 1; a <= RETRIES + 1; a++)); do
    local tag=$t-$c-r$r-a$a
    if ! start_contender "$c"; then
      best_line=$(printf '%s\t%s\t%s\t%s\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t1\t-' "$t" "$c" "$r" "$a")
      break
    fi
    measure "$t" "$c" "$tag"
    stop_contender "$c"
    if ((!OK)) && [[ $t == bulk* ]]; then # a stuck iperf3 server fails every later cell: restart it
      note "$t/$c round $r attempt $a: iperf3 failed (raw/$tag.out); iperf3 server restarted"
      start_iperf_server
    fi
    line=$(printf '%s\t' "$t" "$c" "$r" "$a" "$OK" "$VALUE" "$P99" "$UNITS" "$PROXY_S" "$CPU0_S" "$NODE_S" \
      "$NODE_SI_S" "$WALL_S" "$STEAL_PCT" "$FOREIGN_PCT" "$FOREIGN_KPPS" "$ERRORS")$QUIET
    log "$t $c r$r a$a: ok=$OK value=$VALUE p99=${P99}ms proxy=${PROXY_S}s node=${NODE_S}s (si ${NODE_SI_S}s) foreign=${FOREIGN_PCT}% ${FOREIGN_KPPS}kpps quiet=$QUIET"
    score=$(awk -v f="$FOREIGN_PCT" -v k="$FOREIGN_KPPS" -v fm="$FOREIGN_MAX" -v km="$FOREIGN_KPPS_MAX" \
      'BEGIN { print f / fm + k / km }')
    if [[ -z $best_line ]] || awk -v s="$score" -v b="$best_s" -v ok="$OK" 'BEGIN { exit !(ok && s < b) }'; then
      best_line=$line best_s=$score
    fi
    if ((OK)) && awk -v s="$score" 'BEGIN { exit !(s <= 1) }' &&
      awk -v f="$FOREIGN_PCT" -v k="$FOREIGN_KPPS" -v fm="$FOREIGN_MAX" -v km="$FOREIGN_KPPS_MAX" \
        'BEGIN { exit !(f <= fm && k <= km) }'; then break; fi
    ((SECONDS - START < RETRY_UNTIL)) || break
    ((a <= RETRIES)) && log "foreign load ${FOREIGN_PCT}% / ${FOREIGN_KPPS} kpps above limits: re-running"
  done
  printf '%s\n' "$best_line" >>"$RESULTS"
  CELLS=$((CELLS + 1))
  [[ $(cut -f18 <<<"$best_line") == -* ]] && UNQUIET=$((UNQUIET + 1))
  awk -v s="$(cut -f14 <<<"$best_line")" 'BEGIN { exit !(s > 2) }' &&
    note "$t/$c round $r: hypervisor steal $(cut -f14 <<<"$best_line")%"
  local kept_ok kept_f kept_k
  kept_ok=$(cut -f5 <<<"$best_line") kept_f=$(cut -f15 <<<"$best_line") kept_k=$(cut -f16 <<<"$best_line")
  if ((kept_ok)) && awk -v f="$kept_f" -v k="$kept_k" -v fm="$FOREIGN_MAX" -v km="$FOREIGN_KPPS_MAX" \
    'BEGIN { exit !(f > fm || k > km) }'; then
    NOISY=$((NOISY + 1))
    note "$t/$c round $r kept with foreign load ${kept_f}% CPU / ${kept_k} kpps"
  fi
  if ((kept_ok)) && (($(cut -f17 <<<"$best_line") > 0)); then
    if [[ $t == udp ]]; then
      note "$t/$c round $r: $(cut -f17 <<<"$best_line") queries lost (dnsperf)"
    else
      note "$t/$c round $r: $(cut -f17 <<<"$best_line") wrk socket errors / non-2xx responses"
    fi
  fi
}
FOREIGN_KPPS_MAX=$FOREIGN_KPPS

# === report ===

report() {
  awk -F'\t' -v contenders="$CONTENDERS" -v tests="$TESTS" -v dnsclients="$DNS_CLIENTS" '
    function median(key,   n, i, j, v, tmp) {
      n = cnt[key]; if (n == 0) return ""
      for (i = 1; i <= n; i++) v[i] = vals[key, i]
      for (i = 2; i <= n; i++) { tmp = v[i]; j = i - 1; while (j >= 1 && v[j] > tmp) { v[j + 1] = v[j]; j-- } v[j + 1] = tmp }
      return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function add(key, v) { cnt[key]++; vals[key, cnt[key]] = v }
    function name(c) { return c == "haproxy" ? "HAProxy" : c }
    function kernel(c) { return c == "iptables" || c == "nft" || c == "direct" }
    # dir: 1 higher is better, -1 lower is better, 0 informational (no ratio)
    function row(label, t, m, f, dir,   i, c, line, a, b, v, ok, judged) {
      line = "| " label
      for (i = 1; i <= nc; i++) {
        c = C[i]; v = median(t SUBSEP c SUBSEP m)
        line = line " | " ((m ~ /^proxy/ && kernel(c)) ? "–" : (v == "" ? (na[t, c] ? "n/a" : "fail") : sprintf(f, v)))
      }
      a = median(t SUBSEP "ferry" SUBSEP m); ok = 1; judged = 0
      for (i = 1; i <= nc; i++) {
        c = C[i]; if (c == "ferry" || !hasferry) continue
        b = median(t SUBSEP c SUBSEP m)
        if (dir == 0 || a == "" || b == "" || b <= 0 || (m ~ /^proxy/ && kernel(c))) { line = line " | –"; continue }
        line = line " | " sprintf("%.2f", a / b)
        if (c == "haproxy" || c == "nginx") { judged = 1; if ((dir > 0 && a < b) || (dir < 0 && a > b)) ok = 0 }
      }
      if (hasferry && target) line = line " | " ((dir == 0 || !judged) ? "" : (ok ? "yes" : "**no**"))
      print line " |"
    }
    function foreign(t,   i, c, line) {
      line = "| " tname[t] ": foreign CPU % / kpps (other tenants)"
      for (i = 1; i <= nc; i++) {
        c = C[i]
        line = line " | " (cnt[t SUBSEP c SUBSEP "fpct"] ? sprintf("%.1f / %.1f", fmax[t, c], kmax[t, c]) : "–")
      }
      for (i = 1; i <= nc; i++) if (C[i] != "ferry" && hasferry) line = line " | "
      if (hasferry && target) line = line " | "
      print line " |"
    }
    NR == 1 { next }
    $5 == 2 { na[$1, $2] = 1; next }
    $5 == 1 {
      k = $1 SUBSEP $2
      add(k SUBSEP "value", $6); add(k SUBSEP "p99", $7)
      gb = $8 / 1e9
      if ($8 > 0) {
        if ($1 ~ /^bulk/) { u = 1000 / gb } else { u = 1e6 / $8 }
        add(k SUBSEP "node", $11 * u); add(k SUBSEP "proxy", $9 * u); add(k SUBSEP "mach", ($10 + $11) * u)
      }
      add(k SUBSEP "nodepct", 100 * $11 / $13)
      add(k SUBSEP "fpct", $15)
      if (!((k) in fmax) || $15 > fmax[$1, $2]) fmax[$1, $2] = $15
      if (!((k) in kmax) || $16 > kmax[$1, $2]) kmax[$1, $2] = $16
    }
    END {
      tname["bulk1"] = "TCP 1 stream"; tname["bulk8"] = "TCP 8 streams"; tname["ka"] = "keep-alive"; tname["close"] = "close"; tname["udp"] = "UDP"
      nc = split(contenders, C, " "); nt = split(tests, T, " ")
      hasferry = 0; target = 0
      for (i = 1; i <= nc; i++) { if (C[i] == "ferry") hasferry = 1; if (C[i] == "haproxy" || C[i] == "nginx") target = 1 }
      hdr = "| metric"; sep = "|---"
      for (i = 1; i <= nc; i++) { hdr = hdr " | " name(C[i]); sep = sep "|---:" }
      for (i = 1; i <= nc; i++) if (hasferry && C[i] != "ferry") { hdr = hdr " | ferry/" name(C[i]); sep = sep "|---:" }
      if (hasferry && target) { hdr = hdr " | ferry ≥ HAProxy and nginx"; sep = sep "|:---:" }
      print hdr " |"; print sep "|"
      for (i = 1; i <= nt; i++) {
        t = T[i]
        if (t == "bulk1" || t == "bulk8") {
          s = tname[t]
          row(s " (iperf3), Gbit/s ↑", t, "value", "%.2f", 1)
          row(s ": node CPU per GB, ms ↓", t, "node", "%.0f", -1)
          row(s ": proxy process CPU per GB, ms ↓", t, "proxy", "%.0f", -1)
          row(s ": machine CPU per GB (load + node), ms ↓", t, "mach", "%.0f", -1)
          row(s ": node CPU busy, %", t, "nodepct", "%.0f", 0)
        } else if (t == "ka") {
          row("HTTP keep-alive (wrk -c64), req/s ↑", t, "value", "%.0f", 1)
          row("keep-alive: p99 latency, ms ↓", t, "p99", "%.2f", -1)
          row("keep-alive: node CPU per request, µs ↓", t, "node", "%.1f", -1)
          row("keep-alive: proxy process CPU per request, µs ↓", t, "proxy", "%.1f", -1)
          row("keep-alive: machine CPU per request (load + node), µs ↓", t, "mach", "%.1f", -1)
          row("keep-alive: node CPU busy, %", t, "nodepct", "%.0f", 0)
        } else if (t == "close") {
          row("new connections (wrk -c64, Connection: close), conn/s ↑", t, "value", "%.0f", 1)
          row("close: p99 latency, ms ↓", t, "p99", "%.2f", -1)
          row("close: node CPU per connection, µs ↓", t, "node", "%.1f", -1)
          row("close: proxy process CPU per connection, µs ↓", t, "proxy", "%.1f", -1)
          row("close: machine CPU per connection (load + node), µs ↓", t, "mach", "%.1f", -1)
          row("close: node CPU busy, %", t, "nodepct", "%.0f", 0)
        } else if (t == "udp") {
          row("UDP: DNS queries through the ClusterIP (dnsperf -c" dnsclients " -q200), queries/s ↑", t, "value", "%.0f", 1)
          row("UDP: mean latency, ms ↓", t, "p99", "%.3f", -1)
          row("UDP: node CPU per query, µs ↓", t, "node", "%.2f", -1)
          row("UDP: proxy process CPU per query, µs ↓", t, "proxy", "%.2f", -1)
          row("UDP: machine CPU per query (load + node), µs ↓", t, "mach", "%.2f", -1)
          row("UDP: node CPU busy, %", t, "nodepct", "%.0f", 0)
        }
        foreign(t)
      }
    }' "$RESULTS"
}

# === main ===

# One function, so that bash has read all of it before it starts: editing this file during a run
# cannot change what the run executes.
main() {

START=$SECONDS
log "output: $OUT (netns $NS_CL/$NS_ND/$NS_BE, DUR=${DUR}s, ROUNDS=$ROUNDS, PIN=$PIN, tests: $TESTS, contenders: $CONTENDERS)"
setup_topology
write_iptables_rules
write_nft_rules
write_proxy_configs
start_backends
((WITH_UDP)) && start_dns_backend

read -ra r_order <<<"$CONTENDERS"
for t in $TESTS; do
  for ((r = 1; r <= ROUNDS; r++)); do
    order=("${r_order[@]}")
    if ((r % 2 == 0)); then # alternate the order per round so drift hits every contender alike
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
  echo "ClusterIP path in network namespaces, $(date -u +%Y-%m-%dT%H:%MZ), kernel $(uname -r), ${NCPU} CPUs, PIN=$PIN, proxies with $PROXY_THREADS thread(s)"
  echo "(node = CPU$CPU_NODE, client + backends = CPU$CPU_LOAD), DUR=${DUR}s × ROUNDS=$ROUNDS (median); run took ${ELAPSED}s."
  echo "ferry: ${ferry_ver:-?} ($FERRY_BIN${FERRY_BUILT_FROM:+, built from $FERRY_BUILT_FROM}; script from repo ${git_rev:-?}${git_dirty:+ + $git_dirty uncommitted files});" \
    "$(haproxy -v | head -1 | cut -d' ' -f1-3); nginx $(nginx -v 2>&1 | cut -d/ -f2); $($IPTABLES_RESTORE --version 2>&1 | head -1); $(nft --version)"
  echo
  report
  echo
  echo "↑ higher is better, ↓ lower is better. Node CPU = busy time of CPU$CPU_NODE (user+system+irq+softirq,"
  echo "/proc/stat) during the cell: forwarding and NAT for the kernel path, the proxy and its socket work for"
  echo "the proxies. Proxy process CPU = utime+stime of the proxy's processes. Machine CPU = busy time of both"
  echo "CPUs (load tools, backends and node together: what a node running client, proxy and server pods pays)."
  echo "Per-unit figures divide by bytes received by iperf3, completed requests (= connections in the close"
  echo "test) or completed DNS queries (udp). Ratios are ferry ÷ peer;"
  echo "the last column says whether ferry is at least as good as both HAProxy and nginx (no noise margin)."
  echo "Foreign = CPU of processes outside this run (% of the machine) and packets received in other network"
  echo "namespaces, worst cell: other tenants of the box."
  ((UNQUIET)) && note "$UNQUIET of $CELLS cells started without the machine being quiet (< ${QUIET_PCT}% busy for ${QUIET_SECS}s; waited at most ${QUIET_MAX}s per cell, ${QUIET_BUDGET}s per run; $QUIET_SPENT s spent)"
  ((NOISY)) && note "$NOISY of $CELLS cells kept with foreign load above ${FOREIGN_MAX}% CPU or ${FOREIGN_KPPS_MAX} kpps after re-runs"
  if ((${#NOTES[@]})); then
    echo
    echo "Notes:"
    printf -- '- %s\n' "${NOTES[@]}"
  fi
} | tee "$OUT/report.md"
log "raw data: $RESULTS"
}

main
