#!/usr/bin/env bash
# build-image.sh - assemble kwire's OCI image offline, from scratch, with buildah.
#
# USAGE (as root, Debian 12, after `scripts/install-deps.sh --image`):
#   scripts/build-image.sh [--out FILE] [--tag NAME:TAG] [--no-build]
#     --out FILE    the OCI archive to write (default target/kwire-image.tar)
#     --tag NAME    the image's name in the archive (default kwire:<workspace version>)
#     --no-build    use target/release/kwire and kwire-cni as they are (must be static)
#
# What it does:
#   1. builds kwire and kwire-cni as static release binaries (glibc's static-pie via
#      `-C target-feature=+crt-static` on the two binary crates, so they run on any node's libc
#      or none) unless --no-build;
#   2. `buildah from scratch` and copies in what deploy/image.txt lists (the same list kwire-lab
#      builds each lab agent's root filesystem from), host files with the shared libraries ldd
#      lists for them;
#   3. sets the entrypoint (/usr/local/bin/kwire) and PATH, commits to an OCI archive.
# Nothing is pulled or pushed: no registry is needed. Load it with `podman load -i FILE` or
# `skopeo copy oci-archive:FILE docker://REGISTRY/kwire:TAG`.
# Exit codes: 0 ok, 1 a step failed, 2 usage.
set -Eeuo pipefail

cd "$(dirname "$0")/.."
OUT=target/kwire-image.tar
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
TAG="kwire:${VERSION}"
BUILD=1
while (($#)); do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
die() { echo "build-image.sh: ERROR: $*" >&2; exit 1; }
for tool in buildah ldd; do
  command -v "$tool" >/dev/null || die "$tool not found: run scripts/install-deps.sh --image"
done

if ((BUILD)); then
  echo "build-image: static release builds of kwire and kwire-cni"
  cargo rustc --quiet --release --locked -p kwire-daemon --bin kwire -- -C target-feature=+crt-static
  cargo rustc --quiet --release --locked -p kwire-cni --bin kwire-cni -- -C target-feature=+crt-static
fi
for b in kwire kwire-cni; do
  [[ -x target/release/$b ]] || die "target/release/$b missing (run without --no-build)"
  ldd "target/release/$b" 2>&1 | grep -qE 'not a dynamic executable|statically linked' \
    || die "target/release/$b is dynamically linked; the image holds static binaries (run without --no-build)"
done

WORK=$(mktemp -d /tmp/kwire-image.XXXXXX)
# A private buildah store, removed afterwards: nothing is left in /var/lib/containers.
B=(buildah --root "$WORK/root" --runroot "$WORK/run" --storage-driver vfs)
ctr=""
cleanup() { [[ -n $ctr ]] && "${B[@]}" rm "$ctr" >/dev/null 2>&1; rm -rf "$WORK"; }
trap cleanup EXIT

ctr=$("${B[@]}" from --quiet scratch)
copied=()
copy() { # copy HOST-FILE IMAGE-PATH, once per image path
  local src=$1 dst=$2
  [[ " ${copied[*]} " == *" $dst "* ]] && return 0
  "${B[@]}" copy --quiet "$ctr" "$src" "$dst" >/dev/null
  copied+=("$dst")
}
while read -r dst src _; do
  [[ -z $dst || $dst == \#* ]] && continue
  case "$src" in
    kwire|kwire-cni) file="target/release/$src" ;;
    /*) file="$src" ;;
    *) file="$src" ;;
  esac
  [[ -f $file ]] || die "$file (for $dst, deploy/image.txt) not found"
  if [[ $src == /* ]]; then
    # Host executables bring their shared libraries, at the paths the loader opens.
    while read -r lib; do copy "$lib" "$lib"; done < <(ldd "$file" | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p')
  fi
  copy "$file" "$dst"
done < deploy/image.txt

"${B[@]}" config \
  --entrypoint '["/usr/local/bin/kwire"]' --cmd '' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label org.opencontainers.image.title=kwire \
  --label "org.opencontainers.image.version=$VERSION" \
  --label org.opencontainers.image.description="kwire: one daemon per node, userspace WireGuard, NetworkPolicy in the packet loop" \
  "$ctr"
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
"${B[@]}" commit --quiet --format oci "$ctr" "oci-archive:$OUT:$TAG" >/dev/null
echo "build-image: wrote $OUT ($TAG, ${#copied[@]} files)"
