#!/usr/bin/env bash
# Side-by-side benchmarks on one machine: a three-gateway Entente group
# against a three-member etcd (replicated writes, reads, failover) and an
# Entente gateway's MQTT broker against Mosquitto (QoS 1 ingest).
#
#   bench/run.sh
#
# installs what it needs from Debian's packages (etcd-server, mosquitto,
# mosquitto-clients, gnuplot-nox; linux-perf for the profiles), builds
# Entente in release mode, runs the comparisons on loopback, and writes
# bench/BENCHMARKS.md and bench/chart.png. Every process it starts is
# stopped on exit.
#
# Knobs (environment):
#   BENCH_SECS=10            measured seconds per load run
#   BENCH_WARMUP=2           unmeasured seconds before each
#   BENCH_QUICK=1            a test of the script: 1 and 64 clients, 3 kills,
#                            100 MQTT clients, no open-loop sweep, no profile
#   BENCH_CLIENTS="1 16 64 256"       HTTP concurrencies
#   BENCH_KILLS=20                    failover trials per system
#   BENCH_INGEST_CLIENTS="100 1000"   MQTT clients
#   BENCH_INGEST_INFLIGHT="1 10"      unacknowledged QoS 1 messages per MQTT client
#   BENCH_SPREAD=rotate      rotate | client | leader (see loadgen write --help)
#   BENCH_QUIET_WAIT=20      before each pair of runs, wait up to this many seconds
#                            for the CPUs to be at most 25 % busy (0: do not wait)
#   BENCH_PROFILE=1          0 skips the perf profiles
#   BENCH_MATCHED_FAILOVER=1 0 skips etcd's extra failover run with Entente's timings
#   BENCH_PORT_BASE=23000    ports BASE+101 .. BASE+1424 on 127.0.0.1
#   BENCH_DIR=...            data and results (default: a new directory under target/)
#   BENCH_OUT=bench/BENCHMARKS.md, BENCH_CHART=bench/chart.png
#   BENCH_NO_INSTALL=1       do not run apt-get (the tools must be there)
#   BENCH_KEEP=1             keep the data directories afterwards
#   BENCH_PEER_TLS=1         also run a three-gateway group whose gateways talk
#                            mutual TLS (gateway certs) and, after the write
#                            phase, closed-loop writes against it and the plain
#                            group in turn at each level (ports BASE+341 .. 643);
#                            the figures are appended to the report
#   BENCH_ENGINES=1          0 skips the Multi-Paxos group: a three-gateway
#                            group on --consensus multi-paxos, closed-loop
#                            writes against it and the (Raft) main group in
#                            turn at each level, and its failover (ports
#                            BASE+761 .. 1103); appended to the report
#   BENCH_PBFT=1             0 skips the PBFT group: four gateways on
#                            --consensus pbft (f = 1; each key made with
#                            `gateway keys` in its data directory, every
#                            member started with the four in --group-keys),
#                            closed-loop writes against it and the (Raft)
#                            main group in turn at each level (writes/s,
#                            p50/p99, server CPU per write, the primary's
#                            fsyncs per write), then $BENCH_KILLS kills of its
#                            primary, each timed to the first write through
#                            a survivor (ports BASE+1111 .. 1424); appended
#                            to the report with the PBFT/Raft ratio per level
#   BENCH_PBFT_KILLS_PER_GROUP=1  primary kills per group of four fresh PBFT
#                            gateways (each killed primary restarted on its
#                            data before the next kill); the kills are
#                            spread over as many groups as it takes. 1:
#                            every kill is of a settled group's first primary
#   BENCH_ONLY=engines       only the engine comparison: the Entente groups
#                            (Raft, and Multi-Paxos / PBFT as switched on
#                            above), their writes and failovers; no etcd,
#                            Mosquitto, reads, ingest or profiles. The
#                            report holds the engine sections only and goes
#                            to BENCH_OUT (default: engines.md in the results)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STARTED=$(date +%s)
COMMAND="bench/run.sh"
for k in BENCH_SECS BENCH_WARMUP BENCH_QUICK BENCH_CLIENTS BENCH_KILLS BENCH_INGEST_CLIENTS \
         BENCH_INGEST_INFLIGHT BENCH_SPREAD BENCH_PROFILE BENCH_MATCHED_FAILOVER BENCH_QUIET_WAIT \
         BENCH_PEER_TLS BENCH_ENGINES BENCH_PBFT BENCH_PBFT_KILLS_PER_GROUP BENCH_ONLY; do
  if [ -n "${!k:-}" ]; then COMMAND="$k=\"${!k}\" $COMMAND"; fi
done

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  SECS=${BENCH_SECS:-3}; WARMUP=${BENCH_WARMUP:-1}
  CLIENTS=${BENCH_CLIENTS:-"1 64"}; KILLS=${BENCH_KILLS:-3}
  INGEST_CLIENTS=${BENCH_INGEST_CLIENTS:-"100"}; PROFILE=${BENCH_PROFILE:-0}
  OPEN_FRACTIONS=""; MATCHED=${BENCH_MATCHED_FAILOVER:-0}
else
  SECS=${BENCH_SECS:-10}; WARMUP=${BENCH_WARMUP:-2}
  CLIENTS=${BENCH_CLIENTS:-"1 16 64 256"}; KILLS=${BENCH_KILLS:-20}
  INGEST_CLIENTS=${BENCH_INGEST_CLIENTS:-"100 1000"}; PROFILE=${BENCH_PROFILE:-1}
  OPEN_FRACTIONS="0.25 0.5 0.75 0.9"; MATCHED=${BENCH_MATCHED_FAILOVER:-1}
fi
INFLIGHT=${BENCH_INGEST_INFLIGHT:-"1 10"}
PEER_TLS=${BENCH_PEER_TLS:-0}
ENGINES=${BENCH_ENGINES:-1}
PBFT=${BENCH_PBFT:-1}
PBFT_KILLS_PER_GROUP=${BENCH_PBFT_KILLS_PER_GROUP:-1}
[ "$PBFT_KILLS_PER_GROUP" -ge 1 ] 2>/dev/null || { echo "bench/run.sh: BENCH_PBFT_KILLS_PER_GROUP must be 1 or more" >&2; exit 1; }
ONLY=${BENCH_ONLY:-}
case "$ONLY" in
  "") ;;
  engines) PROFILE=0; MATCHED=0; OPEN_FRACTIONS="" ;;
  *) printf 'bench/run.sh: BENCH_ONLY is empty or engines, not %s\n' "$ONLY" >&2; exit 1 ;;
