# The verbs a newcomer needs. Everything runs as root on Linux (BPF, XDP,
# network namespaces); `setup` installs what is missing, idempotently.

CARGO ?= cargo

.PHONY: demo test setup bpf bpf-check lint unit generate bench-dataplane

## demo: kube-dsr's dataplane with real traffic in network namespaces
demo: setup
	$(CARGO) run --release --locked -q -p kube-dsr-e2e --bin dsr-demo

## test: formatting, lints, generated files, unit tests, packet fixtures, namespace tests
test: setup lint bpf-check unit

## setup: install toolchains and tools (idempotent)
setup:
	@bash scripts/setup.sh

## bpf: rebuild the XDP objects in bpf/obj/ (commit them)
bpf: setup
	bash scripts/bpf.sh build

## bpf-check: fail when bpf/obj/ is stale (stamp and byte-for-byte rebuild)
bpf-check:
	bash scripts/bpf.sh check

## generate: regenerate every checked-in generated file (XDP objects, CRDs)
generate: bpf
	$(CARGO) run --locked -q -p kube-dsr-crds --bin crdgen -- --write crds

lint:
	$(CARGO) fmt --all --check
	cd bpf/xdp && $(CARGO) +stable fmt --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --locked --workspace

## bench-dataplane: XDP forwarding rate against the MAC-swap floor
bench-dataplane: setup
	$(CARGO) run --release --locked -q -p kube-dsr-e2e --bin bench-dataplane
