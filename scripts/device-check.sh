#!/usr/bin/env bash
# The device check: every CUDA test with the GPU required, `steer forward --device cuda` on each
# tiny SD2.1 component and `steer classify --device cuda` on the classifier fixture, steered
# generation on both devices, and the attention benchmark, on a GPU machine that has no Rust toolchain.
# Two halves:
#
#   scripts/device-check.sh build   # here, with Rust and nvcc: builds into device-check/
#   scripts/device-check.sh run     # there, from the repo root, with device-check/ copied along
#
# `build` compiles tests/cuda.rs with STEER_REQUIRE_GPU=1 (its GPU tests then fail instead of
# being ignored when no GPU answers), steer and steer-bench, strips them and puts them in
# device-check/ (git-ignored; about 20 MB). `run` runs the tests one at a time, the CLI forward
# (its output compared with diffusers' by the machine's Python), then `steer-bench attention`
# against the machine's PyTorch, and prints a table of all three. Logs and the benchmark's JSON go to
# $OUT when it is set (the device tool's output folder), else to device-check/out/.
# It exits non-zero when a test fails. The whole run takes well under a minute on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=device-check

case "${1:-}" in
build)
    : "${NVCC:=$(realpath "${STEER_NVCC_CACHE:-$HOME/.cache/steer-nvcc}/nvidia/cu13/bin/nvcc")}"
    export NVCC STEER_REQUIRE_GPU=1
    mkdir -p "$dir"
    # The test executable's path is in cargo's JSON messages.
    exe=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')
    [[ -n $exe ]] || { echo "device-check: building tests/cuda.rs failed" >&2; exit 1; }
    cargo build --release --bin steer-bench --bin steer
    strip -o "$dir/cuda-tests" "$exe"
    strip -o "$dir/steer-bench" target/release/steer-bench
    strip -o "$dir/steer" target/release/steer
    ls -la "$dir"
    ;;
run)
    out=${OUT:-$dir/out}
    scratch=$(mktemp -d)
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    status=0
    # One test at a time: their timings and any device fault stay attributable.
    "$dir/cuda-tests" --test-threads=1 --nocapture 2>&1 | tee "$out/cuda-tests.log" || status=1
    # Shared-memory races and out-of-bounds accesses in the attention and map kernels and the
    # classifier's path (where the machine's
    # compute-sanitizer can read the GPU; informational: its verdict is in the log).
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
            echo "== compute-sanitizer --tool $tool" >>"$out/sanitizer.log"
            timeout 180 compute-sanitizer --tool "$tool" --print-limit 5 "$dir/cuda-tests" \
                --test-threads=1 attention_forward attention_backward maps_match classifier \
                >>"$out/sanitizer.log" 2>&1 ||
                echo "compute-sanitizer $tool: exit $? (see $out/sanitizer.log)"
        done
    fi
    # The CLI on the tiny SD2.1 UNet, against diffusers' f32 output (tolerance as in
    # tests/kernel_cases: 5e-2 for bf16), and on the classifier fixture.
    python3 - "$scratch" <<'PY' 2>&1 | tee "$out/cli-forward.log" || status=1
