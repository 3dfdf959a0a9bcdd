#!/usr/bin/env bash
# profile.sh - where `kwire tunnel` spends its time: both ends of a tunnel between two
# namespaces (the benchmark harness, bench/harness/tunnel-bench.sh) recorded with perf during
# a TCP test, then one flame graph SVG and the top symbols (tools/flamegraph, inferno).
#
# USAGE (as root, from the repository root; `make profile` builds first and runs this):
#   scripts/profile.sh                      # TCP 1 stream for 10 s, target/profile/
#   TESTS="udp" DURATION=5 scripts/profile.sh
#   KWIRE=/path/to/kwire OUT=/tmp/before scripts/profile.sh   # another build, elsewhere
#
# Writes to OUT (target/profile): flamegraph.svg (open it in a browser: click to zoom),
# top.txt (samples per thread, top symbols by self samples and their shares), stacks.folded,
# perf-a.data / perf-b.data (the recordings: `perf report -i OUT/perf-b.data`) and the
# harness's results (bench.txt). CPU figures in bench.txt are perf's own, not kwire's: measure
# with scripts/bench-compare.sh, profile here.
#
# Variables: KWIRE (target/release/kwire), FLAMEGRAPH (target/release/kwire-flamegraph),
# TESTS ("tcp1"), DURATION (10), FREQ (sampling rate per CPU, 999 Hz), CALL_GRAPH (dwarf: Rust
# release builds have no frame pointers; "fp" is lighter and still right for the top
# symbols), TOP (25), OUT. Needs perf: `scripts/install-deps.sh --profile` (Debian linux-perf).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
KWIRE=$(readlink -f "${KWIRE:-target/release/kwire}")
FLAMEGRAPH=${FLAMEGRAPH:-target/release/kwire-flamegraph}
TESTS=${TESTS:-tcp1}
DURATION=${DURATION:-10}
FREQ=${FREQ:-999}
CALL_GRAPH=${CALL_GRAPH:-dwarf}
TOP=${TOP:-25}
OUT=$(mkdir -p "${OUT:-target/profile}" && readlink -f "${OUT:-target/profile}")

die() { echo "profile: $*" >&2; exit 3; }
[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, perf)"
command -v perf >/dev/null || die "perf missing: run 'scripts/install-deps.sh --profile'"
[[ -x $KWIRE ]] || die "no $KWIRE: run 'make release' (or set KWIRE)"
[[ -x $FLAMEGRAPH ]] || die "no $FLAMEGRAPH: run 'cargo build --release -p kwire-flamegraph'"
for t in wg iperf3 jq; do command -v "$t" >/dev/null || die "'$t' missing: run 'scripts/install-deps.sh'"; done

rm -f "$OUT"/perf-a.data "$OUT"/perf-b.data "$OUT"/bench.txt
# perf is the process the harness starts (and stops: on SIGTERM it stops recording and passes
# the signal on to kwire); each end writes its own recording.
echo "profile: $TESTS for ${DURATION}s, perf record -F $FREQ --call-graph $CALL_GRAPH -> $OUT" >&2
P=${NS_PREFIX:-tp}   # namespaces P-a, P-b: apart from a benchmark's (tb) running at the same time
NS_PREFIX=$P NAME=kwire DURATION=$DURATION TESTS=$TESTS RESULTS="$OUT/bench.txt" \
  bench/harness/tunnel-bench.sh \
  "perf record -q -F $FREQ --call-graph $CALL_GRAPH -o $OUT/perf-{if}.data -- $KWIRE tunnel {if}" >/dev/null
mv "$OUT/perf-${P}wa.data" "$OUT/perf-a.data"
mv "$OUT/perf-${P}wb.data" "$OUT/perf-b.data"
echo "profile: perf script (this takes a while with dwarf call graphs)" >&2
for e in a b; do perf script -i "$OUT/perf-$e.data" --no-inline 2>/dev/null; done >"$OUT/perf.txt"
"$FLAMEGRAPH" "$OUT/perf.txt" --svg "$OUT/flamegraph.svg" --folded "$OUT/stacks.folded" \
  --top "$TOP" --title "kwire tunnel, both ends, $TESTS" | tee "$OUT/top.txt"
rm -f "$OUT/perf.txt"
