"""Write the relation-classifier fixtures with the reference implementation's own model code:

    tests/fixtures/classifier-sd.safetensors         the converted classifier (random weights)
    tests/fixtures/classifier-reference.safetensors  inputs, logits and gradients from PyTorch

    $STEER_REF_VENV/bin/python tests/reference/classifier_fixtures.py [--repo PATH]

`--repo` (or $STEER_L2S_REPO) is the reference repository sapir1779/learn-to-steer: a checkout, or
a bare git directory (default /work/.mirror/sapir1779+learn-to-steer/repo). Its
train_relation_classifier/{model,model_utils}.py and configs/sd2_config.yaml are read with
`git show` into a temporary folder and imported from there: nothing of it is committed here.

The model is EnhancedRelationClassifier with sd2_config.yaml's `model` section, except d_model 16
(the real 256 gives about 2 M parameters, 8 MB: too big for a committed fixture; every other size,
the head counts, layers, FF widths and the step-embedding mode are SD2.1's), N = 6 maps per word
and 5 classes (the four relations plus the reference data's `is`, in a non-alphabetical index
order). Every parameter is redrawn from a seeded generator so that nothing is trivially 0 or 1
(PyTorch initialises the attention biases to 0 and the LayerNorms to 1 and 0). The checkpoint is
saved with the reference's own `save_model` (as train.py does) and converted with
scripts/convert_classifier.py.

Reference tensors (`classifier-reference.safetensors`):
  maps (3, 2, 6, 16, 16) f64     positive, each 16x16 map summing to 1 (like real maps)
  steps (3) i64                  the step index the embeddings read: [5, 25, 49]
  logits (3, 5) f64              the model in eval mode, float64 (model.double(): the float32
                                 weights widened exactly), on `maps`
  logits_cotangent (3, 5) f64
  maps_grad f64                  d sum(logits * logits_cotangent) / d maps, float64 autograd
  logits_f32, maps_grad_f32 f32  the same in float32, on `maps` rounded to float32
  (metadata) bf16_vs_f64.*       how far PyTorch's bfloat16 run is from logits and maps_grad
  grad.<param> f64               d sum(logits * cot) / d param for a selection of parameters
  grad_l2, grad_sum (P) f64      the L2 norm and the sum of every parameter's gradient, in
                                 `parameter_order` (metadata: named_parameters() order)
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
from fixtures import FIXTURES, REPO, randn, save_fixture, setup_determinism  # noqa: E402

DEFAULT_REPO = "/work/.mirror/sapir1779+learn-to-steer/repo"
N = 6
D_MODEL = 16
B = 3
STEPS = [5, 25, 49]
# Non-alphabetical on purpose: the Rust side must order classes by index, not by name.
REL_NAME_TO_IDX = {"to the left of": 0, "above": 1, "to the right of": 2, "below": 3, "is": 4}
GRADS = [
    "object_extractor.input_projection.weight",
    "object_extractor.query_vector",
    "object_extractor.layer_attention.in_proj_weight",
    "object_extractor.timestep_embedding.weight",
    "object_extractor.transformer.layers.1.norm2.weight",
    "object_extractor.transformer.layers.0.self_attn.in_proj_bias",
    "relation_classifier.fc.8.weight",
    "relation_classifier.fc.5.bias",
    "relation_classifier.timestep_embedding.weight",
    "relation_classifier.transformer.layers.0.self_attn.in_proj_weight",
]


def git_show(repo: str, path: str) -> str:
    """A file of the reference repository: from a checkout if `repo` has it, else `git show`."""
    direct = Path(repo) / path
    if direct.is_file():
        return direct.read_text()
    return subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def import_reference(repo: str, tmp: Path):
    pkg = tmp / "train_relation_classifier"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("model.py", "model_utils.py"):
        (pkg / name).write_text(git_show(repo, f"train_relation_classifier/{name}"))
    sys.path.insert(0, str(tmp))
    from train_relation_classifier import model, model_utils  # noqa: PLC0415
    return model, model_utils


def randomize(model: torch.nn.Module) -> None:
    """Redraw every parameter (seeded per name): weights ~ N(0, 1/fan_in), LayerNorm scales
    1 + N(0, 0.2^2), biases N(0, 0.2^2), embeddings and the query vector N(0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            case = f"classifier/{name}"
            if "embedding" in name or name.endswith("query_vector"):
                p.copy_(randn(case, *p.shape))
            elif p.dim() >= 2:
                p.copy_(randn(case, *p.shape, scale=p.shape[-1] ** -0.5))
            elif name.endswith("weight"):  # LayerNorm scales
                p.copy_(1 + randn(case, *p.shape, scale=0.2))
            else:
                p.copy_(randn(case, *p.shape, scale=0.2))


def random_maps() -> torch.Tensor:
    """Positive maps, each summing to 1 over its 16x16 pixels, with a blob-like peak."""
    logits = randn("classifier/maps", B, 2, N, 256, scale=2.0)
    return torch.softmax(logits, dim=-1).reshape(B, 2, N, 16, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=os.environ.get("STEER_L2S_REPO", DEFAULT_REPO))
    args = ap.parse_args()
    setup_determinism(0)

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
        # The reference's own loader must read it back unchanged.
        loaded = ref_utils.load_model(str(pth), device_name="cpu")
        for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert ka == kb and torch.equal(a, b), ka

        out = FIXTURES / "classifier-sd.safetensors"
        subprocess.run([sys.executable, str(REPO / "scripts" / "convert_classifier.py"),
                        str(pth), str(out)], check=True)
        print(f"{out.relative_to(REPO)}: {out.stat().st_size / 1024:.1f} KiB")
        from safetensors import safe_open  # noqa: PLC0415
        with safe_open(str(out), framework="pt") as f:
            assert set(f.keys()) == set(model.state_dict()), "converted names differ"
            for k, v in model.state_dict().items():
                assert torch.equal(f.get_tensor(k), v.float()), k
            meta = f.metadata()
        assert json.loads(meta["classes"]) == list(REL_NAME_TO_IDX), meta["classes"]

        maps = random_maps()
        steps = torch.tensor(STEPS, dtype=torch.int64)
        cot = randn("classifier/cotangent", B, len(REL_NAME_TO_IDX))
        order = [n for n, _ in model.named_parameters()]

        # float64: the float32 weights widened exactly.
        m64 = ref_utils.load_model(str(pth), device_name="cpu").double().eval()
        x = maps.clone().requires_grad_(True)
        logits = m64(x, steps.unsqueeze(1))
        (logits * cot).sum().backward()
        grads = dict(m64.named_parameters())
        with torch.no_grad():  # eval under no_grad takes PyTorch's fused fast path: same math
            fast = m64(maps, steps.unsqueeze(1))
        err = ((fast - logits).abs().max() / logits.abs().max()).item()
        assert err < 1e-12, err

        # float32, on the maps rounded to float32.
        m32 = ref_utils.load_model(str(pth), device_name="cpu").float().eval()
        x32 = maps.float().requires_grad_(True)
        logits32 = m32(x32, steps.unsqueeze(1))
        (logits32 * cot.float()).sum().backward()
        e32 = ((logits32.double() - logits).abs().max() / logits.abs().max()).item()
        g32 = ((x32.grad.double() - x.grad).abs().max() / x.grad.abs().max()).item()
        print(f"float32 vs float64 reference: logits {e32:.2e}, maps_grad {g32:.2e}")

        # bfloat16 (the CUDA backend's precision) on `maps` rounded to bfloat16: how far PyTorch's
        # own bf16 run lands from float64, the scale of the GPU tests' tolerances.
        m16 = ref_utils.load_model(str(pth), device_name="cpu").bfloat16().eval()
        x16 = maps.bfloat16().requires_grad_(True)
        logits16 = m16(x16, steps.unsqueeze(1))
        (logits16 * cot.bfloat16()).sum().backward()
        e16 = ((logits16.double() - logits).abs().max() / logits.abs().max()).item()
        g16 = ((x16.grad.double() - x.grad).abs().max() / x.grad.abs().max()).item()
        print(f"bfloat16 vs float64 reference: logits {e16:.2e}, maps_grad {g16:.2e}")

        tensors = {
            "maps": maps,
            "steps": steps,
            "logits": logits.detach(),
            "logits_cotangent": cot,
            "maps_grad": x.grad.detach(),
            "logits_f32": logits32.detach(),
            "maps_grad_f32": x32.grad.detach(),
            "grad_l2": torch.stack([grads[n].grad.norm() for n in order]).detach(),
            "grad_sum": torch.stack([grads[n].grad.sum() for n in order]).detach(),
        }
        for name in GRADS:
            g = grads[name].grad
            assert g is not None and g.abs().max() > 0, name
            tensors[f"grad.{name}"] = g.detach()
        print("logits:", logits.detach())
        save_fixture("classifier-reference", tensors, {
            "parameter_order": json.dumps(order),
            "classes": json.dumps(list(REL_NAME_TO_IDX)),
            "config": json.dumps(config, sort_keys=True),
            "input_channels": N,
            "f32_vs_f64.logits": f"{e32:.3e}",
            "f32_vs_f64.maps_grad": f"{g32:.3e}",
            "bf16_vs_f64.logits": f"{e16:.3e}",
            "bf16_vs_f64.maps_grad": f"{g16:.3e}",
        })


if __name__ == "__main__":
    main()