import subprocess, sys
import torch
from safetensors.torch import load_file, save_file
out = sys.argv[1]
ref = load_file("tests/fixtures/tiny-sd21-reference.safetensors")
ok = True
# component, inputs (forward's name: the fixture's), output (forward's: the fixture's), tolerance
# (tests/kernel_cases': about twice PyTorch's own bf16 error, tests/reference/bf16_errors.py).
for comp, ins, (name, key), tol in [
    ("unet", {k: "unet." + k for k in ("sample", "timestep", "encoder_hidden_states")},
     ("out", "unet.out"), 5e-2),
    ("text-encoder", {"input_ids": "text.input_ids"},
     ("last_hidden_state", "text.last_hidden_state"), 1.8e-2),
    ("vae-decoder", {"latent": "vae.latent"}, ("decoded", "vae.decoded"), 3e-2),
    ("vae-encoder", {"image": "vae.image"}, ("encoded_mean", "vae.encoded_mean"), 2.4e-2),
]:
    save_file({k: ref[v] for k, v in ins.items()}, f"{out}/{comp}-in.safetensors")
    subprocess.run(["device-check/steer", "forward", "--model", "tests/fixtures/tiny-sd21",
                    "--component", comp, "--inputs", f"{out}/{comp}-in.safetensors",
                    "--out", f"{out}/{comp}-out.safetensors", "--device", "cuda"], check=True)
    got, want = load_file(f"{out}/{comp}-out.safetensors")[name], ref[key].float()
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"steer forward --device cuda, tiny SD2.1 {comp}: rel error {err:.2e} vs PyTorch f32 "
          f"(tolerance {tol:.1e})")
    ok = ok and err < tol
# The classifier on the GPU against the reference model in float64; tolerance twice PyTorch's own
# bf16 error, which the fixture records (as tests/kernel_cases does).
from safetensors import safe_open
path = "tests/fixtures/classifier-reference.safetensors"
ref = load_file(path)
with safe_open(path, framework="pt") as f:
    meta = f.metadata()
save_file({"maps": ref["maps"].float(), "step": ref["steps"],
           "logits_cotangent": ref["logits_cotangent"].float()}, f"{out}/cls-in.safetensors")
subprocess.run(["device-check/steer", "classify", "--classifier",
                "tests/fixtures/classifier-sd.safetensors", "--inputs", f"{out}/cls-in.safetensors",
                "--out", f"{out}/cls-out.safetensors", "--device", "cuda"], check=True)
got = load_file(f"{out}/cls-out.safetensors")
for name, key in (("logits", "logits"), ("maps_grad", "maps_grad")):
    want = ref[key]
    err = ((got[name].double() - want).abs().max() / want.abs().max()).item()
    tol = 2 * float(meta[f"bf16_vs_f64.{key}"])
    print(f"steer classify --device cuda, {name}: rel error {err:.2e} vs PyTorch f64 (tolerance {tol:.2e})")
    ok = ok and err <= tol
sys.exit(0 if ok else 1)
PY
    # Steering end to end on the shipped ShapesWorld model, on the GPU and on the CPU.
    for device in cuda cpu; do
        t0=$(date +%s.%N)
        "$dir/steer" generate "a red circle to the left of a blue square" --device "$device" \
            --out "$out/shapes-$device.png" --report "$scratch/shapes-$device.json" \
            >>"$out/generate.log" 2>&1 || status=1
        echo "generate --device $device: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s wall" |
            tee -a "$out/generate.log"
    done
    "$dir/steer-bench" attention --python python3 --json "$out/bench-attention.json" 2>&1 |
        tee "$scratch/bench-attention.log" || status=1
    echo
    echo "== device check: tests"
    # With --nocapture a test's output sits between its name and its verdict.
    awk '/^test .* \.\.\. / { name = $2; if ($NF == "ok" || $NF == "FAILED") { printf "%-55s %s\n", name, $NF; name = "" }; next }
         name != "" && ($0 == "ok" || $0 == "FAILED") { printf "%-55s %s\n", name, $0; name = "" }' "$out/cuda-tests.log"
    grep -E '^test result:' "$out/cuda-tests.log" || true
    echo "== device check: compute-sanitizer"
    grep -E '^== compute|ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer.log" 2>/dev/null || true
    echo "== device check: CLI"
    grep -E 'rel error|Error|error' "$out/cli-forward.log" || true
    echo "== device check: generate (ShapesWorld, steered)"
    grep -E 's wall' "$out/generate.log"
    echo "== device check: attention benchmark"
    sed -n '/^steer-bench attention/,$p' "$scratch/bench-attention.log"
    exit $status
    ;;
*)
    echo "usage: scripts/device-check.sh build|run" >&2
    exit 2
    ;;
esac
