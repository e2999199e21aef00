#!/usr/bin/env bash
# ShapesWorld's relation classifiers, made with the crate's own tools: render scenes with known
# relations, `steer collect` (dual inversion, SPEC section 5) on the shipped model, then
# `steer train` twice: on both prompts (the learned classifier) and on the true prompts only
# (single inversion: the linguistic-shortcut ablation). Writes the two checkpoints into
# assets/shapesworld/, from where the binary embeds them (src/shapes/model.rs).
#
#   cargo build --release && scripts/shapesworld/make_classifiers.sh
#
# Deviation from SPEC section 5, on purpose: plain DDIM inversion (--fixed-point-iters 0). On this
# pixel-space model it reconstructs at about 42 dB PSNR already, and it is 3.5x cheaper.
# Both workers are resumable: rerun the script after an interruption and finished shards are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEER=${STEER:-target/release/steer}
WORK=${WORK:-$HOME/.cache/steer/shapesworld-classifier}
COUNT=${COUNT:-256}
EPOCHS=${EPOCHS:-40}
MODEL=assets/shapesworld

"$STEER" shapes render --out "$WORK/images" --count "$COUNT" --seed 2 --png
# Two single-threaded workers: the model is small, so two processes use 2 cores better than one.
for i in 0 1; do
    RAYON_NUM_THREADS=1 "$STEER" collect --model "$MODEL" --manifest "$WORK/images/scenes.jsonl" \
        --out "$WORK/shards" --shard "$i/2" --fixed-point-iters 0 &
done
wait
train() {
    "$STEER" train --data "$WORK/shards" --out "$WORK/$1" \
        --model-config scripts/shapesworld/classifier.json --epochs "$EPOCHS" --lr 1e-3 --patience 10 "${@:2}"
}
train dual
train single --true-prompts-only
cp "$WORK/dual/best.safetensors" "$MODEL/classifier.safetensors"
cp "$WORK/single/best.safetensors" "$MODEL/classifier-single.safetensors"
echo "wrote $MODEL/classifier.safetensors and $MODEL/classifier-single.safetensors"
