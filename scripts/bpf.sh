#!/usr/bin/env bash
# Builds the XDP objects and keeps the checked-in copies honest.
#
#   scripts/bpf.sh build   rebuild bpf/obj/*.o and bpf/obj/SOURCES.sha256
#   scripts/bpf.sh check   fail when bpf/obj/ is stale: the source stamp must
#                          match and a fresh build must be byte-identical
#   scripts/bpf.sh stamp   print the source stamp
set -euo pipefail
cd "$(dirname "$0")/.."

OBJS=(kube-dsr-xdp kube-dsr-bench)
TOOLCHAIN=$(sed -n 's/^channel = "\(.*\)"/\1/p' bpf/xdp/rust-toolchain.toml)

stamp() {
    {
        echo "toolchain $TOOLCHAIN"
        echo "linker $(bpf-linker --version 2>/dev/null || echo missing)"
        find bpf/common bpf/xdp -type f \( -name '*.rs' -o -name '*.toml' -o -name 'Cargo.lock' \) \
            -not -path '*/target/*' | LC_ALL=C sort | xargs sha256sum
    } | sha256sum | cut -d' ' -f1
}

build_into() {
    local target_dir=$1
    (cd bpf/xdp && CARGO_TARGET_DIR="$target_dir" cargo "+$TOOLCHAIN" build --release --locked --quiet)
}

case "${1:-}" in
stamp)
    stamp
    ;;
build)
    build_into "$PWD/bpf/xdp/target"
    for o in "${OBJS[@]}"; do
        cp "bpf/xdp/target/bpfel-unknown-none/release/$o" "bpf/obj/$o.o"
    done
    stamp >bpf/obj/SOURCES.sha256
    echo "bpf/obj updated (stamp $(cat bpf/obj/SOURCES.sha256))"
    ;;
check)
    want=$(stamp)
    have=$(cat bpf/obj/SOURCES.sha256 2>/dev/null || echo none)
    if [ "$want" != "$have" ]; then
        echo "bpf/obj is stale: sources stamp $want, checked-in $have. Run 'make bpf' and commit bpf/obj." >&2
        exit 1
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    build_into "$tmp"
    for o in "${OBJS[@]}"; do
        if ! cmp -s "$tmp/bpfel-unknown-none/release/$o" "bpf/obj/$o.o"; then
            echo "bpf/obj/$o.o differs from a fresh build of the same sources. Run 'make bpf' and commit bpf/obj." >&2
            exit 1
        fi
    done
    echo "bpf/obj is fresh"
    ;;
*)
    echo "usage: $0 build|check|stamp" >&2
    exit 2
    ;;
esac
