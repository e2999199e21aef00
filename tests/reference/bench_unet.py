"""PyTorch CPU baseline for `steer-bench unet`: the full-size SD2.1-base UNet, fp32, batch 1.

    python tests/reference/bench_unet.py --threads 2 [--repeats 2] [--warmup 1]
        [--cache ~/.cache/steer/bench] [--model DIR] [--timestep 500] [--words '[[2], [5, 6]]']
        [--turns]

With --turns (steer-bench passes it) the script prints READY and waits for a line on stdin before
each call it makes (warm-ups included) and once more before its closing work, so that steer-bench
alternates its calls with ours and the two never compute at the same time.

Two cases, both on the conditional pass alone (no classifier-free guidance):
  forward   `unet(sample, t, encoder_hidden_states=context).sample` under torch.no_grad(), with
            diffusers' default attention processors (AttnProcessor2_0: SDPA) everywhere;
  capture   the same forward with a processor on every cross-attention layer (attn2) that
            materialises softmax(q k^T * scale) (attn1 keeps the default SDPA processor), the maps
            of ../shared/SPEC.md section 3 built from those probabilities (each word's mean over its
            tokens, bilinear resize to 16x16 with align_corners=False, divided by sum + 1e-8;
            grouped by resolution ascending, call order inside one), then autograd of
            sum(maps * cotangent) to the sample (requires_grad on the sample only, weights frozen).

The model: `--model DIR` (any diffusers unet/ folder), else random weights (seeded; see
`randomise`) with stable-diffusion-2-1-base's UNet config (CONFIG below), written once with
save_pretrained to CACHE/sd21-unet-random (fp32: 3.5 GB) and loaded from there on later runs, so
steer-bench loads the very same weights.

Files, in CACHE (steer-bench reads both; they follow `steer forward`'s input/output names, so
`steer forward --component unet --inputs CACHE/unet-inputs.safetensors` works on them too):
  unet-inputs.safetensors         sample (1,4,64,64), timestep (1,) int64,
                                  encoder_hidden_states (1,77,1024), capture_tokens_0/_1 (int64),
                                  maps_cotangent (2,N,16,16); float32, seeded, rewritten each run
  unet-torch-outputs.safetensors  out (1,4,64,64) (forward case), maps (2,N,16,16),
                                  sample_grad (1,4,64,64) (capture case)

Prints one JSON object on stdout (progress goes to stderr):
  {"torch": ..., "diffusers": ..., "threads": ..., "model_dir": ..., "model_source": ...,
   "inputs": PATH, "outputs": PATH, "maps_per_word": N, "capture_vs_sdpa_out_rel_err": ...,
   "cases": [{"name": "forward"|"capture", "times_s": [...], "median_s": ..., "min_s": ...,
              "cpu_median_s": ... (process CPU time, user + sys of all threads, per call),
              "peak_rss_gib": ..., "rss_before_gib": ..., (capture: "forward_median_s",
              "backward_median_s", "forward_min_s", "backward_min_s")}, ...],
   "maxrss_gib": ...}
Memory: `peak_rss_gib` is the process's resident-set high-water mark (VmHWM) over the case's
warm-up and timed calls, reset just before the case (/proc/self/clear_refs), so it includes the
resident weights but not the model loading; `maxrss_gib` is getrusage's whole-process peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

# stable-diffusion-2-1-base's unet/config.json (diffusers reads attention_head_dim as the number
# of heads per block: 5, 10, 20, 20 heads of dimension 64).
CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
RANDOM_DIR = "sd21-unet-random"
INPUTS = "unet-inputs.safetensors"
OUTPUTS = "unet-torch-outputs.safetensors"
MAP_SIZE = 16
TEXT_TOKENS = 77
GIB = 2.0 ** 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# memory

def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def peak_rss_gib() -> float:
    hwm = status_kib("VmHWM")
    return hwm * 1024 / GIB if hwm is not None else maxrss_gib()


def rss_gib() -> float | None:
    rss = status_kib("VmRSS")
    return rss * 1024 / GIB if rss is not None else None


# ---------------------------------------------------------------------------------------------
# the model

def randomise(model, seed: int) -> None:
    """Re-draw every parameter so that activations stay O(1) and nothing is zero (diffusers zeroes
    some output projections at init): Linear/Conv weights N(0, 1/fan_in), their biases
    N(0, 0.1^2); GroupNorm/LayerNorm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()

    def draw(p, std: float, mean: float = 0.0) -> None:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)
        seen.add(id(p))

    for _, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            draw(m.weight, 1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                draw(m.bias, 0.1)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            draw(m.weight, 0.1, 1.0)
            draw(m.bias, 0.1)
    missed = [n for n, p in model.named_parameters() if id(p) not in seen]
    assert not missed, f"parameters not re-drawn: {missed}"


def random_model(cache: Path, seed: int):
    """The random-weight SD2.1 UNet: loaded from CACHE/sd21-unet-random, or built and saved
    there (into a temporary folder renamed at the end, so a partial write is never used)."""
    import torch
    from diffusers import UNet2DConditionModel

    path = cache / RANDOM_DIR
    if (path / "config.json").exists() and (path / "diffusion_pytorch_model.safetensors").exists():
        saved = json.loads((path / "config.json").read_text())
        diff = {k: (saved.get(k), v) for k, v in CONFIG.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(f"{path} holds a UNet with another config ({diff}): delete the "
                             "folder to rebuild it")
        log(f"loading the random-weight UNet from {path} ...")
        unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.float32)
        return unet, path, "cached random weights"
    log(f"building the random-weight SD2.1 UNet (seed {seed}) ...")
    unet = UNet2DConditionModel(**CONFIG).float()
    randomise(unet, seed)
    tmp = cache / f"{RANDOM_DIR}.tmp-{os.getpid()}"
    log(f"saving it to {path} (3.5 GB, once) ...")
    unet.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return unet, path, "random weights, built now"


# ---------------------------------------------------------------------------------------------
# map capture (SPEC section 3, SD2.1)

class CaptureAttnProcessor:
    """attn2 written out: probs = softmax(q k^T * scale) over all 77 text tokens, per head,
    stored (batch, heads, H*W, 77) in call order with the autograd graph."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        import torch

        assert encoder_hidden_states is not None and attention_mask is None
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        assert attn.norm_cross is None and not attn.residual_connection
        assert attn.rescale_output_factor == 1.0
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        h = attn.heads
        d = q.shape[-1] // h
        q = q.view(b, n, h, d).transpose(1, 2)
        k = k.view(b, -1, h, d).transpose(1, 2)
        v = v.view(b, -1, h, d).transpose(1, 2)
        probs = (torch.matmul(q, k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        self.store.append(probs)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


def word_maps(captured: list, words: list[list[int]]):
    """(words, N, 16, 16) from the conditional probabilities of every attn2 layer."""
    import torch
    import torch.nn.functional as F

    by_res: dict[int, list] = {}
    for probs in captured:
        assert probs.shape[0] == 1
        res = math.isqrt(probs.shape[2])
        assert res * res == probs.shape[2]
        by_res.setdefault(res, []).append(probs[0])
    out = []
    for toks in words:
        per_res = []
        for res in sorted(by_res):
            m = torch.cat([p[:, :, toks].mean(dim=-1).reshape(-1, res, res) for p in by_res[res]])
            m = F.interpolate(m[:, None], size=(MAP_SIZE, MAP_SIZE), mode="bilinear",
                              align_corners=False)[:, 0]
            per_res.append(m / (m.sum(dim=(-2, -1), keepdim=True) + 1e-8))
        out.append(torch.cat(per_res))
    return torch.stack(out)


def maps_per_word(unet) -> int:
    """N: the heads of every attn2 layer together (195 for SD2.1)."""
    return sum(m.heads for name, m in unet.named_modules() if name.endswith(".attn2"))


# ---------------------------------------------------------------------------------------------
# timing

def turn(enabled: bool) -> None:
    """The pause before each call: with --turns, READY on stdout, then wait for a line."""
    if enabled:
        print("READY", flush=True)
        if not sys.stdin.readline():
            raise SystemExit("steer-bench closed the turns")


def summary(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/steer/bench")
    ap.add_argument("--model", type=Path, help="a diffusers unet/ folder (default: random weights)")
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--words", default="[[2], [5, 6]]", help="JSON list of token index lists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--turns", action="store_true", help="alternate calls with steer-bench")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    # Before torch loads its OpenMP runtime.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    words = json.loads(args.words)
    args.cache.mkdir(parents=True, exist_ok=True)
    outputs_path = args.cache / OUTPUTS
    outputs_path.unlink(missing_ok=True)  # never leave stale results for steer-bench to compare

    t0 = time.perf_counter()
    if args.model is not None:
        log(f"loading the UNet from {args.model} ...")
        unet = UNet2DConditionModel.from_pretrained(args.model, torch_dtype=torch.float32)
        model_dir, source = args.model, "--model"
    else:
        unet, model_dir, source = random_model(args.cache, args.seed)
    unet = unet.float().eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    log(f"model ready in {load_s:.1f} s ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M "
        "parameters)")
    gc.collect()

    # ---- inputs, seeded; shared with steer-bench through the inputs file
    cfg = unet.config
    size = cfg.sample_size
    n_maps = maps_per_word(unet)
    g = torch.Generator().manual_seed(args.seed + 1)
    sample = torch.randn(1, cfg.in_channels, size, size, generator=g)
    context = torch.randn(1, TEXT_TOKENS, cfg.cross_attention_dim, generator=g)
    cot = torch.randn(len(words), n_maps, MAP_SIZE, MAP_SIZE, generator=g)
    timestep = torch.tensor([args.timestep], dtype=torch.int64)
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context,
              "maps_cotangent": cot}
    for i, toks in enumerate(words):
        inputs[f"capture_tokens_{i}"] = torch.tensor(toks, dtype=torch.int64)
    inputs_path = args.cache / INPUTS
    tmp = inputs_path.with_suffix(".tmp")
    save_file(inputs, str(tmp))
    os.replace(tmp, inputs_path)

    sdpa = dict(unet.attn_processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in sdpa.values()), \
        "expected diffusers' default SDPA processors"
    store: list = []
    capture = {name: (CaptureAttnProcessor(store) if ".attn2." in name else p)
               for name, p in sdpa.items()}

    def forward():
        with torch.no_grad():
            return unet(sample, timestep, encoder_hidden_states=context).sample

    def capture_forward():
        store.clear()
        x = sample.clone().requires_grad_(True)
        unet(x, timestep, encoder_hidden_states=context)
        maps = word_maps(store, words)
        store.clear()
        return x, maps

    def capture_backward(x, maps):
        (grad,) = torch.autograd.grad((maps * cot).sum(), x)
        return grad

    cases = []
    results = {}
    can_reset = reset_peak_rss()

    # ---- forward
    gc.collect()
    rss0 = rss_gib()
    reset_peak_rss()
    for i in range(args.warmup):
        turn(args.turns)
        t = time.perf_counter()
        forward()
        log(f"torch forward warm-up {i + 1}/{args.warmup}: {time.perf_counter() - t:.2f} s")
    times, cpu = [], []
    for i in range(args.repeats):
        turn(args.turns)
        c = time.process_time()
        t = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        log(f"torch forward {i + 1}/{args.repeats}: {times[-1]:.2f} s")
    med, mn = summary(times)
    cases.append({"name": "forward", "times_s": times, "median_s": med, "min_s": mn,
                  "cpu_median_s": statistics.median(cpu),
                  "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss0})
    results["out"] = out.contiguous()

    # ---- capture: forward with maps, backward to the sample
    unet.set_attn_processor(capture)
    gc.collect()
    rss0 = rss_gib()
    reset_peak_rss()
    for i in range(args.warmup):
        turn(args.turns)
        t = time.perf_counter()
        capture_backward(*capture_forward())
        log(f"torch capture warm-up {i + 1}/{args.warmup}: {time.perf_counter() - t:.2f} s")
    fwd, bwd, total, cpu = [], [], [], []
    for i in range(args.repeats):
        turn(args.turns)
        c = time.process_time()
        t = time.perf_counter()
        x, maps = capture_forward()
        t1 = time.perf_counter()
        grad = capture_backward(x, maps)
        t2 = time.perf_counter()
        fwd.append(t1 - t)
        bwd.append(t2 - t1)
        total.append(t2 - t)
        cpu.append(time.process_time() - c)
        log(f"torch capture {i + 1}/{args.repeats}: {total[-1]:.2f} s "
            f"(forward {fwd[-1]:.2f} s, backward {bwd[-1]:.2f} s)")
        if i + 1 < args.repeats:
            del x, maps, grad
    med, mn = summary(total)
    cases.append({"name": "capture", "times_s": total, "median_s": med, "min_s": mn,
                  "cpu_median_s": statistics.median(cpu),
                  "forward_median_s": summary(fwd)[0], "forward_min_s": summary(fwd)[1],
                  "backward_median_s": summary(bwd)[0], "backward_min_s": summary(bwd)[1],
                  "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss0})
    results["maps"] = maps.detach().contiguous()
    results["sample_grad"] = grad.contiguous()

    turn(args.turns)  # the closing work below must not overlap ours
    # The capture processor must not change the prediction.
    with torch.no_grad():
        store.clear()
        out_capture = unet(sample, timestep, encoder_hidden_states=context).sample
        store.clear()
    unet.set_attn_processor(sdpa)
    capture_vs_sdpa = ((out_capture - results["out"]).abs().max()
                       / results["out"].abs().max()).item()

    tmp = outputs_path.with_suffix(".tmp")
    save_file(results, str(tmp), metadata={"torch": torch.__version__,
                                           "diffusers": diffusers.__version__})
    os.replace(tmp, outputs_path)

    json.dump({
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "model_dir": str(model_dir),
        "model_source": source,
        "load_s": load_s,
        "inputs": str(inputs_path),
        "outputs": str(outputs_path),
        "timestep": args.timestep,
        "words": words,
        "maps_per_word": n_maps,
        "capture_vs_sdpa_out_rel_err": capture_vs_sdpa,
        "peak_reset": can_reset,
        "cases": cases,
        "maxrss_gib": maxrss_gib(),
    }, sys.stdout)
    print()


if __name__ == "__main__":
    main()
