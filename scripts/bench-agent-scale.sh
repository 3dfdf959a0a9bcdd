#!/usr/bin/env bash
# Scale benchmark of `kwire agent` (issue 17): the API stand-in filled with a synthetic cluster
# (5,000 Nodes, 150,000 Pods in 500 Namespaces, 5,000 NetworkPolicies by default), the real
# release binary in a fresh network namespace with three pods wired in by the real kwire-cni;
# prints start to complete data plane, peak RSS, agent CPU per irrelevant update and per
# relevant change, relevant-change latency (p50/p99/max) and agent CPU under churn (100 Pod +
# 20 Node events/s), and the state file's writes. CPU is the agent threads' run time
# (/proc/PID/task/*/schedstat). See tests/examples/agent_scale/main.rs for what each figure
# covers. Then route programming for 5,000 peers alone, netlink beside the `ip -batch` the
# agent used before (tests/examples/route_programming.rs; on stderr with --json).
#
# Usage: sudo scripts/bench-agent-scale.sh [--nodes N] [--pods N] [--namespaces N]
#          [--policies N] [--services N] [--changes N] [--irrelevant N] [--churn-secs S]
#          [--json] [--sync-only] [--kwire PATH] [--log-level FILTER]
#   --pods        default 30 per node (this node included)
#   --services    creates Services with 10-endpoint EndpointSlices: the sync then waits for
#                 the service table too (services_ms), and service_change_cpu_ms is the agent
#                 CPU per EndpointSlice change
#   --json        one JSON object on stdout (nodes, pods, policies, sync_ms, peak_rss_mb,
#                 irrelevant_update_cpu_us, relevant_change_p99_ms, relevant_change_cpu_ms,
#                 churn_cpu_cores, and the parts behind them); progress goes to stderr
#   --sync-only   stop after the start → complete data plane figures (sync_ms and its parts,
#                 the agent's and this process's CPU meanwhile); no route programming run
#   --kwire PATH  measure another agent binary (e.g. main's, for before/after); its kwire-cni
#                 is taken from this build
# Env:   KWIRE_BENCH_PERF=FILE    also record a perf profile of the agent during one phase:
#        KWIRE_BENCH_PERF_PHASE=sync|idle|irrelevant_pods|irrelevant_nodes|relevant|churn
#          (default relevant; several separated by commas: each to FILE.<phase>),
#        KWIRE_BENCH_PERF_FREQ=HZ (default 499), KWIRE_BENCH_PERF_CALL_GRAPH=fp|dwarf
#        KWIRE_BENCH_PERF_STAT=PREFIX  instead: `perf stat --per-thread` (run time, context
#          switches, migrations; KWIRE_BENCH_PERF_STAT_EVENTS=LIST for others) of every phase,
#          to PREFIX.<phase>
#        KWIRE_BENCH_KEEP_LOG=1   keep the agent's log at $TMPDIR/kwire-agent-scale.log
# Needs root, iproute2 and /dev/net/tun. The driver's namespaces, scratch directory and agent
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

echo "== building (release): kwire, kwire-cni, examples/agent_scale, examples/route_programming" >&2
cargo build --release -q -p kwire-daemon --bin kwire && cargo build --release -q -p kwire-cni && cargo build --release -q -p kwire-tests --example agent_scale --example route_programming

target="${CARGO_TARGET_DIR:-target}"
echo "== machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$target/release/examples/agent_scale" --kwire "$target/release/kwire" --kwire-cni "$target/release/kwire-cni" "$@" &
driver_pid=$!
wait "$driver_pid"
for a in "$@"; do [ "$a" = "--sync-only" ] && exit 0; done
# Route programming alone, the agent's way (rtnetlink) beside `ip -batch` (its way before),
# interleaved in fresh namespaces. With --json, stdout holds the one JSON object only.
echo "== route programming, 5,000 peers: ip -batch vs netlink" >&2
json=0
for a in "$@"; do [ "$a" = "--json" ] && json=1; done
if [ "$json" = 1 ]; then
    "$target/release/examples/route_programming" 5000 5 >&2 &
else
    "$target/release/examples/route_programming" 5000 5 &
fi
driver_pid=$!
wait "$driver_pid"
