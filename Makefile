# The two commands a new user runs (see README.md), and a few helpers.
#   make demo   build kwire and start a 3-node lab cluster on this machine (needs root)
#   make test   every test: unit, property, integration (root: network namespaces), and each
#               benchmark run once as a test (so the benches cannot rot)
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo demo-tunnel test lint deps build release bench bench-tunnel

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

demo: deps release
	@scripts/demo.sh

# kwire tunnel against wireguard-go between two namespaces.
demo-tunnel: deps release
	@scripts/demo-tunnel.sh

# Integration tests find target/debug/kwire and kwire-lab, so the binaries are built first.
# Gates first (formatting, lints), then every test; KWIRE_TESTS_STRICT=1 turns a skipped test
# (not root, a tool missing) into a failure, so a green run means every test ran.
test: deps build lint
	KWIRE_TESTS_STRICT=1 $(CARGO) test --workspace --no-fail-fast
	$(CARGO) test --workspace --bench '*'
	# The fuzz targets' bodies over their seed corpora (stable; fuzzing itself: fuzz/README.md).
	cd fuzz && CARGO_TARGET_DIR=../target $(CARGO) test --lib

# rustfmt's default style and clippy with warnings as errors, on every crate and target; no
# cycle between a crate's top-level modules (scripts/module-graph.py CRATE_DIR prints the graph).
lint:
	$(CARGO) fmt --all --check
	cd fuzz && $(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 scripts/module-graph.py --self-test
	python3 scripts/module-graph.py daemon

# Criterion micro-benchmarks (data path, policy engine).
bench:
	$(CARGO) bench -p kwire-daemon

# Side by side with wireguard-go and boringtun-cli (shared/bench harness); ~15 minutes.
bench-tunnel: release
	@scripts/install-deps.sh --bench
	@scripts/bench-compare.sh
