#!/usr/bin/env bash
# Idempotent set-up on Debian 12 as root: system packages, a virtual
# environment in .venv at the repository root, and the build.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(gcc python3-dev python3-venv libibverbs-dev rdma-core ibverbs-providers iperf3 iproute2 util-linux
          openssh-server openmpi-bin slurmctld slurmd slurm-client)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "ci/setup.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" "setuptools>=77" wheel "Cython>=3" "numpy<1.24" pytest pytest-timeout hypothesis pyyaml
"${pip[@]}" "blake3>=1.0" || echo "ci/setup.sh: blake3 could not be installed; RDMAKV_INTEGRITY and its tests will not work"
# MXNet 1.9.1 (its last release) needs numpy<1.24; the core works without it.
"${pip[@]}" "mxnet==1.9.1" || echo "ci/setup.sh: MXNet 1.9.1 could not be installed; its tests will skip"
# atheris (coverage-guided fuzzing of the decoder, tools/fuzz_decoder.py) is optional.
"${pip[@]}" atheris || echo "ci/setup.sh: atheris could not be installed; the decoder fuzz run will skip"
# scikit-learn ships the digits data set that examples/mxnet_train.py trains on;
# pinning numpy keeps the resolver from upgrading it past what MXNet accepts.
"${pip[@]}" scikit-learn "numpy<1.24" || echo "ci/setup.sh: scikit-learn could not be installed; the MXNet example's test will skip"
# The benchmark's plots (tools/); torch for the gloo baseline is installed on request:
# .venv/bin/pip install torch==2.13.0 "numpy<1.24"   (keep the numpy MXNet needs)
"${pip[@]}" "matplotlib<3.11" "numpy<1.24" || echo "ci/setup.sh: matplotlib could not be installed; --plot will not work"
"${pip[@]}" --no-build-isolation -e .
