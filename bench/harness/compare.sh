#!/usr/bin/env bash
# compare.sh - run tunnel-bench.sh for several implementations in interleaved rounds.
#
# USAGE
#   KWIRE=target/release/kwire ROUNDS=3 bench/harness/compare.sh
#       raw veth, wireguard-go, boringtun-cli and `kwire tunnel`, then the summary with ratios
#   KWIRE=target/release/kwire KWIRE_BEFORE=/path/to/older/kwire ROUNDS=3 bench/harness/compare.sh
#       the same with "kwire-before" in every round too, and the ratio kwire/kwire-before
#   IMPLS=$'raw=raw\nwireguard-go=wireguard-go -f {if}\nours=/path/to/ourd --foreground {if}' ./compare.sh
#
# IMPLS: one "NAME=TEMPLATE" per line (TEMPLATE as for tunnel-bench.sh; "raw" = no tunnel).
# Each round runs every implementation once; the starting implementation rotates every round
# (round 1: A B C, round 2: B C A, ...) so no implementation always runs first/last.
# ORDER=fixed keeps A B C in every round. Other tunnel-bench.sh variables (DURATION, TESTS, ...)
# pass through. A failed run is recorded as "info=run_failed" and the matrix continues.
# QUIET_MAX=0.25 QUIET_TIMEOUT=600: before each run wait (up to QUIET_TIMEOUT s) until the machine is
# quiet (< QUIET_MAX busy cores over 2 s), since other tenants share the 2 cores; the wait is recorded
# as info=quiet_wait_s and the harness records <test>_foreign_cores for every test anyway.
# Then summarize: python3 summarize.py RESULTS --ratio wireguard-go/raw --ratio boringtun-cli/wireguard-go
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-3}
ORDER=${ORDER:-rotate}
PAUSE=${PAUSE:-3}
RESULTS=${RESULTS:-$HERE/results/results-$(date +%Y%m%d-%H%M%S).txt}
DEFAULT_IMPLS='raw=raw
wireguard-go=wireguard-go -f {if}
boringtun-cli=boringtun-cli --foreground --disable-drop-privileges {if}'
if [[ -n ${KWIRE_BEFORE:-} ]]; then  # an older kwire build, compared within each round
  KWIRE_BEFORE=$(readlink -f "$KWIRE_BEFORE")
  DEFAULT_IMPLS+=$'\n'"kwire-before=$KWIRE_BEFORE tunnel {if}"
fi
if [[ -n ${KWIRE:-} ]]; then
  KWIRE=$(readlink -f "$KWIRE")
  DEFAULT_IMPLS+=$'\n'"kwire=$KWIRE tunnel {if}"
fi
IMPLS=${IMPLS:-$DEFAULT_IMPLS}
QUIET_MAX=${QUIET_MAX:-0.25}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-600}
mkdir -p "$(dirname "$RESULTS")"
busy_cores() { # whole-machine busy cores over $1 seconds
  local a b; read -r _ u n s i w q sq st _r </proc/stat; a="$((u+n+s+q+sq+st)) $((u+n+s+i+w+q+sq+st))"
  sleep "$1"; read -r _ u n s i w q sq st _r </proc/stat; b="$((u+n+s+q+sq+st)) $((u+n+s+i+w+q+sq+st))"
  set -- $a $b; awk "BEGIN{printf \"%.3f\", ($3-$1)/($4-$2)*$(nproc)}"
}
wait_quiet() { # wait_quiet NAME ROUND
  local t0=$SECONDS b
  while :; do
    b=$(busy_cores 2)
    awk "BEGIN{exit !($b < $QUIET_MAX)}" && break
    ((SECONDS - t0 >= QUIET_TIMEOUT)) && { echo "still busy ($b cores) after ${QUIET_TIMEOUT}s - running anyway" >&2; break; }
    echo "  machine busy ($b cores), waiting..." >&2; sleep 8
  done
  echo "impl=$1 round=$2 info=quiet_wait_s value=$((SECONDS - t0)),busy=$b" >>"$RESULTS"
}
mapfile -t LINES < <(printf '%s\n' "$IMPLS" | sed '/^[[:space:]]*$/d')
n=${#LINES[@]}
echo "results -> $RESULTS ($ROUNDS rounds x $n impls)" >&2
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < n; k++)); do
    idx=$k; [[ $ORDER == rotate ]] && idx=$(((k + r - 1) % n))
    line=${LINES[$idx]}; name=${line%%=*}; tmpl=${line#*=}
    echo "=== round $r: $name" >&2
    wait_quiet "$name" "$r"
    NAME=$name ROUND=$r RESULTS=$RESULTS "$HERE/tunnel-bench.sh" "$tmpl" >/dev/null
    rc=$?
    if ((rc == 4)); then  # namespace/socket busy: retry once after a pause
      echo "  setup conflict (rc 4), retrying in 20 s" >&2; sleep 20
      NAME=$name ROUND=$r RESULTS=$RESULTS "$HERE/tunnel-bench.sh" "$tmpl" >/dev/null
      rc=$?
    fi
    ((rc == 0)) || echo "impl=$name round=$r info=run_failed value=$rc" | tee -a "$RESULTS" >&2
    sleep "$PAUSE"
  done
done
echo "done: $RESULTS" >&2
ratios=()
for other in kwire-before wireguard-go boringtun-cli raw; do
  grep -q "impl=$other " "$RESULTS" && grep -q "impl=kwire " "$RESULTS" && ratios+=(--ratio "kwire/$other")
done
grep -q "impl=wireguard-go " "$RESULTS" && grep -q "impl=raw " "$RESULTS" && ratios+=(--ratio wireguard-go/raw)
python3 "$HERE/summarize.py" "$RESULTS" "${ratios[@]}" \
  --metrics ping_avg_ms,ping_p99_ms,tcp1_gbps,tcp4_gbps,udp_recv_gbps,udp_recv_kpps,udp_lossfree_gbps,udp64_recv_kpps,tcp1_impl_cores,tcp1_impl_cpu_s_per_gb,tcp4_impl_cpu_s_per_gb,udp_impl_cpu_s_per_gb,tcp1_foreign_cores