esac
SPREAD=${BENCH_SPREAD:-rotate}
QUIET_WAIT=${BENCH_QUIET_WAIT:-20}
BASE=${BENCH_PORT_BASE:-23000}
OUT=${BENCH_OUT:-}
CHART=${BENCH_CHART:-bench/chart.png}

log() { printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench/run.sh: %s\n' "$*" >&2; exit 1; }

# --- 1. Tools -----------------------------------------------------------------
need_pkgs=()
if [ -z "$ONLY" ]; then
  command -v etcd >/dev/null || need_pkgs+=(etcd-server)
  command -v mosquitto >/dev/null || need_pkgs+=(mosquitto)
  command -v mosquitto_pub >/dev/null || need_pkgs+=(mosquitto-clients)
  command -v gnuplot >/dev/null || need_pkgs+=(gnuplot-nox)
fi
if [ "$PROFILE" = 1 ] && ! command -v perf >/dev/null; then need_pkgs+=(linux-perf); fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "${BENCH_NO_INSTALL:-0}" = 1 ] && die "missing: ${need_pkgs[*]} (and BENCH_NO_INSTALL=1)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "installing ${need_pkgs[*]} needs root or sudo"
    SUDO=sudo
  fi
  log "installing ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  # The packages may start system-wide etcd / Mosquitto services; we run our
  # own instances on other ports, so stop and disable those.
  for svc in etcd mosquitto; do
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
      $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif command -v service >/dev/null; then
      $SUDO service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
fi
if [ "$PROFILE" = 1 ] && ! perf record -q -o /dev/null -- true >/dev/null 2>&1; then
  log "perf cannot record here (perf_event_paranoid or container limits): no profiles"
  PROFILE=0
fi

# --- 2. Build -----------------------------------------------------------------
log "building gateway, loadgen and device-sim (release)"
cargo build --release -p gateway -p loadgen -p device-sim
BIN="$ROOT/target/release"
GATEWAY="$BIN/gateway"; LOADGEN="$BIN/loadgen"; DEVSIM="$BIN/device-sim"
ETCD=$(command -v etcd || echo etcd); MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || MOSQUITTO=/usr/sbin/mosquitto

# --- 3. Directories, cleanup ----------------------------------------------------
mkdir -p "$ROOT/target"
DIR=${BENCH_DIR:-$(mktemp -d "$ROOT/target/bench.XXXXXX")}
mkdir -p "$DIR"
RES="$DIR/results"; mkdir -p "$RES"
if [ -z "$OUT" ]; then
  if [ -z "$ONLY" ]; then OUT=bench/BENCHMARKS.md; else OUT="$RES/engines.md"; fi
fi
PIDS=()
SAMPLER=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local all=("${PIDS[@]}")
  [ -n "$SAMPLER" ] && all+=("$SAMPLER")
  for f in "$DIR"/failover-*/pids; do
    [ -f "$f" ] && while read -r p; do all+=("$p"); done <"$f"
  done
  for p in "${all[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${all[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${BENCH_KEEP:-0}" != 1 ] && [ -z "${BENCH_DIR:-}" ]; then
    # Keep the results and logs, drop the data.
    rm -rf "$DIR"/etcd-* "$DIR"/gw-* "$DIR"/failover-*/data 2>/dev/null || true
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
unset RUST_LOG

phase() { echo "$(date +%s) $1" >>"$RES/phases.txt"; log "$1"; }
stop_pids() { # stops the given pids and forgets them
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
  local keep=() p q drop
  for p in "${PIDS[@]}"; do
    drop=0; for q in "$@"; do [ "$p" = "$q" ] && drop=1; done
    [ $drop = 0 ] && keep+=("$p")
  done
  PIDS=("${keep[@]}")
}
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
USED_PORTS=""
# Ports (offsets from BASE): the etcd groups use client P+1..3 and peer
# P+101..103 for P = 100 (main), 710 (failover), 720 (failover, Entente's
# timings); the gateway groups use HTTP P+1..3, Raft P+101..103, MQTT
# P+201..203 and P+301..303 for P = 300 (main), 730 (failover); Mosquitto 701.
for p in 100 710 720; do for o in 1 2 3 101 102 103; do USED_PORTS+=" $((BASE + p + o))"; done; done
for p in 300 730; do for o in 1 2 3 101 102 103 201 202 203 301 302 303; do USED_PORTS+=" $((BASE + p + o))"; done; done
USED_PORTS+=" $((BASE + 701))"
# The Multi-Paxos groups (BENCH_ENGINES=1): P = 760 (writes), 800 (failover).
if [ "$ENGINES" = 1 ]; then
  for p in 760 800; do for o in 1 2 3 101 102 103 201 202 203 301 302 303; do USED_PORTS+=" $((BASE + p + o))"; done; done
fi
# The PBFT groups (BENCH_PBFT=1), four gateways: P = 1110 (writes), 1120
# (failover), HTTP P+1..4, peers P+101..104, MQTT P+201..204 and P+301..304.
if [ "$PBFT" = 1 ]; then
  for p in 1110 1120; do for o in 1 2 3 4 101 102 103 104 201 202 203 204 301 302 303 304; do
    USED_PORTS+=" $((BASE + p + o))"
  done; done
fi
# The peer-TLS group (BENCH_PEER_TLS=1): P = 340.
if [ "$PEER_TLS" = 1 ]; then
  for o in 1 2 3 101 102 103 201 202 203 301 302 303; do USED_PORTS+=" $((BASE + 340 + o))"; done
fi
for port in $USED_PORTS; do
  port_in_use "$port" && die "port $port is in use; set BENCH_PORT_BASE"
done
case "$DIR" in *" "*) die "the data directory $DIR has a space in its path";; esac

# --- 4. The machine -------------------------------------------------------------
phase "machine"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average before the run: $LOAD_BEFORE" >"$RES/load.txt"
fstype=$(stat -f -c %T "$DIR" 2>/dev/null || echo "?")
"$LOADGEN" machine --dir "$DIR" --out "$RES/machine.json" >/dev/null
SID=$(ps -o sid= -p $$ | tr -d ' ')
"$LOADGEN" sample --session "$SID" --interval-secs 5 --out "$RES/samples.jsonl" &
SAMPLER=$!

