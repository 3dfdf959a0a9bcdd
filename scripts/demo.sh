#!/usr/bin/env bash
# demo.sh - kwire's main job on one machine: a 3-node cluster in network namespaces (kwire-lab),
# each node running the real `kwire agent` against a Kubernetes API stand-in, with 2 pods per
# node wired by the real kwire-cni; shows the mesh, pods reaching each other across nodes
# over IPv4 and IPv6, what the underlay carries (only WireGuard UDP), a NetworkPolicy taking
# effect, a Service answering from pods on every node (the answer names its backend) and by
# its cluster DNS name, and a node's status and metrics. Leaves the lab up for you to explore; remove it with
# `target/release/kwire-lab down`. Needs root and scripts/install-deps.sh.
set -Eeuo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$HERE/target/release}
[[ -x $BIN/kwire-lab ]] || BIN=$HERE/target/debug
[[ -x $BIN/kwire-lab && -x $BIN/kwire ]] || { echo "demo: build first: cargo build --release" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "demo: needs root (network namespaces, tun)" >&2; exit 1; }
LAB=${LAB:-kwire}
lab() { local sub=$1; shift; "$BIN/kwire-lab" "$sub" --name "$LAB" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a fresh lab '$LAB': 3 nodes, an underlay bridge, the API stand-in, one kwire agent per node, cluster DNS"
lab down >/dev/null 2>&1 || true
lab up --kwire "$BIN/kwire" --dns

step "the mesh"
lab status
J=$(lab status --json)
IF1=$(jq -r '.nodes[0].interface' <<<"$J")
BR=$(jq -r '.bridge' <<<"$J"); UL=$(jq -r '.underlay_netns' <<<"$J")

step "node 1 reaches every other node's pod gateway through the tunnels (IPv4, IPv6), while tcpdump watches the underlay"
ip netns exec "$UL" timeout 6 tcpdump -i "$BR" -nn -w /tmp/kwire-demo.pcap 'not arp and not tcp port 6443 and not ip multicast and not (ip6 and (icmp6 or multicast))' >/dev/null 2>&1 &
TD=$!
sleep 1
for gw in $(jq -r '.nodes[1:][] | .gateway_ips[]' <<<"$J"); do
  printf '%-28s ' "ping $gw:"; lab exec 1 -- ping -c 2 -i 0.2 -W 2 -q "$gw" | grep -o '[0-9]* received'
done
wait "$TD" 2>/dev/null || true
echo "what the underlay carried:"
tcpdump -r /tmp/kwire-demo.pcap -nn 2>/dev/null | awk '{print $3, $4, $5, $6}' | sed -E 's/\.[0-9]+( |:|$)/\1/g' | sort | uniq -c | sort -rn | head -8
rm -f /tmp/kwire-demo.pcap

step "pods: every pod reaches every other pod (TCP port 80), then a NetworkPolicy isolates pod-1-1"
mapfile -t PODS < <(jq -r '.pods[] | select(.namespace == "default") | "default/\(.name)"' <<<"$J")
lab matrix --port 80/TCP "${PODS[@]}"
KC="kubectl --kubeconfig $("$BIN/kwire-lab" kubeconfig --name "$LAB")"
$KC label pod pod-1-1 role=db >/dev/null
$KC label pod pod-2-1 pod-2-2 role=web >/dev/null 2>&1 || { $KC label pod pod-2-1 role=web >/dev/null; $KC label pod pod-2-2 role=web >/dev/null; }
cat >/tmp/kwire-demo-policy.yaml <<'YAML'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: web}}}]
YAML
echo "policy: pods labelled role=db (pod-1-1) accept only pods labelled role=web (pod-2-*)"
lab apply -f /tmp/kwire-demo-policy.yaml
sleep 1
lab matrix --port 80/TCP "${PODS[@]}"
lab delete -f /tmp/kwire-demo-policy.yaml >/dev/null
rm -f /tmp/kwire-demo-policy.yaml

step "a Service: ClusterIP web in front of pod-2-1 (node 2) and pod-3-1 (node 3), no kube-proxy"
$KC label pod pod-2-1 pod-3-1 svc=web >/dev/null 2>&1 || { $KC label pod pod-2-1 svc=web >/dev/null; $KC label pod pod-3-1 svc=web >/dev/null; }
cat >/tmp/kwire-demo-service.yaml <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {svc: web}
  ports: [{port: 80}]
YAML
lab apply -f /tmp/kwire-demo-service.yaml
rm -f /tmp/kwire-demo-service.yaml
for _ in $(seq 1 100); do  # the lab's EndpointSlice controller lists both pods (10 s at most)
  [[ $(lab status --json | jq '[.services[] | select(.name == "web") | .endpoints[]] | length') == 2 ]] && break
  sleep 0.1
done
VIP=$(lab status --json | jq -r '.services[] | select(.name == "web") | .cluster_ips[0]')
echo "web: ClusterIP $VIP, endpoints $(lab status --json | jq -r '[.services[] | select(.name == "web") | .endpoints[]] | join(", ")')"
echo "each new connection is one flow; Maglev picks its backend (the same on every node); the answer is the backend's name:"
for from in default/pod-1-1 default/pod-2-2 default/pod-3-2; do
  for _ in 1 2 3; do
    printf '%-18s -> %-16s ' "$from" "$VIP:80"
    lab probe "$from" "$VIP:80" | sed -E 's/.*answer "([^"]*)".*/answered by \1/'
  done
done
echo "by name, through the cluster DNS (kube-system/kube-dns at 10.96.0.10, itself a ClusterIP):"
lab exec default/pod-1-1 -- getent hosts web.default.svc.cluster.local
printf 'default/pod-1-1 -> web:80 (search path)  answered by '
lab exec default/pod-1-1 -- socat -T 3 -u TCP:web:80 STDOUT

step "kwire status on node 1: peers by node name, its pods, its service table"
lab exec 1 -- "$BIN/kwire" status --run-dir "$(jq -r '.nodes[0].run_dir' <<<"$J")" || true

step "wg show on node 1 (wireguard-tools talks to kwire's userspace API)"
lab exec 1 -- wg show "$IF1"

step "node 1's metrics (peers labelled by node name)"
lab exec 1 -- curl -s http://127.0.0.1:9742/metrics | grep -E '^kwire_(peer_up|peer_last_handshake_age_seconds|peers_expected|peers_connected|service_)'

echo
echo "The lab stays up: \`$BIN/kwire-lab status\`, \`$BIN/kwire-lab exec 1 -- CMD\`,"
echo "\`kubectl --kubeconfig \$($BIN/kwire-lab kubeconfig) get nodes\`; remove it with \`$BIN/kwire-lab down\`."
