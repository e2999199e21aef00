#!/usr/bin/env bash
# ptxas's register, shared-memory and spill report for every kernel in kernels/*.cu, for sm_80
# (A100) and sm_90 (H100). Compiled with the flags build.rs uses; exits non-zero when a compile
# fails or when any kernel spills registers to local memory. nvcc: $NVCC, else the pinned one
# that .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc=${NVCC:-${STEER_NVCC_CACHE:-$HOME/.cache/steer-nvcc}/nvidia/cu13/bin/nvcc}
if [[ ! -x $nvcc ]]; then
    echo "ptxas-report: no nvcc at $nvcc (set NVCC, or run .ci/run to install it)" >&2
    exit 1
fi
nvcc=$(realpath "$nvcc") # nvcc finds its tools relative to the path it is started by

shopt -s nullglob
sources=(kernels/*.cu)
if (( ${#sources[@]} == 0 )); then
    echo "ptxas-report: no kernels/*.cu" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
spills=0
for src in "${sources[@]}"; do
    for arch in sm_80 sm_90; do
        echo "== $src ($arch)"
        # ptxas -v reports on stderr; the cubin itself is thrown away.
        "$nvcc" -cubin -arch="$arch" -std=c++17 -O3 -Ikernels -Xptxas -v \
            -o "$tmp/kernel.cubin" "$src" >"$tmp/report" 2>&1 || { cat "$tmp/report"; exit 1; }
        cat "$tmp/report"
        if grep -Eq '[1-9][0-9]* bytes spill (stores|loads)' "$tmp/report"; then
            echo "ptxas-report: $src spills registers on $arch" >&2
            spills=1
        fi
    done
done
exit $spills
