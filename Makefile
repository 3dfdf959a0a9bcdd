# The two commands a new user runs (see README.md), and a few helpers.
#   make demo   build kwire and start a 3-node lab cluster on this machine (needs root)
#   make test   every test: unit, property, integration (root: network namespaces), and each
#               benchmark run once as a test (so the benches cannot rot)
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo demo-tunnel test lint deps deps-test build release image bench bench-tunnel profile

deps:
	@scripts/install-deps.sh

# What the tests need on top: buildah and skopeo (the image and its test), kubernetes-validate
# (the manifests in deploy/).
deps-test:
	@scripts/install-deps.sh --image

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

# The OCI image, offline: static release builds of kwire and kwire-cni, buildah from scratch
# with deploy/image.txt's files, written to target/kwire-image.tar (scripts/build-image.sh).
image: deps-test
	scripts/build-image.sh

demo: deps release
	@scripts/demo.sh

# kwire tunnel against wireguard-go between two namespaces.
demo-tunnel: deps release
	@scripts/demo-tunnel.sh

# Integration tests find target/debug/kwire and kwire-lab, so the binaries are built first.
# Gates first (formatting, lints), then every test; KWIRE_TESTS_STRICT=1 turns a skipped test
# (not root, a tool missing) into a failure, so a green run means every test ran.
test: deps-test build lint
	KWIRE_TESTS_STRICT=1 $(CARGO) test --workspace --no-fail-fast
	$(CARGO) test --workspace --bench '*'
	# The fuzz targets' bodies over their seed corpora (stable; fuzzing itself: fuzz/README.md).
	cd fuzz && CARGO_TARGET_DIR=../target $(CARGO) test --lib

# rustfmt's default style and clippy with warnings as errors, on every crate and target; every
# manifest in deploy/ against the API schemas of the oldest Kubernetes it supports (1.30, for
# the admission policy) and the newest kubernetes-validate knows, unknown fields refused; no
# cycle between the modules of any level of any crate (scripts/module-graph.py CRATE_DIR prints
# the top level's graph, --within MODULE a module's).
lint:
	$(CARGO) fmt --all --check
	cd fuzz && $(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@command -v kubernetes-validate >/dev/null || { echo "kubernetes-validate missing: run scripts/install-deps.sh --image" >&2; exit 1; }
	kubernetes-validate --quiet --strict -k 1.30.0 deploy/*.yaml
	kubernetes-validate --quiet --strict deploy/*.yaml
	python3 scripts/module-graph.py --self-test
	for c in daemon lab tests cni-shim proto fuzz; do python3 scripts/module-graph.py $$c --every || exit 1; done

# Criterion micro-benchmarks (data path, policy engine).
bench:
	$(CARGO) bench -p kwire-daemon

# Side by side with wireguard-go and boringtun-cli (bench/harness); ~25 minutes. With
# KWIRE_BEFORE=/path/to/an/older/kwire that build runs in the same rounds too (before/after
# ratios); ANCHORS=0 leaves out all but the kwire builds (scripts/bench-compare.sh).
bench-tunnel: release
	@scripts/install-deps.sh --bench
	@scripts/bench-compare.sh

# Both ends of `kwire tunnel` recorded with perf during a TCP test: target/profile/flamegraph.svg
# and top.txt (the top symbols and their shares); scripts/profile.sh says how to vary it.
profile: release
	@scripts/install-deps.sh --profile
	@scripts/profile.sh
