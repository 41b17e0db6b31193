#!/usr/bin/env bash
# MQTT QoS 1 ingest on one machine: Mosquitto against a three-gateway
# Entente group (devices on the leader's 3.1.1 listener), and optionally
# against a second group running another gateway binary (an earlier build,
# say), in the same run and the same way as bench/run.sh's ingest phase
# (device-sim ingest, 100-byte JSON reported-state patches, closed loop).
#
#   bench/ingest.sh
#
# prints a Markdown table: msg/s, p50 and p99 publish -> PUBACK, ratios to
# Mosquitto, and the patches per Raft proposal. Every process it starts is
# stopped on exit (by pid).
#
# Knobs (environment):
#   INGEST_SECS=10                 measured seconds per run
#   INGEST_CLIENTS="100 1000"      MQTT clients
#   INGEST_INFLIGHT="1 10"         unacknowledged QoS 1 messages per client
#   INGEST_ROUNDS=1                repeat every row this many times
#   INGEST_BASELINE=path           a second gateway binary, run as its own group
#   INGEST_QUIET_WAIT=20           before each run, wait up to this many seconds
#                                  for the CPUs to be at most 25 % busy
#   INGEST_PORT_BASE=24000         ports BASE+300 .. BASE+1603 on 127.0.0.1
#   INGEST_NO_BUILD=1              use target/release as it is
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECS=${INGEST_SECS:-10}
CLIENTS=${INGEST_CLIENTS:-"100 1000"}
INFLIGHT=${INGEST_INFLIGHT:-"1 10"}
ROUNDS=${INGEST_ROUNDS:-1}
BASELINE=${INGEST_BASELINE:-}
QUIET_WAIT=${INGEST_QUIET_WAIT:-20}
BASE=${INGEST_PORT_BASE:-24000}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "bench/ingest.sh: mosquitto is needed (apt-get install mosquitto)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench/ingest.sh: python3 is needed for the table" >&2; exit 1; }
if [ "${INGEST_NO_BUILD:-0}" != 1 ]; then
  cargo build --release --locked -p gateway -p device-sim -p loadgen >&2
fi
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
DEVSIM=$BIN/device-sim; LOADGEN=$BIN/loadgen
DIR=$(mktemp -d "${TMPDIR:-/tmp}/entente-ingest.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$DIR"/*/g? 2>/dev/null || true
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
unset RUST_LOG
mkdir -p "$DIR/logs" "$DIR/results"

"$LOADGEN" machine --dir "$DIR" --out "$DIR/machine.json" >/dev/null
MPORT=$((BASE + 701))
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MPORT" >"$DIR/mosquitto.conf"
"$MOSQUITTO" -c "$DIR/mosquitto.conf" >"$DIR/logs/mosquitto.log" 2>&1 &
PIDS+=($!)

declare -A MQTT API TOKEN
group() { # name binary port_base: three gateways, as bench/run.sh starts them
  local name=$1 bin=$2 pb=$3 i
  local peers="1=127.0.0.1:$((pb + 101)),2=127.0.0.1:$((pb + 102)),3=127.0.0.1:$((pb + 103))"
  for i in 1 2 3; do
    "$bin" --node-id $i --peers "$peers" --data-dir "$DIR/$name/g$i" \
      --http-listen 127.0.0.1:$((pb + i)) --raft-listen 127.0.0.1:$((pb + 100 + i)) \
      --cluster-secret entente-bench-secret \
      --mqtt-listen 127.0.0.1:$((pb + 200 + i)) --mqtt5-listen 127.0.0.1:$((pb + 300 + i)) \
      >"$DIR/logs/$name-g$i.log" 2>&1 &
    PIDS+=($!)
  done
  local ep="http://127.0.0.1:$((pb + 1)),http://127.0.0.1:$((pb + 2)),http://127.0.0.1:$((pb + 3))"
  local tok="$DIR/$name/g1/admin-token,$DIR/$name/g2/admin-token,$DIR/$name/g3/admin-token"
  local l
  l=$("$LOADGEN" ready --target entente --endpoints "$ep" --token-file "$tok")
  MQTT[$name]=127.0.0.1:$((pb + 201 + l)); API[$name]=http://127.0.0.1:$((pb + 1 + l))
  TOKEN[$name]=$DIR/$name/g$((l + 1))/admin-token
  [ -f "${TOKEN[$name]}" ] || TOKEN[$name]=$(ls "$DIR/$name"/g*/admin-token | head -1)
}
SYSTEMS="mosquitto entente"
group entente "$BIN/gateway" $((BASE + 300))
if [ -n "$BASELINE" ]; then
  group baseline "$BASELINE" $((BASE + 1300))
  SYSTEMS="$SYSTEMS baseline"
