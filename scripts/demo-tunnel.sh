#!/usr/bin/env bash
# demo.sh - kwire's main job on one machine: an encrypted tunnel between two hosts (network
# namespaces), `kwire tunnel` on one side and wireguard-go on the other, configured with `wg`.
# Shows the handshake, a ping both ways, a 5 s TCP transfer and what is on the wire. Removes
# everything it made, also on failure or Ctrl-C. Needs root and scripts/install-deps.sh.
set -Eeuo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
KWIRE=${KWIRE_BIN:-$HERE/target/release/kwire}
[[ -x $KWIRE ]] || KWIRE=$HERE/target/debug/kwire
[[ -x $KWIRE ]] || { echo "demo: build kwire first: cargo build --release" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "demo: needs root (network namespaces, tun)" >&2; exit 1; }
P=kwdemo$$
A=$P-a B=$P-b IFA=kwd${$}a IFB=kwd${$}b
IFA=${IFA:0:15} IFB=${IFB:0:15}
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null
  rm -f "/var/run/wireguard/$IFA.sock" "/var/run/wireguard/$IFB.sock"
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "two hosts joined by a link they do not trust: $A 192.0.2.1 <-> $B 192.0.2.2"
ip netns add "$A"; ip netns add "$B"
ip -n "$A" link set lo up; ip -n "$B" link set lo up
ip link add "${P}va" netns "$A" type veth peer name "${P}vb" netns "$B"
ip -n "$A" addr add 192.0.2.1/24 dev "${P}va"; ip -n "$B" addr add 192.0.2.2/24 dev "${P}vb"
ip -n "$A" link set "${P}va" up; ip -n "$B" link set "${P}vb" up

step "start kwire tunnel in $A and wireguard-go in $B"
ip netns exec "$A" "$KWIRE" tunnel "$IFA" >"$TMP/kwire.log" 2>&1 & PIDS+=($!)
ip netns exec "$B" env WG_PROCESS_FOREGROUND=1 wireguard-go -f "$IFB" >"$TMP/wggo.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do [[ -S /var/run/wireguard/$IFA.sock && -S /var/run/wireguard/$IFB.sock ]] && break; sleep 0.1; done
[[ -S /var/run/wireguard/$IFA.sock ]] || { cat "$TMP/kwire.log"; exit 1; }
(umask 077; wg genkey >"$TMP/a.key"; wg genkey >"$TMP/b.key")
PA=$(wg pubkey <"$TMP/a.key"); PB=$(wg pubkey <"$TMP/b.key")
ip netns exec "$A" wg set "$IFA" private-key "$TMP/a.key" listen-port 51820 peer "$PB" endpoint 192.0.2.2:51820 allowed-ips 10.99.0.2/32
ip netns exec "$B" wg set "$IFB" private-key "$TMP/b.key" listen-port 51820 peer "$PA" endpoint 192.0.2.1:51820 allowed-ips 10.99.0.1/32
ip -n "$A" addr add 10.99.0.1/24 dev "$IFA"; ip -n "$B" addr add 10.99.0.2/24 dev "$IFB"
ip -n "$A" link set "$IFA" mtu 1420 up; ip -n "$B" link set "$IFB" mtu 1420 up

step "ping through the tunnel, both ways"
ip netns exec "$A" ping -c 3 -i 0.2 -W 5 10.99.0.2 | tail -2
ip netns exec "$B" ping -c 3 -i 0.2 -W 5 10.99.0.1 | tail -2

step "5 s of TCP through the tunnel (iperf3), while tcpdump watches the link"
ip netns exec "$B" iperf3 -s -1 >/dev/null 2>&1 & PIDS+=($!)
ip netns exec "$A" timeout 8 tcpdump -i "${P}va" -nn -c 200 -w "$TMP/wire.pcap" ip >/dev/null 2>&1 & TD=$!
sleep 0.5
ip netns exec "$A" iperf3 -c 10.99.0.2 -t 5 | grep -E "sender|receiver"
wait "$TD" 2>/dev/null || true
echo "IPv4 on the link (first 200 packets): only WireGuard UDP"
tcpdump -r "$TMP/wire.pcap" -nn 2>/dev/null | awk '{print $3, $4, $5, $6}' | sed 's/\.[0-9]*:$//' | sort | uniq -c | sort -rn | head -5

step "wg show, as wireguard-tools sees kwire"
ip netns exec "$A" wg show "$IFA"
echo
echo "demo done: everything it made is removed on exit."