# --- 5. Command lines -------------------------------------------------------------
# etcd member i of a group whose ports start at $2 (client $2+i, peer $2+100+i).
etcd_cmd() { # i port_base data_root extra...
  local i=$1 pb=$2 root=$3; shift 3
  local ic="e1=http://127.0.0.1:$((pb + 101)),e2=http://127.0.0.1:$((pb + 102)),e3=http://127.0.0.1:$((pb + 103))"
  echo "$ETCD --name e$i --data-dir $root/e$i" \
       "--listen-client-urls http://127.0.0.1:$((pb + i)) --advertise-client-urls http://127.0.0.1:$((pb + i))" \
       "--listen-peer-urls http://127.0.0.1:$((pb + 100 + i)) --initial-advertise-peer-urls http://127.0.0.1:$((pb + 100 + i))" \
       "--initial-cluster $ic --initial-cluster-token entente-bench --initial-cluster-state new $*"
}
etcd_endpoints() { echo "http://127.0.0.1:$(($1 + 1)),http://127.0.0.1:$(($1 + 2)),http://127.0.0.1:$(($1 + 3))"; }
# Entente gateway i: http $2+i, raft $2+100+i, mqtt $2+200+i, mqtt5 $2+300+i.
# The load generator's one token sends thousands of requests a second, past
# the default per-token limit (1,000/s): the limit is off here, as an
# operator would set it for a load-test token; etcd has none.
gw_cmd() { # i port_base data_root extra...
  local i=$1 pb=$2 root=$3; shift 3
  local peers="1=127.0.0.1:$((pb + 101)),2=127.0.0.1:$((pb + 102)),3=127.0.0.1:$((pb + 103))"
  echo "$GATEWAY --node-id $i --peers $peers --data-dir $root/g$i" \
       "--http-listen 127.0.0.1:$((pb + i)) --raft-listen 127.0.0.1:$((pb + 100 + i))" \
       "--cluster-secret entente-bench-secret --rest-rate-limit 0" \
       "--mqtt-listen 127.0.0.1:$((pb + 200 + i)) --mqtt5-listen 127.0.0.1:$((pb + 300 + i)) $*"
}
gw_endpoints() { echo "http://127.0.0.1:$(($1 + 1)),http://127.0.0.1:$(($1 + 2)),http://127.0.0.1:$(($1 + 3))"; }
gw_tokens() { echo "$1/g1/admin-token,$1/g2/admin-token,$1/g3/admin-token"; }

# Main groups: etcd on BASE+1xx/2xx, Entente on BASE+3xx..6xx, Mosquitto BASE+701.
EB=$((BASE + 100)); GB=$((BASE + 300))
EDATA="$DIR/etcd-main"; GDATA="$DIR/gw-main"; mkdir -p "$EDATA" "$GDATA" "$DIR/logs"
E_EP=$(etcd_endpoints $EB); G_EP=$(gw_endpoints $GB); G_TOK=$(gw_tokens "$GDATA")

# --- 6. Start both groups -----------------------------------------------------------
phase "start groups"
ETCD_PIDS=(); GW_PIDS=()
for i in 1 2 3; do
  if [ -z "$ONLY" ]; then
    # shellcheck disable=SC2046
    $(etcd_cmd $i $EB "$EDATA") >"$DIR/logs/etcd$i.log" 2>&1 &
    ETCD_PIDS+=($!); PIDS+=($!)
  fi
  # shellcheck disable=SC2046
  $(gw_cmd $i $GB "$GDATA") >"$DIR/logs/gw$i.log" 2>&1 &
  GW_PIDS+=($!); PIDS+=($!)
done
E_LEADER=-1
[ -z "$ONLY" ] && E_LEADER=$("$LOADGEN" ready --target etcd --endpoints "$E_EP")
G_LEADER=$("$LOADGEN" ready --target entente --endpoints "$G_EP" --token-file "$G_TOK")
log "etcd leader: member $((E_LEADER + 1)); Entente leader: gateway $((G_LEADER + 1))"
MAXC=1; for c in $CLIENTS; do [ "$c" -gt "$MAXC" ] && MAXC=$c; done
[ -z "$ONLY" ] && "$LOADGEN" setup --target etcd --endpoints "$E_EP" --clients "$MAXC"
"$LOADGEN" setup --target entente --endpoints "$G_EP" --token-file "$G_TOK" --clients "$MAXC"

E_PIDS=$(IFS=,; echo "${ETCD_PIDS[*]}"); N_PIDS=$(IFS=,; echo "${GW_PIDS[*]}")
lg() { # system subcommand args... : a load run against one system
  local sys=$1; shift
  if [ "$sys" = etcd ]; then
    "$LOADGEN" "$@" --target etcd --endpoints "$E_EP" --pids "$E_PIDS" \
      --warmup-secs "$WARMUP" --duration-secs "$SECS" --spread "$SPREAD" >/dev/null
  else
    "$LOADGEN" "$@" --target entente --endpoints "$G_EP" --token-file "$G_TOK" --pids "$N_PIDS" \
      --warmup-secs "$WARMUP" --duration-secs "$SECS" --spread "$SPREAD" >/dev/null
  fi
}
# The two systems alternate who goes first from one level to the next, so
# a slow drift in the machine's other load does not favour one of them; and
# before each pair the script waits (up to BENCH_QUIET_WAIT seconds) for the
# CPUs to be mostly idle, so a burst of other work on a shared machine is
# less likely to land on one system's measurement only.
order() {
  if [ "$QUIET_WAIT" -gt 0 ]; then
    "$LOADGEN" wait-quiet --timeout-secs "$QUIET_WAIT" >>"$RES/waits.txt" || true
  fi
  if [ $(($1 % 2)) = 0 ]; then echo "etcd entente"; else echo "entente etcd"; fi
}

# --- 7. Replicated writes -----------------------------------------------------------
n=0
if [ -z "$ONLY" ]; then
  phase "writes (closed loop)"
  for c in $CLIENTS; do
    for s in $(order $n); do
      lg "$s" write --clients "$c" --out "$RES/write-$s-c$c.json"
    done
    n=$((n + 1))
  done
fi
if [ -n "$OPEN_FRACTIONS" ]; then
  phase "writes (open loop)"
  PEAK=$("$LOADGEN" peak --results "$RES")
  for f in $OPEN_FRACTIONS; do
    rate=$(awk -v p="$PEAK" -v f="$f" 'BEGIN { printf "%d", p * f }')
    [ "$rate" -gt 0 ] || continue
    for s in $(order $n); do
      lg "$s" write --clients "$MAXC" --rate "$rate" --out "$RES/write-$s-open-r$rate.json"
    done
    n=$((n + 1))
  done
fi

