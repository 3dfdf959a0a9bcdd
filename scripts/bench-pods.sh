#!/usr/bin/env bash
# bench-pods.sh - pod to pod through a release-built lab beside `kwire tunnel` between two
# namespaces, interleaved in the same rounds: iperf3 TCP (1 stream) from a pod on node 1 to a
# pod on node 2 (through both nodes' kwire agents: CNI tuns, policy, WireGuard), from a pod
# to another pod on the same node (no encryption: one agent, two pod tuns), and the harness's
# tunnel test (bench/harness/tunnel-bench.sh, TESTS=tcp1). Prints every round, the medians
# and the within-round ratio cross-node pods / tunnel. Removes its lab on exit.
#   ROUNDS=5 DURATION=10 scripts/bench-pods.sh        (as root; needs iperf3, jq, wg)
# Variables: BIN (target/release: kwire), KWIRE_LAB (BIN/kwire-lab, else target/debug/kwire-lab:
# the lab's API stand-in is not on the packet path), ROUNDS (3), DURATION (10 s), LAB (name).
set -Eeuo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$HERE/target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
LAB=${LAB:-kwpodbench}
[[ $(id -u) -eq 0 ]] || { echo "bench-pods: needs root" >&2; exit 3; }
KWIRE_LAB=${KWIRE_LAB:-$BIN/kwire-lab}
[[ -x $KWIRE_LAB ]] || KWIRE_LAB=$HERE/target/debug/kwire-lab
[[ -x $KWIRE_LAB && -x $BIN/kwire ]] || { echo "bench-pods: build first: make release" >&2; exit 3; }
for t in iperf3 jq wg; do command -v $t >/dev/null || { echo "bench-pods: '$t' missing: scripts/install-deps.sh" >&2; exit 3; }; done
lab() { local sub=$1; shift; "$KWIRE_LAB" "$sub" --name "$LAB" "$@"; }
SRV_PIDS=()
cleanup() { set +e; for p in "${SRV_PIDS[@]}"; do kill "$p" 2>/dev/null; done; lab down >/dev/null 2>&1; }
trap cleanup EXIT
lab down >/dev/null 2>&1 || true
lab up --nodes 2 --kwire "$BIN/kwire" >/dev/null
J=$(lab status --json)
pod() { jq -r --arg n "$1" ".pods[] | select(.name==\$n) | .$2" <<<"$J"; }
CLI_NS=$(pod pod-1-1 netns)
for p in pod-2-1 pod-1-2; do   # the servers: one on the other node, one beside the client
  ip netns exec "$(pod $p netns)" iperf3 -s >/dev/null 2>&1 & SRV_PIDS+=($!)
done
REMOTE_IP=$(pod pod-2-1 'ips[0]'); LOCAL_IP=$(pod pod-1-2 'ips[0]')
for ip in "$REMOTE_IP" "$LOCAL_IP"; do
  for _ in $(seq 100); do ip netns exec "$CLI_NS" ping -c1 -W1 -q "$ip" >/dev/null 2>&1 && break; sleep 0.2; done
done
iperf() { # iperf DEST -> Gbit/s received (0 on failure, after retries while the server starts)
  local out
  for _ in 1 2 3; do
    out=$(ip netns exec "$CLI_NS" iperf3 -c "$1" -t "$DURATION" -J 2>/dev/null) \
      && { jq '.end.sum_received.bits_per_second/1e9' <<<"$out"; return; }
    sleep 1
  done
  echo 0
}
tunnel() { # the harness's kwire tunnel, tcp1 -> Gbit/s
  local f; f=$(mktemp)
  NS_PREFIX=tq NAME=kwire DURATION=$DURATION TESTS=tcp1 RESULTS=$f "$HERE/bench/harness/tunnel-bench.sh" \
    "$BIN/kwire tunnel {if}" >/dev/null 2>&1 || true
  awk '/metric=tcp1_gbps/{split($4,a,"="); print a[2]}' "$f" | grep . || echo 0
  rm -f "$f"
}
cross=(); same=(); tun=(); ratio=()
for r in $(seq "$ROUNDS"); do
  # Rotate the order so no measurement always runs first.
  for k in 0 1 2; do
    case $(((k + r) % 3)) in
      0) cross+=("$(iperf "$REMOTE_IP")") ;;
      1) same+=("$(iperf "$LOCAL_IP")") ;;
      2) tun+=("$(tunnel)") ;;
    esac
  done
  ratio+=("$(awk "BEGIN{print (${tun[-1]} > 0) ? ${cross[-1]}/${tun[-1]} : 0}")")
  printf 'round %d: pods across nodes %.3f, pods on one node %.3f, kwire tunnel %.3f Gbit/s; across / tunnel %.3f\n' \
    "$r" "${cross[-1]}" "${same[-1]}" "${tun[-1]}" "${ratio[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print (NR%2)? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
printf 'median (%d rounds x %ds): pods across nodes %.3f, pods on one node %.3f, kwire tunnel %.3f Gbit/s; across / tunnel %.3f (within-round median; load %s)\n' \
  "$ROUNDS" "$DURATION" "$(median "${cross[@]}")" "$(median "${same[@]}")" "$(median "${tun[@]}")" \
  "$(median "${ratio[@]}")" "$(cut -d' ' -f1-3 /proc/loadavg)"
