#!/usr/bin/env bash
# Usage: bench/rtt/run.sh KV_BIN ENGINE DELAY_MS WRITES   (KV_BIN: target/release/entente-kv)
# Three entente-kv members on loopback, every member-to-member link through a
# proxy that delays each byte DELAY_MS one way; WRITES sequential PUTs from a
# client straight at one member (the leader, if the engine has one).
set -euo pipefail
KV=$1; ENGINE=$2; D=$3; N=$4
dir=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && echo "kept $dir" || rm -rf "$dir"; }
trap cleanup EXIT
raft() { echo $((17100 + $1)); }
client() { echo $((17200 + $1)); }
proxy() { echo $((17300 + 10 * $1 + $2)); }  # i -> j
specs=()
for i in 1 2 3; do for j in 1 2 3; do [ $i = $j ] && continue; specs+=("$(proxy $i $j):$(raft $j)"); done; done
python3 "$(dirname "$0")/delayproxy.py" "$D" "${specs[@]}" > $dir/proxy.out 2>&1 &
sleep 1
for i in 1 2 3; do
  peers=""
  for j in 1 2 3; do [ $i = $j ] && continue; peers+="$j=127.0.0.1:$(proxy $i $j),"; done
  "$KV" --id $i --data-dir $dir/n$i --raft-listen 127.0.0.1:$(raft $i) --client-listen 127.0.0.1:$(client $i) \
    --peers "${peers%,}" --voters 1,2,3 --secret s --consensus $ENGINE > $dir/n$i.out 2> $dir/n$i.err &
done
sleep 3
leader=1
for i in 1 2 3; do
  st=$("$KV" request 127.0.0.1:$(client $i) STATUS 2>/dev/null || true)
  case "$st" in *[Ll]eader*) leader=$i;; esac
done
python3 - "$leader" "$N" "$ENGINE" "$D" <<'PY'
import socket, sys, time, statistics
leader=int(sys.argv[1]); n=int(sys.argv[2])
s=socket.create_connection(("127.0.0.1",17200+leader))
f=s.makefile("rw")
lat=[]
for k in range(n + 20):
    t=time.perf_counter()
    f.write(f"PUT k{k} v{k}\n"); f.flush()
    line=f.readline()
    if k >= 20: lat.append((time.perf_counter()-t)*1000)
    if not line.startswith("OK"): print("ERR", line.strip()); break
lat.sort()
print(f"{sys.argv[3]} one-way {sys.argv[4]} ms: median {statistics.median(lat):.2f} ms, p90 {lat[int(len(lat)*0.9)]:.2f} ms (n={len(lat)}, at member {leader})")
PY