# --- 7b. Writes with peer TLS (BENCH_PEER_TLS=1) -------------------------------------
# A third group, its gateways talking mutual TLS, against the plain group:
# the same closed-loop writes, the two taking turns at each level. Results
# stay out of $RES (the report reads those); a summary is appended to it.
PEER_TLS_SUMMARY="$DIR/peer-tls/summary.txt"
if [ "$PEER_TLS" = 1 ]; then
  phase "writes with and without peer TLS"
  TB=$((BASE + 340)); TDATA="$DIR/gw-tls"; mkdir -p "$TDATA" "$DIR/peer-tls"
  "$GATEWAY" certs --out "$DIR/pki" --nodes 1,2,3 >"$DIR/logs/certs.log"
  TLS_PIDS=()
  for i in 1 2 3; do
    # shellcheck disable=SC2046
    $(gw_cmd $i $TB "$TDATA") --peer-tls-ca "$DIR/pki/ca.pem" --peer-tls-cert "$DIR/pki/node-$i.pem" \
      --peer-tls-key "$DIR/pki/node-$i.key" >"$DIR/logs/gw-tls$i.log" 2>&1 &
    TLS_PIDS+=($!); PIDS+=($!)
  done
  T_EP=$(gw_endpoints $TB); T_TOK=$(gw_tokens "$TDATA"); T_PIDS=$(IFS=,; echo "${TLS_PIDS[*]}")
  "$LOADGEN" ready --target entente --endpoints "$T_EP" --token-file "$T_TOK" >/dev/null
  "$LOADGEN" setup --target entente --endpoints "$T_EP" --token-file "$T_TOK" --clients "$MAXC"
  for c in $CLIENTS; do
    for s in $(order $n); do
      if [ "$s" = etcd ]; then mode=plain ep=$G_EP tok=$G_TOK pids=$N_PIDS
      else mode=tls ep=$T_EP tok=$T_TOK pids=$T_PIDS; fi
      line=$("$LOADGEN" write --target entente --endpoints "$ep" --token-file "$tok" --pids "$pids" \
        --warmup-secs "$WARMUP" --duration-secs "$SECS" --spread "$SPREAD" --clients "$c" \
        --out "$DIR/peer-tls/write-$mode-c$c.json" 2>&1 >/dev/null | tail -1)
      echo "peer $mode: $line" | tee -a "$PEER_TLS_SUMMARY" >&2
    done
    n=$((n + 1))
  done
  stop_pids "${TLS_PIDS[@]}"
fi

# --- 7c. Writes on Multi-Paxos (BENCH_ENGINES=1) ------------------------------------------
# A group on the other consensus engine a gateway runs, against the main
# (Raft) group: the same closed-loop writes, the two taking turns at each
# level. Results stay out of $RES; a summary is appended to the report.
ENGINES_SUMMARY="$DIR/engines/summary.txt"
if [ "$ENGINES" = 1 ]; then
  phase "writes on Raft and on Multi-Paxos"
  PB=$((BASE + 760)); PDATA="$DIR/gw-paxos"; mkdir -p "$PDATA" "$DIR/engines"
  PAXOS_PIDS=()
  for i in 1 2 3; do
    # shellcheck disable=SC2046
    $(gw_cmd $i $PB "$PDATA" --consensus multi-paxos) >"$DIR/logs/gw-paxos$i.log" 2>&1 &
    PAXOS_PIDS+=($!); PIDS+=($!)
  done
  P_EP=$(gw_endpoints $PB); P_TOK=$(gw_tokens "$PDATA"); P_PIDS=$(IFS=,; echo "${PAXOS_PIDS[*]}")
  "$LOADGEN" ready --target entente --endpoints "$P_EP" --token-file "$P_TOK" >/dev/null
  "$LOADGEN" setup --target entente --endpoints "$P_EP" --token-file "$P_TOK" --clients "$MAXC"
  for c in $CLIENTS; do
    for s in $(order $n); do
      if [ "$s" = etcd ]; then engine=raft ep=$G_EP tok=$G_TOK pids=$N_PIDS
      else engine=multi-paxos ep=$P_EP tok=$P_TOK pids=$P_PIDS; fi
      line=$("$LOADGEN" write --target entente --endpoints "$ep" --token-file "$tok" --pids "$pids" \
        --warmup-secs "$WARMUP" --duration-secs "$SECS" --spread "$SPREAD" --clients "$c" \
        --out "$DIR/engines/write-$engine-c$c.json" 2>&1 >/dev/null | tail -1)
      printf '%-12s %s\n' "$engine:" "$line" | tee -a "$ENGINES_SUMMARY" >&2
    done
    n=$((n + 1))
  done
  stop_pids "${PAXOS_PIDS[@]}"
fi

