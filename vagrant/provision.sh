#!/usr/bin/env bash
# Provisioning of the xdplb demo VM (see Vagrantfile), run as root by Vagrant's shell
# provisioner: build tools and rustup (stable), then `cargo xtask setup` (the pinned nightly,
# bpf-linker, Debian packages), then the demo with native XDP on the VM's virtio NIC.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "provision.sh: must run as root" >&2
    exit 1
fi
export HOME=/root
export DEBIAN_FRONTEND=noninteractive

apt-get update
apt-get install -y --no-install-recommends build-essential ca-certificates curl git

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --no-modify-path --profile minimal --default-toolchain stable \
            --component rustfmt,clippy
fi
rustup toolchain install stable --profile minimal --component rustfmt --component clippy

cd /xdplb
cargo xtask setup
cargo xtask demo --xdp-mode native
