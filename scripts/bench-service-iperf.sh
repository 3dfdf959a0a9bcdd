#!/usr/bin/env bash
# bench-service-iperf.sh - what a ClusterIP costs on the packet path: iperf3 TCP from a pod on
# node 1 to a pod on node 2 of a release-built lab, alternating runs to the pod's IP directly
# and to a ClusterIP whose only endpoint is that pod (the loop translates every packet of the
# flow both ways). Prints every run, the medians and their ratio (issue 11's goal: >= 0.95).
# Removes its lab on exit. Needs root, iperf3, jq, kubectl.
#   ROUNDS=5 DURATION=5 scripts/bench-service-iperf.sh
set -Eeuo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$HERE/target/release}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
LAB=${LAB:-kwsvcbench}
[[ $(id -u) -eq 0 ]] || { echo "needs root" >&2; exit 1; }
[[ -x $BIN/kwire-lab && -x $BIN/kwire ]] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
lab() { local sub=$1; shift; "$BIN/kwire-lab" "$sub" --name "$LAB" "$@"; }
SVC=$(mktemp)
cleanup() { set +e; lab down >/dev/null 2>&1; rm -f "$SVC"; }
trap cleanup EXIT
lab down >/dev/null 2>&1 || true
lab up --nodes 2 --kwire "$BIN/kwire" >/dev/null
J=$(lab status --json)
pod() { jq -r --arg n "$1" ".pods[] | select(.name==\$n) | .$2" <<<"$J"; }
CLI_NS=$(pod pod-1-1 netns); SRV_NS=$(pod pod-2-1 netns); SRV_IP=$(pod pod-2-1 'ips[0]')
KC="kubectl --kubeconfig $("$BIN/kwire-lab" kubeconfig --name "$LAB")"
$KC label pod pod-2-1 bench=iperf >/dev/null
cat >"$SVC" <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: default}
spec:
  selector: {bench: iperf}
  ports: [{port: 5201}]
YAML
lab apply -f "$SVC" >/dev/null
for _ in $(seq 100); do  # the slice lists the server pod (10 s at most)
  [[ $(lab status --json | jq '[.services[] | select(.name == "iperf") | .endpoints[]] | length') == 1 ]] && break
  sleep 0.1
done
VIP=$(lab status --json | jq -r '.services[] | select(.name == "iperf") | .cluster_ips[0]')
ip netns exec "$SRV_NS" iperf3 -s -D
sleep 0.5
# One run's Gbit/s; a run iperf3 reports as failed (e.g. "the server is busy" while it winds
# down the previous one) is said on stderr and run again, three times at most.
run() {
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
run "$VIP" >/dev/null  # the ClusterIP answers (fails the script otherwise); warms both paths
direct=(); service=()
for r in $(seq "$ROUNDS"); do
  direct+=("$(run "$SRV_IP")")
  service+=("$(run "$VIP")")
  printf 'round %d: pod IP %s %.3f Gbit/s, ClusterIP %s %.3f Gbit/s\n' "$r" "$SRV_IP" "${direct[-1]}" "$VIP" "${service[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print (NR%2)? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
a=$(median "${direct[@]}"); b=$(median "${service[@]}")
printf 'median: pod IP %.3f Gbit/s, ClusterIP %.3f Gbit/s, ratio %.3f (load %s)\n' "$a" "$b" "$(awk "BEGIN{print $b/$a}")" "$(cut -d' ' -f1-3 /proc/loadavg)"