# --- 7d. Writes on PBFT (BENCH_PBFT=1) ----------------------------------------------------
# Four gateways on --consensus pbft (f = 1) against the main (Raft) group:
# the same closed-loop writes, the two taking turns at each level. Results
# stay out of $RES; a summary is appended to the report.
PBFT_SUMMARY="$DIR/pbft/summary.txt"
# PBFT gateway i of four: http $2+i, peers $2+100+i, mqtt $2+200+i, mqtt5 $2+300+i.
pbft_cmd() { # i port_base data_root group_keys extra...
  local i=$1 pb=$2 root=$3 keys=$4; shift 4
  local peers="1=127.0.0.1:$((pb + 101)),2=127.0.0.1:$((pb + 102)),3=127.0.0.1:$((pb + 103)),4=127.0.0.1:$((pb + 104))"
  echo "$GATEWAY --consensus pbft --group-keys $keys --node-id $i --peers $peers --data-dir $root/g$i" \
       "--http-listen 127.0.0.1:$((pb + i)) --raft-listen 127.0.0.1:$((pb + 100 + i))" \
       "--cluster-secret entente-bench-secret --rest-rate-limit 0" \
       "--mqtt-listen 127.0.0.1:$((pb + 200 + i)) --mqtt5-listen 127.0.0.1:$((pb + 300 + i)) $*"
}
# Makes each member's key in its data directory (`gateway keys`) and
# prints the --group-keys value built from what it printed.
pbft_keys() { # data_root
  local root=$1 i k keys=""
  for i in 1 2 3 4; do
    mkdir -p "$root/g$i"
    k=$("$GATEWAY" keys --data-dir "$root/g$i" 2>>"$DIR/logs/keys.log") || die "gateway keys --data-dir $root/g$i failed"
    case "$k" in ed25519:*) ;; *) die "gateway keys printed '$k', not ed25519:<base64>";; esac
    keys+="${keys:+,}$i=$k"
  done
  echo "$keys"
}
pbft_endpoints() { echo "$(gw_endpoints "$1"),http://127.0.0.1:$(($1 + 4))"; }
pbft_tokens() { echo "$(gw_tokens "$1"),$1/g4/admin-token"; }
# The PBFT/Raft table of the write runs in $DIR/pbft.
pbft_table() {
  python3 - "$DIR/pbft" "$CLIENTS" <<'PY'
import json, os, sys
d, levels = sys.argv[1], sys.argv[2].split()
def load(engine, c):
    p = os.path.join(d, "write-%s-c%s.json" % (engine, c))
    return json.load(open(p)) if os.path.exists(p) else None
def cells(r):
    if r is None:
        return "–", "–", "–", "–", "–"
    f = r.get("leader_fsyncs_per_op")
    cpu = r.get("server_cpu_us_per_op")
    return ("%.0f" % r["throughput"], "%.2f / %.2f" % (r["latency"]["p50"], r["latency"]["p99"]),
            "–" if cpu is None else "%.0f" % cpu, "–" if f is None else "%.2f" % f,
            str(sum(r["errors"].values())))
print("clients | Raft 3: writes/s, p50 / p99 ms, CPU µs/write, leader fsyncs/write, errors"
      " | PBFT 4: writes/s, p50 / p99 ms, CPU µs/write, primary fsyncs/write, errors | PBFT/Raft")
for c in levels:
    r, p = load("raft", c), load("pbft", c)
    ratio = "%.2f×" % (p["throughput"] / r["throughput"]) if r and p and r["throughput"] > 0 else "–"
    print("%7s | %s | %s | %s" % (c, ", ".join(cells(r)), ", ".join(cells(p)), ratio))
PY
}
if [ "$PBFT" = 1 ]; then
  phase "writes on Raft and on PBFT"
  FB=$((BASE + 1110)); mkdir -p "$DIR/pbft"; F_EP=$(pbft_endpoints $FB)
  # A group whose members do not all settle within a minute (one can stop
  # on its first entries: "cannot append entry N: it leaves a gap after the
  # last stored entry") is noted in the summary and replaced, twice at most.
  for try in 1 2 3; do
    FDATA="$DIR/gw-pbft-$try"; mkdir -p "$FDATA"
    F_KEYS=$(pbft_keys "$FDATA")
    PBFT_PIDS=()
    for i in 1 2 3 4; do
      # shellcheck disable=SC2046
      $(pbft_cmd $i $FB "$FDATA" "$F_KEYS") >"$DIR/logs/gw-pbft$try-$i.log" 2>&1 &
      PBFT_PIDS+=($!); PIDS+=($!)
    done
    F_TOK=$(pbft_tokens "$FDATA"); F_PIDS=$(IFS=,; echo "${PBFT_PIDS[*]}")
    "$LOADGEN" ready --target entente --endpoints "$F_EP" --token-file "$F_TOK" >/dev/null \
      2>>"$DIR/pbft/ready.log" && break
    echo "pbft group $try did not settle: $(grep -h 'ERROR' "$DIR"/logs/gw-pbft"$try"-*.log | head -1 | sed 's/^.*ERROR //')" \
      | tee -a "$DIR/pbft/failed-groups.txt" >&2
    stop_pids "${PBFT_PIDS[@]}"
    [ "$try" = 3 ] && die "no PBFT group settled in three tries (see $DIR/logs/gw-pbft*.log)"
  done
  "$LOADGEN" setup --target entente --endpoints "$F_EP" --token-file "$F_TOK" --clients "$MAXC"
  for c in $CLIENTS; do
    for s in $(order $n); do
      if [ "$s" = etcd ]; then engine=raft ep=$G_EP tok=$G_TOK pids=$N_PIDS
      else engine=pbft ep=$F_EP tok=$F_TOK pids=$F_PIDS; fi
      line=$("$LOADGEN" write --target entente --endpoints "$ep" --token-file "$tok" --pids "$pids" \
        --warmup-secs "$WARMUP" --duration-secs "$SECS" --spread "$SPREAD" --clients "$c" \
        --out "$DIR/pbft/write-$engine-c$c.json" 2>&1 >/dev/null | tail -1)
      printf '%-6s %s\n' "$engine:" "$line" | tee -a "$DIR/pbft/runs.txt" >&2
    done
    n=$((n + 1))
  done
  stop_pids "${PBFT_PIDS[@]}"
  pbft_table >"$PBFT_SUMMARY"
fi

# Sections 8 to 10 (etcd, Mosquitto) are skipped with BENCH_ONLY=engines.
if [ -z "$ONLY" ]; then

# --- 8. Reads -----------------------------------------------------------------------
for cons in linearizable local; do
  phase "reads ($cons)"
  for c in $CLIENTS; do
    for s in $(order $n); do
      lg "$s" read --consistency "$cons" --clients "$c" --out "$RES/read-$cons-$s-c$c.json"
    done
    n=$((n + 1))
  done
done

# --- 9. Profiles (not measured runs: perf costs CPU) ----------------------------------
PSECS=5
profile() { # name pid description command...: perf on pid while the command runs
  local name=$1 pid=$2 what=$3; shift 3
  ( sleep 2; perf record -q -F 499 --call-graph dwarf,16384 -p "$pid" -o "$DIR/perf-$name.data" \
      -- sleep "$PSECS" >/dev/null 2>&1 || true ) &
  local perf=$!
  "$@" >/dev/null 2>>"$DIR/logs/profile-runs.log" || true
  wait "$perf" || true
  { echo "$what"; "$ROOT/bench/profile-summary.sh" "$DIR/perf-$name.data"; } >"$RES/profile-$name.txt" 2>&1 || true
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -f "$DIR/perf-$name.data"
}
if [ "$PROFILE" = 1 ]; then
  phase "profiles"
  PC=64; [ "$MAXC" -lt 64 ] && PC=$MAXC
  L=$("$LOADGEN" ready --target etcd --endpoints "$E_EP")
  profile writes-etcd "${ETCD_PIDS[$L]}" "etcd leader during $PC-client closed-loop writes (the binary is stripped: symbols unresolved)" \
    "$LOADGEN" write --target etcd --endpoints "$E_EP" --clients "$PC" --warmup-secs 0 --duration-secs $((PSECS + 3)) --spread "$SPREAD"
  L=$("$LOADGEN" ready --target entente --endpoints "$G_EP" --token-file "$G_TOK")
  profile writes-entente "${GW_PIDS[$L]}" "Entente leader during $PC-client closed-loop writes" \
    "$LOADGEN" write --target entente --endpoints "$G_EP" --token-file "$G_TOK" --clients "$PC" --warmup-secs 0 \
    --duration-secs $((PSECS + 3)) --spread "$SPREAD"
