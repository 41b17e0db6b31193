#!/usr/bin/env bash
# Summarises one `perf record` file (bench/run.sh calls it):
#   bench/profile-summary.sh perf.data
# CPU by thread, self time by component (classes of symbol names: no call
# stacks needed, so truncated stacks do not skew it), the top symbols, and
# the top symbols including their callees (a lower bound: deep async stacks
# are cut off by perf's stack copy).
set -euo pipefail
data=$1

echo "== CPU by thread"
perf report -i "$data" --stdio --no-children --sort comm -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -8

echo "== self time by component"
perf report -i "$data" --stdio --no-children --sort dso,sym -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | awk '
  {
    pct = $1; sub(/%/, "", pct); dso = $2; kind = $3
    sym = $0; sub(/^ *[0-9.]+% +[^ ]+ +\[[^]]*\] +/, "", sym)
    sub(/^core::ptr::drop_in_place</, "", sym); sub(/^</, "", sym); sub(/^&(mut )?/, "", sym)
    c = "other"
    if (kind == "[k]") {
      if (sym ~ /futex|wake|schedule|task_switch|_raw_spin|enqueue|dequeue|update_curr|pick_next|select_task|ttwu|switch_mm|__switch_to|psi_|cpuacct|rseq/) c = "kernel: scheduling, thread wake-ups"
      else if (sym ~ /tcp|^ip_|__ip|__dev|skb|net_|sock|napi|loopback|inet|netif|__sys_send|__sys_recv|epoll|ep_/) c = "kernel: loopback TCP, epoll"
      else if (sym ~ /ext4|jbd2|filemap|folio|iomap|blk|nvme|virtio|vfs|generic_perform|page_cache|fdatasync|fsync|_copy_from_iter|_copy_to_iter|copy_page|xas_|mark_buffer|__block|fdget|fput/) c = "kernel: files and disk"
      else if (sym ~ /syscall|entry_SYSCALL|irqentry|exit_to_user|__x64_sys|do_sys/) c = "kernel: syscall entry and exit"
      else c = "kernel: other"
    }
    else if (sym ~ /^0x[0-9a-f]+$/) c = "unresolved (stripped binary)"
    else if (sym ~ /^(sqlite3|pager|btree|vdbe|getPage|pcache|walIndex|wal[A-Z])/ || (dso == "gateway" && sym !~ /::/ && sym !~ /^_/)) c = "SQLite engine"
    else if (sym ~ /^(sqlx|flume)/) c = "sqlx driver and its channels"
    else if (sym ~ /^(hyper|axum|http::|tower|httparse|h2::)/) c = "HTTP (hyper, axum, tower)"
    else if (sym ~ /^(tokio|mio)/) c = "tokio runtime"
    else if (sym ~ /^coordinator::raft/) c = "Raft core"
    else if (sym ~ /^coordinator::storage|crc32c/) c = "Raft log storage"
    else if (sym ~ /^coordinator::transport|^postcard|^hmac|^sha2/) c = "peer transport"
    else if (sym ~ /^coordinator/) c = "Raft node driver"
    else if (sym ~ /^gateway::mqtt/) c = "gateway MQTT glue"
    else if (sym ~ /^gateway/) c = "gateway API, state, apply"
    else if (sym ~ /^rumqttd/) c = "rumqttd broker"
    else if (sym ~ /serde_json|serde_core|^serde::|serde_path_to_error/) c = "JSON (serde)"
    else if (sym ~ /^tracing|^nu_ansi_term|^core::fmt/) c = "tracing and formatting"
    else if (sym ~ /malloc|free|^_int_|realloc|unlink_chunk|consolidate|tcache|^alloc::alloc/) c = "memory allocator"
    else if (sym ~ /memmove|memcpy|memset|memcmp|strlen|strcmp|__memchr/) c = "libc string and memory ops"
    else if (sym ~ /parking_lot|std::sys::sync|std::sys::pal::unix::futex|pthread_mutex|pthread_cond|__lll|^syscall$|std::thread/) c = "locks, thread parking (user side)"
    else if (sym ~ /^alloc::collections|hashbrown|foldhash|^alloc::vec|^alloc::string|^core::str/) c = "Rust collections and strings"
    else if (sym ~ /clock_gettime|Instant>::now|Instant::now/) c = "clocks"
    else if (sym ~ /^futures_util|^futures_core|^S as futures_core|^F as axum/) c = "futures combinators"
    else if (sym ~ /^(runtime\.|syscall\.|sync\.|net\/|net\.|internal\/|crypto\/|encoding\/|reflect\.|google\.golang|github\.com|go\.etcd\.io|go\.uber\.org)/) c = "Go (resolved)"
    else if (sym ~ /^(pthread|__GI|__libc|epoll)/) c = "libc threads and syscalls"
    else if (dso ~ /mosquitto/) c = "Mosquitto"
    total[c] += pct
  }
  END { for (c in total) printf "%7.2f%%  %s\n", total[c], c }' | sort -rn | head -26

echo "== top symbols, self time"
perf report -i "$data" --stdio --no-children --sort dso,sym -g none --percent-limit 0.8 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | grep -vE '\] 0x[0-9a-f]+$' | head -25 | cut -c1-160

echo "== top symbols including callees (runtime scaffolding left out)"
perf report -i "$data" --stdio --children --sort sym -g none --percent-limit 3 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | grep -v '(inlined)' \
  | grep -vE 'catch_unwind|call_once|poll_future|Core<T,S>::poll|Harness|thread_start|clone3|start_thread|0xffffffffffffffff|backtrace|vtable|tokio::runtime::(context|task|scheduler)|MapIntoResponseFuture|future::map::Map|RouteFuture|Oneshot|PollFn|entry_SYSCALL|do_syscall_64|blocking::pool' \
  | grep -vE '\] 0x[0-9a-f]+$' | head -30 | cut -c1-170
