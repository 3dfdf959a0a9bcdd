#!/usr/bin/env bash
# install-deps.sh - install what kwire's integration tests, demo and benchmarks need on Debian 12.
#
# USAGE (as root, on a fresh Debian 12 machine or in CI; safe to run again):
#   scripts/install-deps.sh            # apt packages + cnitool
#   scripts/install-deps.sh --bench    # also `cargo install boringtun-cli --locked` (compiles, ~minutes)
#   scripts/install-deps.sh --image    # also buildah and skopeo (apt: `make image`, its test) and
#                                      # kubernetes-validate (PyPI, pinned: `make lint` checks deploy/)
#
# What it does, each step skipped when its result is already there:
#   0. Checks rustc against the workspace's rust-version (Cargo.toml) and says what to do if it
#      is missing or older; Rust itself comes from rustup.
#   1. apt-get update (once, only if a package is missing) and install the missing packages of
#      APT_PACKAGES below, waiting up to 300 s for another apt/dpkg to release its lock.
#   2. cnitool -> /usr/local/bin/cnitool, built offline from Debian's *source* package
#      golang-github-appc-cni (1.1.2-1) (cnitool is not packaged in Debian 12): a private
#      deb-src list made from the machine's own apt sources, `apt-get source --download-only`,
#      then a GOPATH-mode build against golang-github-appc-cni-dev in /usr/share/gocode.
#   3. (--bench) boringtun-cli via cargo, into cargo's bin directory (~/.cargo/bin).
#   4. (--image) apt buildah skopeo; `pip install kubernetes-validate==KUBERNETES_VALIDATE_VERSION`.
# Output is quiet: one line per step; on failure the log of the failing command is printed.
# Exit codes: 0 ok, 1 a step failed (message says which), 2 usage, 3 not root / not Debian-like.
set -Eeuo pipefail

APT_PACKAGES=(
  iproute2 iperf3 iputils-ping wireguard-tools wireguard-go jq ethtool tcpdump socat nftables
  prometheus graphviz kubernetes-client python3 procps
  # the lab's cluster DNS (`kwire-lab up --dns`): the dnsmasq binary only, no system service
  dnsmasq-base
  golang-go golang-github-appc-cni-dev containernetworking-plugins
  # for fetching and unpacking the cnitool source, and for the tests' key/checksum tools
  ca-certificates xz-utils coreutils
)
IMAGE_APT_PACKAGES=(buildah skopeo)
KUBERNETES_VALIDATE_VERSION=1.37.0
CNI_SRC_PACKAGE=golang-github-appc-cni
CNI_SRC_VERSION=1.1.2-1
CNI_ORIG_TARBALL=golang-github-appc-cni_1.1.2.orig.tar.xz
CNITOOL=${CNITOOL:-/usr/local/bin/cnitool}  # override only to test the build
APT_LOCK_TIMEOUT_S=300

want_bench=0
want_image=0
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=1 ;;
    --image) want_image=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || { echo "install-deps: must run as root (apt-get, /usr/local/bin)" >&2; exit 3; }
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
  || { echo "install-deps: needs a Debian 12 (apt-get, dpkg-query)" >&2; exit 3; }

WORK=$(mktemp -d /tmp/kwire-install-deps.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/log"

# run DESCRIPTION CMD...: run quietly; on failure show the command's output and stop.
run() {
  local what=$1; shift
  if ! "$@" >"$LOG" 2>&1; then
    echo "install-deps: ERROR: $what failed: $*" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-q -y -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT_S" -o Dpkg::Use-Pty=0)

# ---- 0. Rust: the workspace's rust-version ----------------------------------------------------
# Not installed here (rustup is per user); checked so that an old toolchain is named now rather
# than by the first build.
RUST_VERSION=$(sed -n 's/^rust-version[[:space:]]*=[[:space:]]*"\([0-9.]*\)".*/\1/p' \
  "$(dirname "$0")/../Cargo.toml" | head -n 1)
older() { [[ $(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1) == "$1" && $1 != "$2" ]]; }
if ! command -v rustc >/dev/null; then
  say "rust: no rustc; kwire needs Rust >= ${RUST_VERSION:-?}: install it with rustup (https://rustup.rs)"
else
  have=$(rustc --version | awk '{print $2}')
  if [[ -n $RUST_VERSION ]] && older "$have" "$RUST_VERSION"; then
    say "rust: rustc $have is older than the workspace's rust-version $RUST_VERSION: run 'rustup update stable'"
  else
    say "rust: rustc $have (>= ${RUST_VERSION:-?})"
  fi
fi

# ---- 1. apt packages -------------------------------------------------------------------------
installed() { [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]; }
# A package whose command another package already provides is not installed again: on images
# with Google's Cloud SDK, its `kubectl` package owns /usr/bin/kubectl and kubernetes-client
# would conflict with it (dpkg: "trying to overwrite '/usr/bin/kubectl'").
provided_by_command() {
  case "$1" in
    kubernetes-client) command -v kubectl >/dev/null ;;
    *) return 1 ;;
  esac
}
((want_image)) && APT_PACKAGES+=("${IMAGE_APT_PACKAGES[@]}")
missing=()
for p in "${APT_PACKAGES[@]}"; do installed "$p" || provided_by_command "$p" || missing+=("$p"); done