fi

# --- 10. MQTT ingest ------------------------------------------------------------------
phase "mqtt ingest"
MPORT=$((BASE + 701))
cat >"$DIR/mosquitto.conf" <<EOF
# Mosquitto's defaults, with one anonymous listener on loopback.
listener $MPORT 127.0.0.1
allow_anonymous true
EOF
"$MOSQUITTO" -c "$DIR/mosquitto.conf" >"$DIR/logs/mosquitto.log" 2>&1 &
MOSQ_PID=$!; PIDS+=($MOSQ_PID)
for _ in $(seq 50); do port_in_use $MPORT && break; sleep 0.1; done
mosquitto_pub -h 127.0.0.1 -p $MPORT -q 1 -t bench/hello -m up || die "Mosquitto does not answer"
G_LEADER=$("$LOADGEN" ready --target entente --endpoints "$G_EP" --token-file "$G_TOK")
G_MQTT="127.0.0.1:$((GB + 201 + G_LEADER))"; G_API="http://127.0.0.1:$((GB + 1 + G_LEADER))"
TOKEN_FILE="$GDATA/g$((G_LEADER + 1))/admin-token"
[ -f "$TOKEN_FILE" ] || TOKEN_FILE=$(ls "$GDATA"/g*/admin-token | head -1)
ingest() { # broker clients inflight secs [out]
  local b=$1 c=$2 i=$3 secs=$4 out=${5:-/dev/null}
  if [ "$b" = mosquitto ]; then
    "$DEVSIM" ingest --anonymous --gateways "127.0.0.1:$MPORT" --clients "$c" --inflight "$i" \
      --duration-secs "$secs" --connect-timeout-secs 120 --json >"$out" 2>>"$DIR/logs/ingest.log"
  else
    "$DEVSIM" ingest --gateways "$G_MQTT" --api "$G_API" --token-file "$TOKEN_FILE" \
      --devices-file "$DIR/ingest-devices.json" --clients "$c" --inflight "$i" \
      --duration-secs "$secs" --connect-timeout-secs 120 --json >"$out" 2>>"$DIR/logs/ingest.log"
  fi
}
for i in $INFLIGHT; do
  for c in $INGEST_CLIENTS; do
    for b in $(order $n | sed 's/etcd/mosquitto/'); do
      ingest "$b" "$c" "$i" "$SECS" "$RES/ingest-$b-c$c-i$i.json" || log "ingest $b $c clients failed (see logs/ingest.log)"
    done
    n=$((n + 1))
  done
done
if [ "$PROFILE" = 1 ]; then
  PI=$(echo "$INGEST_CLIENTS" | awk '{print $1}')
  profile ingest-mosquitto "$MOSQ_PID" "Mosquitto during $PI-client QoS 1 ingest, 1 in flight per client" \
    ingest mosquitto "$PI" 1 $((PSECS + 3))
  profile ingest-entente "${GW_PIDS[$G_LEADER]}" "Entente leader gateway during $PI-client QoS 1 ingest, 1 in flight per client" \
    ingest entente "$PI" 1 $((PSECS + 3))
fi
stop_pids "$MOSQ_PID"
fi # BENCH_ONLY
stop_pids "${ETCD_PIDS[@]}" "${GW_PIDS[@]}"

# --- 11. Failover -----------------------------------------------------------------------
failover() { # system slug label port_base extra-flags...
  local sys=$1 slug=$2 label=$3 pb=$4; shift 4
  local d="$DIR/failover-$sys-$slug"; mkdir -p "$d/data"
  local cmds=() i
  for i in 1 2 3; do
    if [ "$sys" = etcd ]; then cmds+=(--member-cmd "$(etcd_cmd $i "$pb" "$d/data" "$@")")
    else cmds+=(--member-cmd "$(gw_cmd $i "$pb" "$d/data")"); fi
  done
  if [ "$sys" = etcd ]; then
    "$LOADGEN" failover --target etcd --endpoints "$(etcd_endpoints "$pb")" "${cmds[@]}" \
      --log-dir "$d" --trials "$KILLS" --label "$label" --out "$RES/failover-$sys-$slug.json" >/dev/null
  else
    "$LOADGEN" failover --target entente --endpoints "$(gw_endpoints "$pb")" --token-file "$(gw_tokens "$d/data")" \
      "${cmds[@]}" --log-dir "$d" --trials "$KILLS" --label "$label" --out "$RES/failover-$sys-$slug.json" >/dev/null
  fi
}
phase "failover"
[ -z "$ONLY" ] && failover etcd defaults defaults $((BASE + 710))
failover entente defaults defaults $((BASE + 730))
if [ "$ENGINES" = 1 ]; then
  # The Multi-Paxos group's failover, reported beside the summary above.
  d="$DIR/failover-entente-paxos"; mkdir -p "$d/data"
  cmds=(); for i in 1 2 3; do cmds+=(--member-cmd "$(gw_cmd $i $((BASE + 800)) "$d/data" --consensus multi-paxos)"); done
  "$LOADGEN" failover --target entente --endpoints "$(gw_endpoints $((BASE + 800)))" \
    --token-file "$(gw_tokens "$d/data")" "${cmds[@]}" --log-dir "$d" --trials "$KILLS" \
    --label "multi-paxos" --out "$DIR/engines/failover-multi-paxos.json" >/dev/null
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("multi-paxos failover: kill -> first write p50 %.0f ms, p99 %.0f ms over %d kills" % (r["p50_ms"], r["p99_ms"], len(r["trials_ms"])))' \
    "$DIR/engines/failover-multi-paxos.json" | tee -a "$ENGINES_SUMMARY" >&2
