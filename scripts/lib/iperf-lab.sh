# iperf-lab.sh - sourced by the iperf benches (bench-policy-overhead.sh, bench-service-iperf.sh):
# checks root and the release binaries, brings up a two-node release-built lab named $LAB
# (removed on exit, with the files listed in $CLEANUP_FILES), and defines:
#   lab SUB ARGS...    kwire-lab SUB --name $LAB ARGS...
#   KC                 kubectl with the lab's kubeconfig
#   CLI_NS SRV_NS SRV_IP   the client pod (pod-1-1) and server pod (pod-2-1, node 2)
#   iperf_gbps DST     one iperf3 run's Gbit/s to DST (retried three times when iperf3 fails)
#   median N...        the median of its arguments
# Variables: BIN (target/release), ROUNDS (5), DURATION (5 s per run).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${BIN:-$HERE/target/release}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CLEANUP_FILES=()
[[ $(id -u) -eq 0 ]] || { echo "needs root" >&2; exit 1; }
[[ -x $BIN/kwire-lab && -x $BIN/kwire ]] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
lab() { local sub=$1; shift; "$BIN/kwire-lab" "$sub" --name "$LAB" "$@"; }
cleanup() { set +e; lab down >/dev/null 2>&1; rm -f "${CLEANUP_FILES[@]}"; }
trap cleanup EXIT
lab down >/dev/null 2>&1 || true
lab up --nodes 2 --kwire "$BIN/kwire" >/dev/null
J=$(lab status --json)
pod() { jq -r --arg n "$1" ".pods[] | select(.name==\$n) | .$2" <<<"$J"; }
CLI_NS=$(pod pod-1-1 netns); SRV_NS=$(pod pod-2-1 netns); SRV_IP=$(pod pod-2-1 'ips[0]')
KC="kubectl --kubeconfig $("$BIN/kwire-lab" kubeconfig --name "$LAB")"

# One run's Gbit/s; a run iperf3 reports as failed (e.g. "the server is busy" while it winds
# down the previous one) is said on stderr and run again, three times at most.
iperf_gbps() {
  local out
  for _ in 1 2 3; do
    out=$(ip netns exec "$CLI_NS" iperf3 -c "$1" -t "$DURATION" -J || true)
    if jq -e '.error == null and .end.sum_received.bits_per_second != null' >/dev/null 2>&1 <<<"$out"; then
      jq '.end.sum_received.bits_per_second/1e9' <<<"$out"
      return
    fi
    echo "iperf3 to $1: $(jq -r '.error // "no result"' <<<"$out" 2>/dev/null || echo "no JSON"); again" >&2
    sleep 1
  done
  echo "iperf3 to $1 failed three times" >&2
  return 1
}

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print (NR%2)? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
