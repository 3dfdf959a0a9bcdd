#!/usr/bin/env bash
# bench-compare.sh - `kwire tunnel` side by side with raw veth, wireguard-go and boringtun-cli,
# through the benchmark harness in bench/harness/ (compare.sh), results kept in bench/results/.
#
# The exact command it runs, from the repository root (as root, after
# `cargo build --release -p kwire-daemon` and `scripts/install-deps.sh --bench`):
#
#   PATH="$HOME/.cargo/bin:$PATH" KWIRE=target/release/kwire ROUNDS=5 DURATION=10 \
#     RESULTS=bench/results/results-$(date +%Y%m%d-%H%M%S).txt bench/harness/compare.sh
#
# Overridable: ROUNDS (5), DURATION (10 s per test), KWIRE (target/release/kwire), RESULTS,
# BENCH_DIR (bench/harness), and anything compare.sh / tunnel-bench.sh read (TESTS, IMPLS,
# QUIET_MAX, ...). Quick look: ROUNDS=3 DURATION=5 scripts/bench-compare.sh (≈ 6 min);
# 4 implementations x 5 rounds x 10 s ≈ 18 min. Summary again later:
#   python3 bench/harness/summarize.py bench/results/FILE --ratio kwire/wireguard-go
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BENCH_DIR=${BENCH_DIR:-$ROOT/bench/harness}
export KWIRE=${KWIRE:-target/release/kwire}
export ROUNDS=${ROUNDS:-5}
export DURATION=${DURATION:-10}
export RESULTS=${RESULTS:-bench/results/results-$(date +%Y%m%d-%H%M%S).txt}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

die() { echo "bench-compare: $*" >&2; exit 3; }
[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces)"
[[ -x $BENCH_DIR/compare.sh ]] || die "no $BENCH_DIR/compare.sh (set BENCH_DIR)"
[[ -x $KWIRE ]] || die "no $KWIRE: run 'cargo build --release -p kwire-daemon' first (or set KWIRE)"
for t in wireguard-go boringtun-cli wg iperf3 jq; do
  command -v "$t" >/dev/null || die "'$t' missing: run 'scripts/install-deps.sh --bench' first"
done
mkdir -p "$(dirname "$RESULTS")"
echo "bench-compare: $ROUNDS rounds x ${DURATION}s, kwire=$KWIRE -> $RESULTS" >&2
exec "$BENCH_DIR/compare.sh"