fi
if [ "$PBFT" = 1 ]; then
  # The PBFT group's view changes: kill the primary (the member whose
  # /v1/cluster says leader), time to the first write through a survivor.
  # BENCH_PBFT_KILLS_PER_GROUP kills per group of fresh processes (a
  # restarted PBFT gateway can stop while catching up, "cannot append
  # entry N: it leaves a gap after the last stored entry", and a group
  # short of one member has no quorum left for the next kill).
  # A group that fails (it does not settle) is logged, counted in the
  # summary and replaced by a new one, up to $KILLS times.
  left=$KILLS; g=0; failed_groups=0
  while [ "$left" -gt 0 ] && [ "$failed_groups" -le "$KILLS" ]; do
    k=$PBFT_KILLS_PER_GROUP; [ "$k" -gt "$left" ] && k=$left
    g=$((g + 1)); d="$DIR/failover-entente-pbft-$g"; mkdir -p "$d/data"
    keys=$(pbft_keys "$d/data")
    cmds=(); for i in 1 2 3 4; do cmds+=(--member-cmd "$(pbft_cmd $i $((BASE + 1120)) "$d/data" "$keys")"); done
    if "$LOADGEN" failover --target entente --endpoints "$(pbft_endpoints $((BASE + 1120)))" \
      --token-file "$(pbft_tokens "$d/data")" "${cmds[@]}" --log-dir "$d" --trials "$k" \
      --label "pbft" --out "$DIR/pbft/failover-pbft-$g.json" >/dev/null 2>>"$DIR/pbft/failover.log"; then
      left=$((left - k))
    else
      failed_groups=$((failed_groups + 1))
      log "PBFT failover group $g failed (see $d/member*.log, $DIR/pbft/failover.log)"
      echo "pbft failover group $g failed: $(grep -h 'ERROR' "$d"/member*.log | head -1 | sed 's/^.*ERROR //')" \
        >>"$DIR/pbft/failed-groups.txt"
    fi
    [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$d/data"
  done
  [ -s "$DIR/pbft/failed-groups.txt" ] && cat "$DIR/pbft/failed-groups.txt" >>"$PBFT_SUMMARY" 
  python3 -c 'import glob, json, math, os, sys
d, raft = sys.argv[1], sys.argv[2]
trials, failed, groups = [], 0, 0
for p in sorted(glob.glob(os.path.join(d, "failover-pbft-*.json"))):
    r = json.load(open(p)); trials += r["trials_ms"]; failed += r["failed_attempts"]; groups += 1
q = lambda s, p: s[min(max(math.ceil(len(s) * p), 1), len(s)) - 1]
if trials:
    s = sorted(trials)
    print("pbft failover: kill -> first write p50 %.0f ms, p99 %.0f ms, max %.0f ms over %d kills in %d groups (%d failed attempts)"
          % (q(s, 0.5), q(s, 0.99), s[-1], len(s), groups, failed))
    json.dump({"kind": "failover", "label": "pbft", "trials_ms": trials, "p50_ms": q(s, 0.5), "p99_ms": q(s, 0.99),
               "max_ms": s[-1], "failed_attempts": failed}, open(os.path.join(d, "failover-pbft.json"), "w"))
else:
    print("pbft failover: no kill completed (see failover.log)")
if os.path.exists(raft):
    r = json.load(open(raft))
    print("raft failover: kill -> first write p50 %.0f ms, p99 %.0f ms, max %.0f ms over %d kills (%d failed attempts)"
          % (r["p50_ms"], r["p99_ms"], r["max_ms"], len(r["trials_ms"]), r["failed_attempts"]))' \
    "$DIR/pbft" "$RES/failover-entente-defaults.json" | tee -a "$PBFT_SUMMARY" >&2
fi
if [ "$MATCHED" = 1 ]; then
  failover etcd matched "Entente's timings: --heartbeat-interval 40 --election-timeout 200" $((BASE + 720)) \
    --heartbeat-interval 40 --election-timeout 200
fi
phase "report"
kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""

# --- 12. Report -------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - STARTED ))
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || rev="$rev + uncommitted changes"
spread_desc=$(case $SPREAD in
  rotate) echo "request k of client i goes to member (i + k) mod 3, so two requests in three land on a follower, which passes writes to the leader (both systems forward) and confirms linearizable reads with it";;
  client) echo "client i sends every request to member i mod 3";;
  leader) echo "every request goes to the member leading when the run starts";;
