#!/usr/bin/env bash
# Scale benchmark of `kwire agent`: the API stand-in filled with 5,000 Nodes, the real release
# binary in a fresh network namespace; prints the time from start to every peer in the device
# and every route in the kernel, peak RSS, and p50/p99/max latency from a Node change to its
# effect in the data plane (with the load average beside the figures); then route programming
# for 5,000 peers alone, netlink beside the `ip -batch` the agent used before.
#
# Usage: sudo scripts/bench-agent-scale.sh [--nodes N] [--changes M] [--log-level FILTER]
# Env:   KWIRE_BENCH_PERF=FILE    also record a perf profile of the agent during the changes
#        KWIRE_BENCH_KEEP_LOG=1   keep the agent's log at $TMPDIR/kwire-agent-scale.log
# Needs root, iproute2 and /dev/net/tun. The driver's namespace, scratch directory and agent
# are RAII guards; the trap below also removes what a killed run left behind.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench-agent-scale: needs root (network namespace, tun)" >&2
    exit 1
fi

driver_pid=""
# kwire-tests names namespaces kwt-<pid in base 36, 5 digits>...: find this run's driver's.
base36() {
    local n=$1 digits=0123456789abcdefghijklmnopqrstuvwxyz out=""
    for _ in 1 2 3 4 5; do
        out="${digits:$((n % 36)):1}$out"
        n=$((n / 36))
    done
    echo "$out"
}
cleanup() {
    [ -n "$driver_pid" ] || return 0
    if kill -0 "$driver_pid" 2>/dev/null; then
        kill -TERM "$driver_pid" 2>/dev/null || true
        wait "$driver_pid" 2>/dev/null || true
    fi
    # A driver killed by a signal runs no destructors: stop its agent, delete its namespace.
    local prefix
    prefix="kwt-$(base36 "$driver_pid")"
    for ns in $(ip netns list 2>/dev/null | awk -v p="$prefix" 'index($1, p) == 1 {print $1}'); do
        for p in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$p" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM

echo "== building (release): kwire, examples/agent_scale" >&2
cargo build --release -q -p kwire-daemon --bin kwire && cargo build --release -q -p kwire-tests --example agent_scale --example route_programming

target="${CARGO_TARGET_DIR:-target}"
echo "== machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$target/release/examples/agent_scale" --kwire "$target/release/kwire" "$@" &
driver_pid=$!
wait "$driver_pid"
# Route programming alone, the agent's way (rtnetlink) beside `ip -batch` (its way before),
# interleaved in fresh namespaces.
echo "== route programming, 5,000 peers: ip -batch vs netlink" >&2
"$target/release/examples/route_programming" 5000 5 &
driver_pid=$!
wait "$driver_pid"