# apt-get update takes /var/lib/apt/lists/lock, which DPkg::Lock::Timeout does not cover on every
# apt version: retry while another apt holds it.
apt_update() {
  local deadline=$((SECONDS + APT_LOCK_TIMEOUT_S))
  until apt-get "${APT_OPTS[@]}" "$@" update >"$LOG" 2>&1; do
    if grep -q 'Could not get lock' "$LOG" && ((SECONDS < deadline)); then sleep 3; continue; fi
    echo "install-deps: ERROR: apt-get update failed" >&2; tail -n 40 "$LOG" >&2; exit 1
  done
}

if ((${#missing[@]})); then
  say "apt: installing ${missing[*]}"
  apt_update
  run "apt-get install of ${missing[*]}" \
    apt-get "${APT_OPTS[@]}" --no-install-recommends install "${missing[@]}"
else
  say "apt: all ${#APT_PACKAGES[@]} packages present"
fi

# ---- 2. cnitool from Debian's source package -------------------------------------------------
build_cnitool() {
  local list="$WORK/src.list" lists="$WORK/lists" src="$WORK/src"
  mkdir -p "$lists/partial" "$src"
  # deb-src lines from the deb822 sources (URIs/Suites/Components/Signed-By per stanza), or from
  # the one-line sources.list format.
  if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    awk '
      function flush() { if (uris != "" && suites != "") {
          n = split(uris, u, " "); m = split(suites, s, " ")
          for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
            printf "deb-src %s%s %s %s\n", (key != "" ? "[signed-by=" key "] " : ""), u[i], s[j], comps }
        uris = suites = comps = key = "" }
      /^[[:space:]]*$/ { flush(); next }
      /^#/ { next }
      /^URIs:/       { sub(/^URIs:[[:space:]]*/, "");       uris = $0 }
      /^Suites:/     { sub(/^Suites:[[:space:]]*/, "");     suites = $0 }
      /^Components:/ { sub(/^Components:[[:space:]]*/, ""); comps = $0 }
      /^Signed-By:/  { sub(/^Signed-By:[[:space:]]*/, "");  key = $0 }
      END { flush() }' /etc/apt/sources.list.d/debian.sources >"$list"
  fi
  if [[ ! -s $list && -r /etc/apt/sources.list ]]; then
    sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' /etc/apt/sources.list >"$list"
  fi
  [[ -s $list ]] || die "cnitool: found no Debian archive in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list to make a deb-src line from"
  local opts=(-o "Dir::Etc::SourceList=$list" -o Dir::Etc::SourceParts=/nonexistent
              -o "Dir::State::Lists=$lists")
  apt_update "${opts[@]}"
  (cd "$src" && run "download of source package $CNI_SRC_PACKAGE=$CNI_SRC_VERSION" \
     apt-get "${APT_OPTS[@]}" "${opts[@]}" source --download-only "$CNI_SRC_PACKAGE=$CNI_SRC_VERSION")
  [[ -f $src/$CNI_ORIG_TARBALL ]] || die "cnitool: $CNI_ORIG_TARBALL not in the downloaded source package"
  run "unpack of $CNI_ORIG_TARBALL" tar -C "$src" -xJf "$src/$CNI_ORIG_TARBALL"
  local dir
  dir=$(find "$src" -mindepth 2 -maxdepth 2 -type d -name cnitool | head -n 1)
  [[ -n $dir ]] || die "cnitool: no cnitool/ directory in $CNI_ORIG_TARBALL"
  # GOPATH mode against Debian's libcni sources; the package path must be relative ('.').
  (cd "$dir" && run "go build of cnitool" env GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off CGO_ENABLED=0 \
     GOFLAGS= GOCACHE="$WORK/gocache" HOME="$WORK" go build -o "$WORK/cnitool" .)
  run "install of $CNITOOL" install -m 0755 "$WORK/cnitool" "$CNITOOL"
}

if [[ -x $CNITOOL ]]; then
  say "cnitool: present ($CNITOOL)"
else
  command -v go >/dev/null || die "cnitool: 'go' not found although golang-go is installed"
  [[ -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ]] \
    || die "cnitool: /usr/share/gocode/src/github.com/containernetworking/cni/libcni missing (golang-github-appc-cni-dev)"
  say "cnitool: building from Debian source $CNI_SRC_PACKAGE $CNI_SRC_VERSION"
  build_cnitool
  say "cnitool: installed $CNITOOL"
fi

# ---- 3. boringtun-cli (benchmarks only) --------------------------------------------------------
if ((want_bench)); then
  CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
  if command -v boringtun-cli >/dev/null || [[ -x $CARGO_BIN_DIR/boringtun-cli ]]; then
    say "boringtun-cli: present ($(command -v boringtun-cli || echo "$CARGO_BIN_DIR/boringtun-cli"))"
  else
    command -v cargo >/dev/null || die "boringtun-cli: cargo not found (install Rust with rustup first)"
    say "boringtun-cli: cargo install boringtun-cli --locked (compiles; a few minutes)"
    run "cargo install boringtun-cli" cargo install --quiet boringtun-cli --locked
    say "boringtun-cli: installed in $CARGO_BIN_DIR"
  fi
fi

# ---- 4. kubernetes-validate (image/test only) --------------------------------------------------
if ((want_image)); then
  if command -v kubernetes-validate >/dev/null && \
     [[ $(python3 -m pip show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p') == "$KUBERNETES_VALIDATE_VERSION" ]]; then
    say "kubernetes-validate: present ($KUBERNETES_VALIDATE_VERSION)"
  else
    say "kubernetes-validate: pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    run "pip install of kubernetes-validate" python3 -m pip install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    command -v kubernetes-validate >/dev/null || die "kubernetes-validate installed but not on PATH"
  fi
fi

say "done"
