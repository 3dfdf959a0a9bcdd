#!/usr/bin/env bash
# bench-compare.sh - `kwire tunnel` side by side with raw veth, wireguard-go, boringtun-cli and
# (KWIRE_BEFORE) an older kwire build, through the benchmark harness in bench/harness/
# (compare.sh), interleaved in the same rounds; results kept in bench/results/.
#
# The exact command it runs, from the repository root (as root, after
# `cargo build --release -p kwire-daemon` and `scripts/install-deps.sh --bench`):
#
#   PATH="$HOME/.cargo/bin:$PATH" KWIRE=target/release/kwire ROUNDS=5 DURATION=10 \
#     TESTS="ping tcp1 tcp4 udp udp@250M udp@500M udp@1G udp@2G udp64" \
#     RESULTS=bench/results/results-$(date +%Y%m%d-%H%M%S).txt bench/harness/compare.sh
#
# The tests: ping; TCP 1 and 4 streams; UDP 1400-byte packets unpaced (received kpps); the
# same paced at 0.25, 0.5, 1 and 2 Gbit/s offered (udp_lossfree_gbps: the highest with < 0.1% loss);
# 64-byte packets unpaced (udp64_recv_kpps).
#
# Overridable: ROUNDS (5), DURATION (10 s per test), KWIRE (target/release/kwire), RESULTS,
# TESTS (above), BENCH_DIR (bench/harness), and anything compare.sh / tunnel-bench.sh read
# (QUIET_MAX, QUIET_TIMEOUT, ...). The implementations:
#   KWIRE_BEFORE=/path/to/kwire   also that kwire build, as "kwire-before", in every round,
#                                 with the ratio kwire/kwire-before (a change's before/after)
#   ANCHORS=0                     only the kwire builds (no raw veth, wireguard-go, boringtun-cli)
#   EXTRA_IMPLS='NAME=TEMPLATE'   more implementations (lines; see bench/harness/compare.sh)
#   IMPLS=...                     the whole list, as compare.sh takes it (the above ignored)
# wireguard-go and boringtun-cli are left out, with a warning, when not installed.
# Quick look: ROUNDS=3 DURATION=5 scripts/bench-compare.sh. Summary again later:
#   python3 bench/harness/summarize.py bench/results/FILE --ratio kwire/kwire-before
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BENCH_DIR=${BENCH_DIR:-$ROOT/bench/harness}
export KWIRE=${KWIRE:-target/release/kwire}
export ROUNDS=${ROUNDS:-5}
export DURATION=${DURATION:-10}
export TESTS=${TESTS:-ping tcp1 tcp4 udp udp@250M udp@500M udp@1G udp@2G udp64}
export RESULTS=${RESULTS:-bench/results/results-$(date +%Y%m%d-%H%M%S).txt}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

die() { echo "bench-compare: $*" >&2; exit 3; }
[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces)"
[[ -x $BENCH_DIR/compare.sh ]] || die "no $BENCH_DIR/compare.sh (set BENCH_DIR)"
[[ -x $KWIRE ]] || die "no $KWIRE: run 'cargo build --release -p kwire-daemon' first (or set KWIRE)"
for t in wg iperf3 jq; do
  command -v "$t" >/dev/null || die "'$t' missing: run 'scripts/install-deps.sh' first"
done
if [[ -z ${IMPLS:-} ]]; then
  IMPLS=
  if [[ ${ANCHORS:-1} != 0 ]]; then
    IMPLS='raw=raw'
    if command -v wireguard-go >/dev/null; then IMPLS+=$'\n''wireguard-go=wireguard-go -f {if}'
    else echo "bench-compare: wireguard-go not installed, left out (scripts/install-deps.sh)" >&2; fi
    if command -v boringtun-cli >/dev/null; then
      IMPLS+=$'\n''boringtun-cli=boringtun-cli --foreground --disable-drop-privileges {if}'
    else echo "bench-compare: boringtun-cli not installed, left out (scripts/install-deps.sh --bench)" >&2; fi
  fi
  if [[ -n ${KWIRE_BEFORE:-} ]]; then
    [[ -x $KWIRE_BEFORE ]] || die "KWIRE_BEFORE=$KWIRE_BEFORE is not an executable"
    IMPLS+=$'\n'"kwire-before=$(readlink -f "$KWIRE_BEFORE") tunnel {if}"
  fi
  IMPLS+=$'\n'"kwire=$(readlink -f "$KWIRE") tunnel {if}"
  [[ -z ${EXTRA_IMPLS:-} ]] || IMPLS+=$'\n'"$EXTRA_IMPLS"
fi
export IMPLS
mkdir -p "$(dirname "$RESULTS")"
echo "bench-compare: $ROUNDS rounds x ${DURATION}s, tests: $TESTS -> $RESULTS" >&2
printf '%s\n' "$IMPLS" | sed '/^[[:space:]]*$/d; s/^/  /' >&2
exec "$BENCH_DIR/compare.sh"
