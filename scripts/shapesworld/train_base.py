"""Train ShapesWorld's base text-to-image model: a pixel-space diffusers UNet2DConditionModel and a
CLIPTextModel, trained together from scratch on `steer shapes render` data, with captions whose
relation word is drawn at random, so that the model learns the objects but not where to put them
(the failure steering fixes). A one-off trainer (the crate ships its result); nothing at run time
or in CI needs it.

    target/release/steer shapes render --out ~/.cache/steer/shapesworld-data --count 150000 --seed 1
    $STEER_REF_VENV/bin/python scripts/shapesworld/train_base.py \
        --data ~/.cache/steer/shapesworld-data --work ~/.cache/steer/shapesworld-train \
        --steps 20000 --hours 2
    $STEER_REF_VENV/bin/python scripts/shapesworld/train_base.py --work ~/.cache/steer/shapesworld-train \
        --export assets/shapesworld

Resumable: every `--save-every` steps (and when `--hours` runs out, or on Ctrl-C) the model, its
EMA, the optimizer, the step and the random states are written atomically to `--work`/last.pt; a
rerun continues from there exactly. `--export` writes the EMA weights as a diffusers folder
(float16 safetensors; no vae/: the model is pixel space) that `steer` loads.

Choices (SHAPESWORLD.md records the prototype behind them):
- v-prediction: with epsilon prediction the white background never formed at high noise;
- linear betas 1e-4..0.02 (DDPM's pixel-space schedule; SD's scaled-linear one leaves 7% of the
  signal at t = 999, too much for 32x32 pixels), DDIM with "trailing" spacing at inference so
  sampling starts from t = 999;
- cross-attention at 16x16 and 8x8 only (full-resolution attention cost 1.8x per step on CPU);
- 10% empty captions, for classifier-free guidance;
- horizontal flips: the captions carry no position, so a flip is as good a sample as any.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "reference"))
from clip_vocab import SPECIAL_TOKENS_MAP, build_vocab, write_vocab_files  # noqa: E402

from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

IMAGE_SIZE = 32
MAX_LENGTH = 16  # the longest caption, "a green triangle to the right of a blue square", is 12 tokens
RELATIONS = ("above", "below", "to the left of", "to the right of")
WORDS = "a red green blue circle square triangle to the left right of above below".split()
TEXT_HIDDEN = 128

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=4,  # SD2.1's legacy key: the number of heads
    use_linear_projection=True,
)

TEXT_CONFIG = dict(
    hidden_size=TEXT_HIDDEN,
    intermediate_size=4 * TEXT_HIDDEN,
    projection_dim=TEXT_HIDDEN,
    # No transformer layers: each token's output is its own embedding (+ position, final
    # LayerNorm), so a word's cross-attention can only be attention to that word. With CLIP's
    # causal layers the later tokens and the end token also carry the earlier words, the UNet
    # read the objects from those, and the words' maps did not localise (the prototype's maps
    # were at chance, and so were ours after 1,000 steps with 3 layers).
    num_hidden_layers=0,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,  # SD2.1's legacy ids: transformers pools at argmax(ids), the end token
    pad_token_id=1,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=0,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
)


class Captions:
    """Every caption the trainer uses, tokenized once as CLIP does for SD2.1 (start, tokens, end,
    "!" padding to MAX_LENGTH)."""

    def __init__(self) -> None:
        self.vocab, self.merges = build_vocab(WORDS)
        self.bos, self.eos, self.pad = self.vocab["<|startoftext|>"], self.vocab["<|endoftext|>"], self.vocab["!"]

    def ids(self, text: str) -> list[int]:
        toks = [self.vocab[w + "</w>"] for w in text.split()]
        ids = [self.bos] + toks + [self.eos]
        assert len(ids) <= MAX_LENGTH, text
        return ids + [self.pad] * (MAX_LENGTH - len(ids))


def load_data(data: Path) -> tuple[np.ndarray, list[dict]]:
    images = np.fromfile(data / "images.u8", dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)
    scenes = [json.loads(line) for line in (data / "scenes.jsonl").read_text().splitlines() if line]
    assert len(scenes) == len(images), "images.u8 and scenes.jsonl disagree"
    return images, scenes


def build_models(vocab_size: int) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **TEXT_CONFIG))
    return unet, text


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    caps = Captions()
    images, scenes = load_data(Path(args.data).expanduser())
    subj_obj = [(s["subject"], s["object"]) for s in scenes]
    unet, text = build_models(len(caps.vocab))
    params = list(unet.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod.float()
    step = 0
    rng = np.random.default_rng(args.seed)
    ckpt = work / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        for e, v in zip(ema, state["ema"]):
            e.copy_(v)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    log = open(work / "log.jsonl", "a")

    def save() -> None:
        atomic_save({"unet": unet.state_dict(), "text": text.state_dict(), "ema": ema,
                     "opt": opt.state_dict(), "step": step, "rng": rng.bit_generator.state,
                     "torch_rng": torch.get_rng_state(), "words": WORDS}, ckpt)

    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    deadline = time.time() + args.hours * 3600
    t0, losses = time.time(), []
    unet.train()
    text.train()
    while step < args.steps and not stop["now"] and time.time() < deadline:
        idx = rng.integers(0, len(images), args.batch)
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        flip = torch.from_numpy(rng.random(args.batch) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        texts = []
        for i in idx:
            if rng.random() < args.uncond_p:
                texts.append("")
            else:
                s, o = subj_obj[i]
                texts.append(f"a {s} {RELATIONS[rng.integers(0, 4)]} a {o}")
        ids = torch.tensor([caps.ids(t) for t in texts])
        t = torch.from_numpy(rng.integers(0, 1000, args.batch))
        noise = torch.randn_like(x)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        noisy = a * x + s * noise
        target = a * noise - s * x
        ctx = text(ids).last_hidden_state
        pred = unet(noisy, t, ctx).sample
        loss = F.mse_loss(pred, target)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % args.log_every == 0:
            rate = args.log_every / (time.time() - t0)
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": lr, "steps_per_s": rate}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            t0, losses = time.time(), []
        if step % args.save_every == 0:
            save()
    save()
    print(f"saved step {step} to {ckpt}", flush=True)


def export(args) -> None:
    work = Path(args.work).expanduser()
    state = torch.load(work / "last.pt", weights_only=False)
    caps = Captions()
    unet, text = build_models(len(caps.vocab))
    params = list(unet.parameters()) + list(text.parameters())
    with torch.no_grad():
        for p, e in zip(params, state["ema"]):
            p.copy_(e)
    out = Path(args.export)
    out.mkdir(parents=True, exist_ok=True)
    unet.half().save_pretrained(out / "unet", safe_serialization=True)
    text.half().save_pretrained(out / "text_encoder", safe_serialization=True)
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    tok = out / "tokenizer"
    write_vocab_files(tok, caps.vocab, caps.merges)
    (tok / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": MAX_LENGTH, "do_lower_case": True, **SPECIAL_TOKENS_MAP}, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
        "shapesworld": {"trained_steps": state["step"], "words": WORDS},
    }, indent=2) + "\n")
    print(f"exported step {state['step']} (EMA) to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="checkpoint folder (outside the repo)")
    ap.add_argument("--data", help="a `steer shapes render` folder (training)")
    ap.add_argument("--export", help="write the EMA weights as a diffusers folder here and exit")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--hours", type=float, default=1e9, help="stop (and save) after this long")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--uncond-p", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=250)
    args = ap.parse_args()
    if args.export:
        export(args)
    elif args.data:
        train(args)
    else:
        ap.error("give --data (train) or --export")


if __name__ == "__main__":
    main()