fi

ingest() { # system clients inflight out
  local s=$1 c=$2 i=$3 out=$4
  if [ "$s" = mosquitto ]; then
    "$DEVSIM" ingest --anonymous --gateways "127.0.0.1:$MPORT" --clients "$c" --inflight "$i" \
      --duration-secs "$SECS" --connect-timeout-secs 120 --json >"$out" 2>>"$DIR/logs/ingest.log"
  else
    "$DEVSIM" ingest --gateways "${MQTT[$s]}" --api "${API[$s]}" --token-file "${TOKEN[$s]}" \
      --devices-file "$DIR/$s-devices.json" --clients "$c" --inflight "$i" \
      --duration-secs "$SECS" --connect-timeout-secs 120 --json >"$out" 2>>"$DIR/logs/ingest.log"
  fi
}
n=0
for r in $(seq "$ROUNDS"); do
  for i in $INFLIGHT; do
    for c in $CLIENTS; do
      # The systems take turns going first.
      set -- $SYSTEMS
      order=$(echo "$SYSTEMS" | awk -v k=$((n % $#)) '{for (j = 0; j < NF; j++) printf "%s ", $((j + k) % NF + 1)}')
      for s in $order; do
        if [ "$QUIET_WAIT" -gt 0 ]; then
          "$LOADGEN" wait-quiet --timeout-secs "$QUIET_WAIT" >/dev/null 2>&1 || true
        fi
        ingest "$s" "$c" "$i" "$DIR/results/$s-c$c-i$i-r$r.json" ||
          echo "bench/ingest.sh: $s, $c clients, $i in flight failed (see $DIR/logs/ingest.log)" >&2
      done
      n=$((n + 1))
    done
  done
done

python3 - "$DIR" <<'PY'
import glob, json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "machine.json")))
rows = {}
for f in glob.glob(os.path.join(d, "results", "*.json")):
    s, c, i, r = os.path.basename(f)[:-5].split("-")
    try:
        rows.setdefault((int(i[1:]), int(c[1:]), r), {})[s] = json.load(open(f))
    except ValueError:
        pass
fs = m.get("fsync", {})
print(f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), write + fdatasync of 4 KiB "
      f"p50 {fs.get('p50', 0):.2f} ms, p99 {fs.get('p99', 0):.2f} ms; CPU busy before the start "
      f"{m.get('busy_pct_before', 0):.0f} %, load average {m.get('loadavg_before', '?')}.\n")
others = [s for s in ("entente", "baseline") if any(s in v for v in rows.values())]
head = "| in flight | clients | round | Mosquitto msg/s | p50 / p99 ms |"
line = "|---:|---:|---:|---:|---|"
for s in others:
    head += f" {s} msg/s | p50 / p99 ms | {s}/Mosquitto | patches per proposal |"
    line += "---:|---|---:|---:|"
print(head)
print(line)
for (i, c, r), v in sorted(rows.items()):
    mq = v.get("mosquitto")
    if not mq:
        continue
    rate = mq["acked_per_sec"]
    out = f"| {i} | {c} | {r[1:]} | {rate:,.0f} | {mq['latency']['p50']:.1f} / {mq['latency']['p99']:.1f} |"
    for s in others:
        e = v.get(s)
        if not e:
            out += " – | – | – | – |"
            continue
        rec, prop = e.get("gateway_reports_received") or 0, e.get("gateway_report_proposals") or 0
        per = f"{rec / prop:.1f}" if prop else "–"
        out += (f" {e['acked_per_sec']:,.0f} | {e['latency']['p50']:.1f} / {e['latency']['p99']:.1f} |"
                f" **{e['acked_per_sec'] / rate:.2f}×** | {per} |")
    print(out)
PY
echo "raw results in $DIR/results" >&2
