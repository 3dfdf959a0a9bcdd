#!/usr/bin/env bash
# bench-policy-overhead.sh - what NetworkPolicy costs on the packet path: iperf3 TCP between
# two pods on different nodes of a release-built lab, alternating runs without any policy
# and with a default-deny-ingress policy plus an allow for the client. Prints every run, the
# medians and their ratio. Removes its lab on exit. Needs root, iperf3, jq, kubectl.
#   ROUNDS=5 DURATION=5 scripts/bench-policy-overhead.sh
set -Eeuo pipefail
LAB=${LAB:-kwpolbench}
source "$(dirname "$0")/lib/iperf-lab.sh"
POLICY=$(mktemp); CLEANUP_FILES+=("$POLICY")
$KC label pod pod-1-1 role=cli >/dev/null; $KC label pod pod-2-1 role=srv >/dev/null
cat >"$POLICY" <<'YAML'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: default}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: srv-from-cli, namespace: default}
spec:
  podSelector: {matchLabels: {role: srv}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: cli}}}]
      ports: [{port: 5201, protocol: TCP}]
YAML
ip netns exec "$SRV_NS" iperf3 -s -D
sleep 0.5
enforced() { # the policy is in force: another pod no longer reaches the server pod's port 80
  ! "$BIN/kwire-lab" probe --name "$LAB" default/pod-1-2 "default/pod-2-1:80/TCP" >/dev/null 2>&1
}
without=(); with=()
for r in $(seq "$ROUNDS"); do
  without+=("$(iperf_gbps "$SRV_IP")")
  lab apply -f "$POLICY" >/dev/null
  for _ in $(seq 50); do enforced && break; sleep 0.1; done
  enforced || { echo "policy not in force" >&2; exit 1; }
  with+=("$(iperf_gbps "$SRV_IP")")
  lab delete -f "$POLICY" >/dev/null
  for _ in $(seq 50); do enforced || break; sleep 0.1; done
  printf 'round %d: no policy %.3f Gbit/s, default-deny + allow %.3f Gbit/s\n' "$r" "${without[-1]}" "${with[-1]}"
done
a=$(median "${without[@]}"); b=$(median "${with[@]}")
printf 'median: no policy %.3f Gbit/s, with policy %.3f Gbit/s, ratio %.3f (load %s)\n' "$a" "$b" "$(awk "BEGIN{print $b/$a}")" "$(cut -d' ' -f1-3 /proc/loadavg)"
