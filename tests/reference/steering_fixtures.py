"""Write the steering-loop fixture: one optimised denoising step on the tiny SD2.1 model, in
PyTorch, as the reference's TestTimeOptimization.refine_latents does it (SPEC section 6):

    tests/fixtures/classifier-tiny-sd21.safetensors  a relation classifier for the tiny UNet's
                                                     N = 34 maps per word (random weights, the
                                                     reference's own model class, converted)
    tests/fixtures/steering-reference.safetensors    the latent before and after each pass

    $STEER_REF_VENV/bin/python tests/reference/steering_fixtures.py [--repo PATH]

Our re-implementation of the loop (read from pipelines/test_time_optimization.py,
`refine_latents`, `compute_loss`, `update_latents`, and pipelines/sd/sd2_test_time_optimization.py,
`denoise`): for pass i = 0..max_refinements, run the UNet on z with the conditional prompt
embedding only, capture every cross-attention layer's maps of the two words (SPEC section 3 via
sd21_fixtures.word_maps), classifier(maps, bucket(step)), loss = cross-entropy against the
requested relation; if loss > target: z <- z - step_size * dloss/dz. Here max_refinements = 2 and
the target 0, so exactly three passes each move the latent ("the latent after 3 passes").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classifier_fixtures import DEFAULT_REPO, git_show, import_reference, randomize  # noqa: E402
from fixtures import FIXTURES, REPO, randn, save_fixture, setup_determinism  # noqa: E402
from sd21_fixtures import OUT, PROMPT, set_capture, word_maps  # noqa: E402

N = 34  # the tiny UNet's maps per word (tests/fixtures/tiny-sd21)
D_MODEL = 16  # as classifier_fixtures.py: small enough to commit; SD2.1's other sizes
REL_NAME_TO_IDX = {"above": 0, "below": 1, "to the left of": 2, "to the right of": 3}
TOKENS = ([5], [11, 12])  # "dog" and "teddy bear" in PROMPT
STEP_INDEX = 3  # denoising step 3 of 50: classifier bucket 5, timestep 921
TIMESTEP = 921
TARGET = "to the right of"  # the prompt says left: the loss is large
STEP_SIZE = 2000.0  # SD2.1 uses 5; larger here so each move is far above f32 rounding
PASSES = 3
BUCKETS = [5, 10, 15, 20, 25, 49]


def bucket(i: int) -> int:
    return next(b for b in BUCKETS if i <= b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=os.environ.get("STEER_L2S_REPO", DEFAULT_REPO))
    args = ap.parse_args()
    setup_determinism(0)
    from diffusers import UNet2DConditionModel  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ref_model, ref_utils = import_reference(args.repo, tmp)
        full = yaml.safe_load(git_show(args.repo, "train_relation_classifier/configs/sd2_config.yaml"))
        config, training = full["model"], full["training"]
        config["d_model"] = D_MODEL
        idx_to_rel = {i: n for n, i in REL_NAME_TO_IDX.items()}
        model = ref_model.EnhancedRelationClassifier(REL_NAME_TO_IDX, idx_to_rel, N, config, training)
        randomize(model)
        model.eval()
        pth = tmp / "final_model.pth"
        ref_utils.save_model(model, str(pth))
        out = FIXTURES / "classifier-tiny-sd21.safetensors"
        subprocess.run([sys.executable, str(REPO / "scripts" / "convert_classifier.py"), str(pth), str(out)], check=True)
        classifier = ref_utils.load_model(str(pth), device_name="cpu").float().eval()
        for p in classifier.parameters():
            p.requires_grad_(False)

    unet = UNet2DConditionModel.from_pretrained(OUT / "unet", dtype=torch.float32).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    with safe_open(str(FIXTURES / "tiny-sd21-reference.safetensors"), framework="pt") as f:
        cond = f.get_tensor("text.last_hidden_state")
    store: list = []
    set_capture(unet, store)

    z = randn("steering.z", 1, 4, 16, 16).float()
    T = {"steering.z": z.clone(), "steering.timestep": torch.tensor([TIMESTEP]),
         "steering.capture_tokens_0": torch.tensor(TOKENS[0]), "steering.capture_tokens_1": torch.tensor(TOKENS[1])}
    target = torch.tensor([REL_NAME_TO_IDX[TARGET]])
    step = torch.tensor([[float(bucket(STEP_INDEX))]])
    for i in range(PASSES):
        store.clear()
        x = z.clone().requires_grad_(True)
        unet(x, TIMESTEP, encoder_hidden_states=cond)
        maps, _ = word_maps(store, [list(TOKENS[0]), list(TOKENS[1])])
        logits = classifier(maps[None], step)
        loss = torch.nn.functional.cross_entropy(logits, target)
        (grad,) = torch.autograd.grad(loss, x)
        z = (x - STEP_SIZE * grad).detach()
        T[f"steering.loss{i}"] = loss.detach().reshape(1)
        T[f"steering.z{i + 1}"] = z.clone()
        print(f"pass {i}: loss {loss.item():.4f}, |grad| {grad.norm().item():.3e}, probs {logits.softmax(-1).detach().numpy().round(3)}")
    save_fixture("steering-reference", T, {
        "prompt": PROMPT,
        "target": TARGET,
        "step_index": str(STEP_INDEX),
        "classifier_step": str(bucket(STEP_INDEX)),
        "step_size": str(STEP_SIZE),
        "classes": json.dumps(list(REL_NAME_TO_IDX)),
        "passes": str(PASSES),
    })


if __name__ == "__main__":
    main()
