#!/usr/bin/env bash
# bench-service-iperf.sh - what a ClusterIP costs on the packet path: iperf3 TCP from a pod on
# node 1 to a pod on node 2 of a release-built lab, alternating runs to the pod's IP directly
# and to a ClusterIP whose only endpoint is that pod (the loop translates every packet of the
# flow both ways). Prints every run, the medians and their ratio (issue 11's goal: >= 0.95).
# Removes its lab on exit. Needs root, iperf3, jq, kubectl.
#   ROUNDS=5 DURATION=5 scripts/bench-service-iperf.sh
set -Eeuo pipefail
LAB=${LAB:-kwsvcbench}
source "$(dirname "$0")/lib/iperf-lab.sh"
SVC=$(mktemp); CLEANUP_FILES+=("$SVC")
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
iperf_gbps "$VIP" >/dev/null  # the ClusterIP answers (fails the script otherwise); warms both paths
direct=(); service=()
for r in $(seq "$ROUNDS"); do
  direct+=("$(iperf_gbps "$SRV_IP")")
  service+=("$(iperf_gbps "$VIP")")
  printf 'round %d: pod IP %s %.3f Gbit/s, ClusterIP %s %.3f Gbit/s\n' "$r" "$SRV_IP" "${direct[-1]}" "$VIP" "${service[-1]}"
done
a=$(median "${direct[@]}"); b=$(median "${service[@]}")
printf 'median: pod IP %.3f Gbit/s, ClusterIP %.3f Gbit/s, ratio %.3f (load %s)\n' "$a" "$b" "$(awk "BEGIN{print $b/$a}")" "$(cut -d' ' -f1-3 /proc/loadavg)"