esac)
if [ -n "$ONLY" ]; then
  # The engine comparison alone: its sections, under a short header.
  {
    echo "# Entente's consensus engines side by side"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), Entente $rev (release build), \`$COMMAND\`,"
    echo "$((ELAPSED / 60)) min $((ELAPSED % 60)) s; every process on this machine's $(nproc) CPUs"
    echo "(load average before the run: $LOAD_BEFORE)."
  } >"$OUT"
else
cat >"$RES/meta.txt" <<EOF
date=$(date -u '+%Y-%m-%d %H:%M UTC')
command=$COMMAND
elapsed=$((ELAPSED / 60)) min $((ELAPSED % 60)) s
quick=$QUICK
secs=$SECS
quiet_wait=$QUIET_WAIT
warmup=$WARMUP
spread_desc=$spread_desc
load_notes=The load generator runs on the same two cores as the servers; its own CPU per request is in the cost tables. Both groups run during the HTTP phases (the one not under load idles: heartbeats only); the systems alternate which goes first at each level. Data directories are on a ${fstype} file system.
etcd_version=$("$ETCD" --version 2>/dev/null | head -1 | sed 's/etcd Version: //') (Debian package)
entente_version=$rev, release build
mosquitto_version=$("$MOSQUITTO" -h 2>/dev/null | head -1 | sed 's/mosquitto version //') (Debian package)
etcd_processes=3 members on 127.0.0.1
entente_processes=3 gateways on 127.0.0.1 (each also runs its MQTT broker)
mosquitto_processes=1 broker on 127.0.0.1
etcd_durability=Raft WAL fdatasync before a write is acknowledged, batched across concurrent proposals (as shipped; fsync cannot be turned off in 3.4)
entente_durability=Raft log fdatasync before a write is acknowledged, one per batch of queued entries (group commit); SQLite state in WAL mode, synchronous=NORMAL (the Raft log is the durability point)
mosquitto_durability=none: persistence off (its default); a QoS 1 PUBACK goes out on receipt, messages live in memory
etcd_store=bbolt, backend commit every 100 ms or 10,000 writes (defaults)
entente_store=SQLite (sqlx opens the connections; apply runs each committed batch as one transaction in one call on its connection's handle); each shadow write also stores an event row
mosquitto_store=memory
etcd_snapshots=every 100,000 applied entries (--snapshot-count default): not reached in this run's writes
entente_snapshots=every 10,000 applied entries (--snapshot-every default): a VACUUM INTO copy of the state database, several per write run
mosquitto_snapshots=–
etcd_timings=heartbeat 100 ms, election timeout 1,000 ms (randomised 1–2 s), pre-vote off (3.4 defaults)
entente_timings=tick 20 ms: heartbeat 40 ms, election 200–400 ms (randomised), pre-vote and check-quorum on; write timeout 5 s (all defaults)
mosquitto_timings=max_inflight_messages 20, max_queued_messages 1000 (defaults)
etcd_api=JSON gateway on the client port (HTTP/1.1, turned into gRPC in-process): POST /v3/kv/put, /v3/kv/range
entente_api=REST (axum, HTTP/1.1): PATCH /v1/devices/{id}/shadow, GET /v1/devices/{id}; MQTT 3.1.1 on the leader's listener for ingest
mosquitto_api=MQTT 3.1.1, one listener
etcd_write=PUT of a 100-byte JSON value under key bench/bench-NNNNNN (base64 in a ~180-byte JSON body); one key per client
entente_write=JSON merge patch of a device's desired document with a 100-byte JSON object (~112-byte body): versioned shadow plus an event row; one device per client
mosquitto_write=–
etcd_auth=none (auth off, the default)
entente_auth=bearer token on every REST request; MQTT clients log in with their device secret and pass through the ACL codec wrapper (both always on)
mosquitto_auth=anonymous (allow_anonymous true), no ACL
etcd_flags=--name, --data-dir, listen/advertise URLs on 127.0.0.1, --initial-cluster, --initial-cluster-token, --initial-cluster-state new; nothing else
entente_flags=--node-id, --peers, --data-dir, --http-listen, --raft-listen, --cluster-secret, --mqtt-listen, --mqtt5-listen on 127.0.0.1, and --rest-rate-limit 0 (the per-token limit, 1,000/s by default, off for the load generator's one token; etcd has none); nothing else
mosquitto_flags=-c with the two lines above (listener, allow_anonymous)
failover_desc=Each system as three fresh processes on loopback with fsync on, quiet (no load). Per trial: wait until every member has applied what the leader has, wait 0.5 s, SIGKILL the leader, then start a write attempt every 10 ms alternating between the two survivors (each allowed 5 s, none abandoned) and stop the clock at the first success (etcd PUT, Entente desired-state PATCH). The killed member is restarted on its data and caught up before the next trial. Both systems at their default timings (above); the extra etcd row gives etcd Entente's timings, to separate the protocol from the defaults.
ingest_desc=device-sim ingest (the same code for both brokers): each client connects (MQTT 3.1.1, clean session off), then publishes QoS 1 JSON of 100 bytes to devices/{id}/shadow/reported, keeping at most 1 or 10 messages unacknowledged (closed loop: the next goes when one is acknowledged), for $SECS s after all are connected; latency is publish → PUBACK. Mosquitto: anonymous clients. Entente: registered devices logging in with their secrets, on the leader gateway's 3.1.1 listener; the gateway's PUBACK means committed (the reported-state proposal a message is folded into, one per device in flight carrying what arrived meanwhile, is committed by the group and applied), Mosquitto's means received, in memory.
profile_desc=perf record -F 499 --call-graph dwarf on one process during a separate, unmeasured run ($PSECS s): sampled CPU time of that process only (time spent waiting on the disk or the network does not show). Summarised by bench/profile-summary.sh: CPU by thread, self time by component (classes of symbol names), top symbols.
EOF
CHART_ABS=$(cd "$(dirname "$CHART")" && pwd)/$(basename "$CHART")
OUT_DIR=$(cd "$(dirname "$OUT")" && pwd)
CHART_LINK=$(realpath --relative-to="$OUT_DIR" "$CHART_ABS" 2>/dev/null || echo "$CHART_ABS")
NOTES="$ROOT/bench/NOTES.md"
"$LOADGEN" report --results "$RES" --out "$OUT" --chart-data "$DIR/chart" \
  --chart-out "$CHART_ABS" --chart-link "$CHART_LINK" --notes "$NOTES"
gnuplot "$DIR/chart/chart.gp" || log "gnuplot failed; the chart was not drawn"
fi # BENCH_ONLY
if [ "$PEER_TLS" = 1 ] && [ -s "$PEER_TLS_SUMMARY" ]; then
  {
    echo
    echo "## Entente writes with and without TLS between gateways (BENCH_PEER_TLS=1)"
    echo
    echo "Two three-gateway groups of this run, one talking plain TCP between gateways, one mutual"
    echo "TLS 1.3 (certificates from \`gateway certs\`); the same closed-loop writes as above against"
    echo "each in turn at every level ($SECS s each, after $WARMUP s warm-up):"
    echo
    echo '```'
    cat "$PEER_TLS_SUMMARY"
    echo '```'
  } >>"$OUT"
fi
if [ "$ENGINES" = 1 ] && [ -s "$ENGINES_SUMMARY" ]; then
  {
    echo
    echo "## Entente writes on Raft and on Multi-Paxos (BENCH_ENGINES=1)"
    echo
    echo "The main three-gateway group (Raft) and a group started with \`--consensus multi-paxos\`;"
    echo "the same closed-loop writes as above against each in turn at every level ($SECS s each,"
    echo "after $WARMUP s warm-up), then $KILLS leader kills of the Multi-Paxos group (as in Failover):"
    echo
    echo '```'
    cat "$ENGINES_SUMMARY"
    echo '```'
  } >>"$OUT"
fi
if [ "$PBFT" = 1 ] && [ -s "$PBFT_SUMMARY" ]; then
  {
    echo
    echo "## Entente writes on Raft and on PBFT (BENCH_PBFT=1)"
    echo
    echo "The main three-gateway group (Raft) and four gateways started with \`--consensus pbft\`"
    echo "(f = 1; keys from \`gateway keys\`, every member given the four in \`--group-keys\`);"
    echo "closed-loop writes (\`loadgen write\`, as for etcd) against each in turn at every level"
    echo "($SECS s each, after $WARMUP s warm-up). CPU is the server processes' together (3 or 4) per committed"
    echo "write; fsyncs are the leader's (PBFT: the primary's) log fsyncs per write. Then $KILLS"
    echo "kills of the PBFT primary ($PBFT_KILLS_PER_GROUP per group of fresh gateways), each timed"
    echo "to the first write through a survivor (the view change), beside the Raft group's leader"
    echo "kills (as in Failover):"
    echo
    echo '```'
    cat "$PBFT_SUMMARY"
    echo '```'
    echo
    echo "The gateways count no peer messages in \`/metrics\`; messages per committed write per"
    echo "engine come from \`cargo bench -p coordinator --bench engines\` (see docs/THEORY.md)."
  } >>"$OUT"
fi
if [ -n "$ONLY" ]; then
  log "wrote $OUT ($((ELAPSED / 60)) min $((ELAPSED % 60)) s); raw results in $DIR"
  exit 0
fi
log "wrote $OUT and $CHART ($((ELAPSED / 60)) min $((ELAPSED % 60)) s); raw results in $RES"
