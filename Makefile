# The verbs a newcomer needs. Everything runs as root on Linux (BPF, XDP,
# network namespaces); `setup` installs what is missing, idempotently.

CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

.PHONY: help demo test setup bpf bpf-check lint unit generate bench-dataplane bench-control-plane chart-check chart-render

# Plain `make` only lists the verbs: `demo` installs packages and mounts
# bpffs, which nobody should get by typing `make` alone.
.DEFAULT_GOAL := help

## help: list these verbs (the two a newcomer needs are demo and test)
help:
	@sed -n 's/^## \([a-z-]*\): */  \1\t/p' $(MAKEFILE_LIST) | expand -t 20

## demo: kube-dsr end to end (stand-in API server, operator, agents) with real traffic in network namespaces
# The demo runs the debug build `make test` makes (same command, same
# features, so after `make test` nothing is rebuilt): forwarding is the
# kernel's XDP program, which has no debug build, and the agents' user
# space is fast enough for a demo in the dev profile.
demo: setup
	$(CARGO) build --locked --workspace --bins
	$(TARGET_DIR)/debug/dsr-demo

## test: formatting, lints, generated files, Helm chart, unit tests, packet fixtures, namespace tests
test: setup lint bpf-check chart-check unit

## setup: install toolchains and tools (idempotent)
setup:
	@bash scripts/setup.sh

## bpf: rebuild the XDP objects in bpf/obj/ (commit them)
bpf: setup
	bash scripts/bpf.sh build

## bpf-check: fail when bpf/obj/ is stale (stamp and byte-for-byte rebuild)
bpf-check:
	bash scripts/bpf.sh check

## generate: regenerate every checked-in generated file (XDP objects, CRDs, chart CRDs, deploy/)
generate: bpf
	$(CARGO) run --locked -q -p kube-dsr-crds --bin crdgen -- --write crds
	$(MAKE) chart-render

## chart-check: Helm lint and render (default + ci/ values), Kubernetes schemas,
## privileges and RBAC against docs/install.md, deploy/kube-dsr.yaml and chart CRDs current
chart-check:
	.venv/bin/python scripts/chart-check.py

## chart-render: copy crds/*.yaml into the chart, regenerate deploy/kube-dsr.yaml
chart-render: setup
	.venv/bin/python scripts/chart-check.py --write

## lint: rustfmt and clippy (warnings are errors)
lint:
	$(CARGO) fmt --all --check
	cd bpf/xdp && $(CARGO) +stable fmt --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## unit: build the binaries, then every workspace test (namespace tests need root)
unit:
	# The one-host cluster tests run the real binaries (the demo reuses them).
	$(CARGO) build --locked --workspace --bins
	$(CARGO) test --locked --workspace

## bench-dataplane: XDP forwarding rate against the MAC-swap floor
bench-dataplane: setup
	$(CARGO) run --release --locked -q -p kube-dsr-e2e --bin bench-dataplane

## bench-control-plane: convergence, change latency, CPU and memory of operator,
## agent and stand-in at 100x100, 1000x10 and 1000x100 (release builds; not part of test)
bench-control-plane: setup
	$(CARGO) build --release --locked -q -p kube-dsr-agent -p kube-dsr-operator -p kube-dsr-apiserver --bins
	$(CARGO) run --release --locked -q -p kube-dsr-e2e --bin bench-control-plane -- $(BENCH_ARGS)
