"""Write the tiny Stable Diffusion 2.1 fixtures: two diffusers pipeline directories with
random-weight models that have SD2.1's real block structure, and PyTorch's outputs on them.

    $STEER_REF_VENV/bin/python tests/reference/sd21_fixtures.py

Outputs (all committed; nothing at test or CI time needs Python):
  tests/fixtures/tiny-sd21/      a diffusers directory, as `StableDiffusionPipeline.save_pretrained`
                                 writes it (model_index.json, unet/, text_encoder/, vae/, tokenizer/,
                                 scheduler/), weights as float16 safetensors; DDIM, epsilon
                                 (the scheduler config of stable-diffusion-2-1-base).
  tests/fixtures/tiny-sd21-v/    the same weights; DDIM with prediction_type "v_prediction", the
                                 UNet config says upcast_attention true (as stable-diffusion-2-1's),
                                 and the text encoder's keys have the `text_model.` prefix (as
                                 SD2.1's own files; transformers 5 writes them without).
  tests/fixtures/tiny-sd21-reference.safetensors
                                 inputs and PyTorch's float32 results (ids and timesteps int64):
    text.input_ids (1,77)  text.last_hidden_state (1,77,32)  text.pooler_output (1,32)
    text.uncond_input_ids (1,77)  text.uncond_hidden_state (1,77,32)  (the negative prompt "")
        PROMPT tokenized and padded to 77 with "!" (id 0), through the text encoder.
    unet.sample (1,4,16,16)  unet.timestep (1,) = 501  unet.encoder_hidden_states (1,77,32)
        (= text.last_hidden_state)  unet.out (1,4,16,16)
    maps.capture_tokens_0 / _1 (token index lists of "dog" and "teddy bear")
    maps.maps (2,N,16,16): SPEC section 3's maps on the unet.* inputs (conditional pass alone);
        metadata `maps.layer_order` (JSON list of [layer, resolution, heads], in map order)
    maps.cotangent (2,N,16,16)  maps.sample_grad (1,4,16,16) = d sum(maps * cotangent) / d sample
    vae.image (1,3,32,32) in [-1,1] -> vae.encoded_mean (1,4,16,16) (latent_dist.mean, unscaled)
    vae.latent (1,4,8,8) -> vae.decoded (1,3,16,16) (no scaling factor applied)
    ddim.init_latents, ddim.latents_step{0,1,2}, ddim.final_latents (1,4,16,16), ddim.timesteps (3,):
        StableDiffusionPipeline on tiny-sd21, 3 DDIM steps, CFG 7.5, negative prompt "", eta 0
    ddim_v.*: the same on tiny-sd21-v (v-prediction)
    inv.z0 (1,4,16,16), inv.timesteps (3,) = [1, 334, 667], inv.plain_z{t} and
        inv.fixed_point_z{t} for t in inv.timesteps (the latent at timestep t after that step; the
        last is the final one): DDIM inversion on tiny-sd21, see `invert`

The models are built in float32, every parameter is re-drawn at random (diffusers zeroes some
output projections at init), then rounded to float16 and cast back, so the float32 models that
record the references hold exactly the values stored in the float16 files. The references are
computed on the pipelines loaded back from the written directories (`from_pretrained(..., dtype=
torch.float32)`), after checking that they hold those same values.

Deterministic: fixed seeds (each tensor from its own generator, `fixtures.case_generator`), one
thread, deterministic algorithms; running the script twice writes the same bytes.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clip_vocab import SPECIAL_TOKENS_MAP, build_vocab, write_vocab_files  # noqa: E402
from fixtures import FIXTURES, case_generator, randn, save_fixture, setup_determinism  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

OUT = FIXTURES / "tiny-sd21"
OUT_V = FIXTURES / "tiny-sd21-v"
REFERENCE = "tiny-sd21-reference"  # tests/fixtures/<REFERENCE>.safetensors

PROMPT = "a photo of a dog to the left of a teddy bear"
CAPTURE_WORDS = ("dog", "teddy bear")
MAP_SIZE = 16
UNET_TIMESTEP = 501
DDIM_STEPS = 3
GUIDANCE = 7.5
INV_STEPS = 3
INV_FIXED_POINT_ITERS = 5
# Gain of the UNet's to_q/to_k weights: maps with structure (a map's max is typically ~4x its
# mean) that float32 still computes well (maps within ~4e-6 of float64). At 2.0 the maps' float32
# error grows to ~1e-4, as large as the tests' tolerance.
QK_GAIN = 1.5

# ---------------------------------------------------------------------------------------------
# configs: SD2.1's block structure, tiny sizes

TEXT_HIDDEN = 32

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(8, 16, 16, 32),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=4,
    norm_eps=1e-5,
    cross_attention_dim=TEXT_HIDDEN,
    # SD2.1's legacy key: diffusers reads `attention_head_dim` as the number of HEADS per block
    # (num_attention_heads = num_attention_heads or attention_head_dim); head dim = channels / heads.
    attention_head_dim=(2, 2, 2, 4),
    dual_cross_attention=False,
    use_linear_projection=True,
    upcast_attention=False,  # stable-diffusion-2-1-base; the -v directory says true (2-1 768)
    num_class_embeds=None,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)

SCHEDULER_CONFIG = dict(  # stable-diffusion-2-1-base's, as a DDIMScheduler
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

# ---------------------------------------------------------------------------------------------
# tokenizer: CLIP's byte-level BPE with a tiny vocabulary

# Words that get merges all the way to one token each ("<word></w>"); any other text still
# tokenizes, byte by byte.
TOKENIZER_WORDS = (
    "a photo of dog cat red circle to the left right above below teddy bear "
    "on top under side blue green square"
).split()


def build_tokenizer(tmp: Path) -> CLIPTokenizer:
    vocab, merges = build_vocab(TOKENIZER_WORDS)
    write_vocab_files(tmp, vocab, merges)
    tok = CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"),
                        pad_token="!", model_max_length=77)
    assert tok.pad_token_id == 0 and tok.eos_token_id == len(vocab) - 1 and tok.bos_token_id == len(vocab) - 2
    for w in TOKENIZER_WORDS:
        assert tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids) == [w + "</w>"], w
    return tok


# ---------------------------------------------------------------------------------------------
# random weights

def randomise(model: nn.Module, case: str, qk_gain: float = 1.0) -> None:
    """Re-draw every parameter of `model` so that activations stay O(1) and nothing is zero:
    Linear/Conv weights N(0, gain^2 / fan_in), their biases N(0, 0.1^2); GroupNorm/LayerNorm
    weights 1 + N(0, 0.1^2), biases N(0, 0.1^2); embeddings N(0, 0.5^2). Attention to_q/to_k (and
    CLIP's q_proj/k_proj) get `qk_gain` so the cross-attention maps are not near uniform.
    Then every value is rounded to float16 (and kept in float32)."""
    g = case_generator("weights/" + case)
    seen: set[int] = set()

    def draw(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)
        seen.add(id(p))

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            leaf = name.rsplit(".", 1)[-1]
            gain = qk_gain if leaf in ("to_q", "to_k", "q_proj", "k_proj") else 1.0
            draw(m.weight, gain / math.sqrt(fan_in))
            if m.bias is not None:
                draw(m.bias, 0.1)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            draw(m.weight, 0.1, 1.0)
            draw(m.bias, 0.1)
        elif isinstance(m, nn.Embedding):
            draw(m.weight, 0.5)
    missed = [n for n, p in model.named_parameters() if id(p) not in seen]
    assert not missed, f"{case}: parameters not re-drawn: {missed}"
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def build_models(tokenizer: CLIPTokenizer):
    unet = UNet2DConditionModel(**UNET_CONFIG)
    randomise(unet, "unet", qk_gain=QK_GAIN)
    text_config = CLIPTextConfig(  # SD2.1's text tower (OpenCLIP ViT-H, 23 layers), tiny
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        # SD2.1's text_encoder/config.json has these legacy ids; eos_token_id == 2 makes
        # transformers pool at argmax(input_ids), which is the end token since it has the largest id.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config)
    randomise(text_encoder, "text_encoder", qk_gain=1.0)
    vae = AutoencoderKL(**VAE_CONFIG)
    randomise(vae, "vae")
    return unet.eval(), text_encoder.eval(), vae.eval()


def write_pipeline(path: Path, unet, text_encoder, vae, tokenizer, scheduler, vocab_dir: Path,
                   text_model_prefix: bool) -> list[str]:
    """StableDiffusionPipeline.save_pretrained of float16 copies, plus the tokenizer's
    vocab.json / merges.txt / special_tokens_map.json (transformers 5 writes only tokenizer.json
    and tokenizer_config.json; SD2.1's own tokenizer/ has the vocab.json + merges.txt form).
    transformers 5 writes the text encoder's keys without the `text_model.` prefix; with
    `text_model_prefix` they are rewritten with it, as in SD2.1's own files (and transformers 4's)."""
    if path.exists():
        shutil.rmtree(path)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text_encoder).half(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    te_file = path / "text_encoder" / "model.safetensors"
    te = load_file(te_file)
    assert not any(k.startswith("text_model.") for k in te), "transformers wrote the prefix itself"
    if text_model_prefix:
        save_file({"text_model." + k: v for k, v in te.items()}, te_file, metadata={"format": "pt"})
    tok_dir = path / "tokenizer"
    transformers_wrote = sorted(p.name for p in tok_dir.iterdir())
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocab_dir / name, tok_dir / name)
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return transformers_wrote


def load_pipeline(path: Path, unet, text_encoder, vae) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for what, a, b in (("unet", pipe.unet, unet), ("text_encoder", pipe.text_encoder, text_encoder),
                       ("vae", pipe.vae, vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), what
        for k in sa:
            assert sa[k].dtype == torch.float32 and torch.equal(sa[k], sb[k]), f"{path.name}/{what}: {k}"
    return pipe


# ---------------------------------------------------------------------------------------------
# cross-attention map capture (SPEC section 3, SD2.1)

class CaptureAttnProcessor:
    """attn2 (cross-attention) written out: probs = softmax(q k^T * scale) over all 77 text
    tokens, per head; stores probs (batch, heads, H*W, 77) in call order, with the graph."""

    def __init__(self, name: str, store: list):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is not None and attention_mask is None and hidden_states.ndim == 3
        assert attn.spatial_norm is None and attn.group_norm is None and attn.norm_cross is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
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
        self.store.append((self.name, probs))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


def set_capture(unet, store: list) -> dict:
    original = dict(unet.attn_processors)
    procs = {name: (CaptureAttnProcessor(name.removesuffix(".processor"), store) if ".attn2." in name else p)
             for name, p in original.items()}
    unet.set_attn_processor(procs)
    return original


def word_maps(captured: list, tokens: list[list[int]]) -> tuple[torch.Tensor, list]:
    """(len(tokens), N, 16, 16): for each word, each layer's per-head mean over the word's tokens
    of the (conditional) probabilities, at the layer's own resolution; layers grouped by
    resolution ascending, call order inside a resolution; bilinear resize to 16x16
    (align_corners=False) and renormalise each map to sum 1 (divide by sum + 1e-8)."""
    by_res: dict[int, list] = {}
    for name, probs in captured:
        assert probs.shape[0] == 1, "capture runs the conditional pass alone"
        heads, hw, _ = probs[0].shape
        res = math.isqrt(hw)
        assert res * res == hw
        by_res.setdefault(res, []).append((name, probs[0]))
    order = [(name, res, p.shape[0]) for res in sorted(by_res) for name, p in by_res[res]]
    out = []
    for toks in tokens:
        per_res = []
        for res in sorted(by_res):
            m = torch.cat([p[:, :, toks].mean(dim=-1).reshape(-1, res, res) for _, p in by_res[res]], dim=0)
            m = F.interpolate(m[:, None], size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False)[:, 0]
            per_res.append(m / (m.sum(dim=(-2, -1), keepdim=True) + 1e-8))
        out.append(torch.cat(per_res, dim=0))
    return torch.stack(out), order


def find_tokens(tokenizer, input_ids: list[int], word: str) -> list[int]:
    """Indices of the first occurrence of `word`'s tokens (no start/end token) in `input_ids`."""
    w = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(input_ids) - len(w) + 1):
        if input_ids[i:i + len(w)] == w:
            return list(range(i, i + len(w)))
    raise ValueError(f"{word!r} not in the prompt")


# ---------------------------------------------------------------------------------------------
# DDIM inversion, plain and fixed-point
#
# Follows the reference Learn-to-Steer code (sapir1779/learn-to-steer), re-implemented here:
#  - pipelines/sd/FixedPointInversion/StableDiffusionPipelineWithDDIMInversion.py,
#    `scheduler_next_step` (the update) and `__init__` (inverse_scheduler =
#    DDIMInverseScheduler.from_config(scheduler.config), whose `set_timesteps` gives the schedule);
#  - pipelines/sd/FixedPointInversion/inversion.py, `MyInvert.invert` (plain) and
#    `MyInvertOptimized.invert` / `MyInvertOptimized.optimize` (fixed point; the data generation
#    in train_relation_classifier/.../generate_relations_data.py, `Sd2Handler.get_initial_latents`,
#    calls `MyInvertFixedPoint.invert` with num_iter=5, guidance_scale=1.0, 50 steps).
# Schedule ("leading", steps_offset 1): t_i = i * (1000 // S) + 1, i = 0..S-1, ascending
# (S = 50: 1, 21, ..., 981; S = 3: 1, 334, 667). The step to t_i starts from
# s_i = t_i - 1000 // S (the previous timestep of the forward DDIM schedule); its alpha is
# alphas_cumprod[s_i] if s_i >= 0, else final_alpha_cumprod (= alphas_cumprod[0] with
# set_alpha_to_one false). The model output is read as epsilon whatever prediction_type says.
#   next(eps, z) = sqrt(a_t) * (z - sqrt(1 - a_s) * eps) / sqrt(a_s) + sqrt(1 - a_t) * eps
# plain:        z_{t_i} = next(eps(z_{s_i}, t_i), z_{s_i})     (the UNet sees timestep t_i)
# fixed point:  w = z_{s_i}; repeat K times: w = next(eps(w, t_i), z_{s_i}); z_{t_i} = w
# eps is the conditional prediction alone (guidance 1.0: no classifier-free guidance).

def inversion_timesteps(scheduler_config, steps: int) -> torch.Tensor:
    inv = DDIMInverseScheduler.from_config(scheduler_config)
    inv.set_timesteps(steps)
    return inv.timesteps.clone()


def next_step(alphas_cumprod: torch.Tensor, final_alpha: torch.Tensor, steps: int,
              eps: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    s = min(t - 1000 // steps, 999)
    a_s = alphas_cumprod[s] if s >= 0 else final_alpha
    a_t = alphas_cumprod[t]
    x0 = (z - (1 - a_s) ** 0.5 * eps) / a_s ** 0.5
    return a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps


def invert(unet, scheduler, cond, z0: torch.Tensor, steps: int, fixed_point_iters: int | None):
    ac, final = scheduler.alphas_cumprod, scheduler.final_alpha_cumprod
    timesteps = inversion_timesteps(scheduler.config, steps)
    z, out = z0, []
    with torch.no_grad():
        for t in timesteps.tolist():
            if fixed_point_iters is None:
                eps = unet(z, t, encoder_hidden_states=cond).sample
                z = next_step(ac, final, steps, eps, t, z)
            else:
                w = z
                for _ in range(fixed_point_iters):
                    eps = unet(w, t, encoder_hidden_states=cond).sample
                    w = next_step(ac, final, steps, eps, t, z)
                z = w
            out.append((t, z))
    return timesteps, out


# ---------------------------------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run_ddim(pipe, init_latents: torch.Tensor, prefix: str, T: dict) -> None:
    steps = []

    def on_step_end(p, i, t, kwargs):
        steps.append(kwargs["latents"].detach().clone())
        return kwargs

    with torch.no_grad():
        final = pipe(PROMPT, negative_prompt="", guidance_scale=GUIDANCE, num_inference_steps=DDIM_STEPS, eta=0.0,
                     latents=init_latents.clone(), output_type="latent",
                     callback_on_step_end=on_step_end).images
    assert len(steps) == DDIM_STEPS and torch.equal(steps[-1], final)
    T[f"{prefix}.init_latents"] = init_latents
    T[f"{prefix}.timesteps"] = pipe.scheduler.timesteps.to(torch.int64).clone()
    for i, z in enumerate(steps):
        T[f"{prefix}.latents_step{i}"] = z
    T[f"{prefix}.final_latents"] = final


def float64_check(pipe, pipe_v, T: dict, tokens: list[list[int]]) -> dict[str, float]:
    """How far the float32 references are from the same computation in float64 (the noise floor
    a float32 implementation is compared against), and a central finite difference of the maps
    loss along a random direction in float64 against the float64 autograd gradient."""
    unet = copy.deepcopy(pipe.unet).double()
    te = copy.deepcopy(pipe.text_encoder).double()
    vae = copy.deepcopy(pipe.vae).double()
    errs = {}
    with torch.no_grad():
        errs["text.last_hidden_state"] = rel_err(T["text.last_hidden_state"],
                                                 te(T["text.input_ids"]).last_hidden_state)
        cond = T["unet.encoder_hidden_states"].double()
        errs["unet.out"] = rel_err(T["unet.out"], unet(T["unet.sample"].double(), T["unet.timestep"],
                                                        encoder_hidden_states=cond).sample)
        errs["vae.encoded_mean"] = rel_err(T["vae.encoded_mean"], vae.encode(T["vae.image"].double()).latent_dist.mean)
        errs["vae.decoded"] = rel_err(T["vae.decoded"], vae.decode(T["vae.latent"].double()).sample)

    def loss(x):
        store: list = []
        original = set_capture(unet, store)
        unet(x, T["unet.timestep"], encoder_hidden_states=cond)
        unet.set_attn_processor(original)
        maps, _ = word_maps(store, tokens)
        return maps, (maps * T["maps.cotangent"].double()).sum()

    x = T["unet.sample"].double().requires_grad_(True)
    maps, value = loss(x)
    (grad,) = torch.autograd.grad(value, x)
    errs["maps.maps"] = rel_err(T["maps.maps"], maps.detach())
    errs["maps.sample_grad"] = rel_err(T["maps.sample_grad"], grad)
    direction = randn("fd.direction", *x.shape)
    h = 1e-5
    with torch.no_grad():
        fd = (loss(x.detach() + h * direction)[1] - loss(x.detach() - h * direction)[1]) / (2 * h)
    errs["fd_vs_autograd (float64)"] = abs(fd.item() - (grad * direction).sum().item()) / abs(fd.item())

    # the DDIM generations and the inversion in float64 (the schedulers keep their float32 alphas)
    for prefix, p in (("ddim", pipe), ("ddim_v", pipe_v)):
        p64 = StableDiffusionPipeline(**{**p.components, "unet": copy.deepcopy(p.unet).double(),
                                         "text_encoder": copy.deepcopy(p.text_encoder).double(),
                                         "vae": vae, "scheduler": copy.deepcopy(p.scheduler)})
        p64.set_progress_bar_config(disable=True)
        T64: dict = {}
        run_ddim(p64, T[f"{prefix}.init_latents"].double(), prefix, T64)
        errs[f"{prefix}.final_latents"] = rel_err(T[f"{prefix}.final_latents"], T64[f"{prefix}.final_latents"])
    t_last = T["inv.timesteps"][-1].item()
    _, fixed = invert(unet, pipe.scheduler, cond, T["inv.z0"].double(), INV_STEPS, INV_FIXED_POINT_ITERS)
    errs[f"inv.fixed_point_z{t_last}"] = rel_err(T[f"inv.fixed_point_z{t_last}"], fixed[-1][1])
    return errs


def dir_files(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(FIXTURES)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


def main() -> None:
    setup_determinism(0)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()

    tmp_vocab = FIXTURES / ".tiny-sd21-vocab.tmp"
    tokenizer = build_tokenizer(tmp_vocab)
    unet, text_encoder, vae = build_models(tokenizer)

    # the -v directory: same weights, SD2.1 (768)'s upcast_attention true and v-prediction
    unet_v = UNet2DConditionModel(**{**UNET_CONFIG, "upcast_attention": True}).eval()
    unet_v.load_state_dict(unet.state_dict())
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    sched_v = DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    tok_written = write_pipeline(OUT, unet, text_encoder, vae, tokenizer, sched, tmp_vocab, text_model_prefix=False)
    write_pipeline(OUT_V, unet_v, text_encoder, vae, tokenizer, sched_v, tmp_vocab, text_model_prefix=True)
    shutil.rmtree(tmp_vocab)

    pipe = load_pipeline(OUT, unet, text_encoder, vae)
    pipe_v = load_pipeline(OUT_V, unet_v, text_encoder, vae)
    # every tokenizer form in tokenizer/ gives the same ids
    tok_json = pipe.tokenizer
    tok_vm = CLIPTokenizer(vocab=str(OUT / "tokenizer/vocab.json"), merges=str(OUT / "tokenizer/merges.txt"),
                           pad_token="!", model_max_length=77)
    for text in (PROMPT, "", "A Red circle above a blue SQUARE!", "hello, world 42"):
        a = tok_json(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert a == tok_vm(text, padding="max_length", max_length=77, truncation=True).input_ids, text

    T: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}

    # ---- text encoder
    ids = tok_json(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ids.to(torch.int64)
    with torch.no_grad():
        enc = pipe.text_encoder(ids)
        cond = enc.last_hidden_state
        prompt_embeds, negative_embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    assert torch.equal(prompt_embeds, cond)
    uncond_ids = tok_json("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    T["text.input_ids"] = ids
    T["text.last_hidden_state"] = cond
    T["text.pooler_output"] = enc.pooler_output
    # The negative prompt "" as the pipeline encodes it, for classifier-free guidance.
    T["text.uncond_input_ids"] = uncond_ids.to(torch.int64)
    T["text.uncond_hidden_state"] = negative_embeds
    ids_list = ids[0].tolist()

    # ---- unet
    sample = randn("unet.sample", 1, 4, 16, 16).float()
    timestep = torch.tensor([UNET_TIMESTEP], dtype=torch.int64)
    with torch.no_grad():
        unet_out = pipe.unet(sample, timestep, encoder_hidden_states=cond).sample
    T["unet.sample"] = sample
    T["unet.timestep"] = timestep
    T["unet.encoder_hidden_states"] = cond
    T["unet.out"] = unet_out
    with torch.no_grad():
        unet_out_v = pipe_v.unet(sample, timestep, encoder_hidden_states=cond).sample
    assert torch.equal(unet_out, unet_out_v), "upcast_attention changed a float32 forward"

    # ---- maps and their gradient to the sample
    tokens = [find_tokens(tok_json, ids_list, w) for w in CAPTURE_WORDS]
    store: list = []
    original = set_capture(pipe.unet, store)
    x = sample.clone().requires_grad_(True)
    out_capture = pipe.unet(x, timestep, encoder_hidden_states=cond).sample
    maps, order = word_maps(store, tokens)
    cot = randn("maps.cotangent", *maps.shape).float()
    (grad,) = torch.autograd.grad((maps * cot).sum(), x)
    pipe.unet.set_attn_processor(original)
    capture_vs_sdpa = rel_err(out_capture.detach(), unet_out)
    assert capture_vs_sdpa < 1e-5, capture_vs_sdpa
    for i, toks in enumerate(tokens):
        T[f"maps.capture_tokens_{i}"] = torch.tensor(toks, dtype=torch.int64)
    T["maps.maps"] = maps.detach()
    T["maps.cotangent"] = cot
    T["maps.sample_grad"] = grad
    meta["maps.layer_order"] = json.dumps(order)
    meta["maps.inputs"] = "unet.sample, unet.timestep, unet.encoder_hidden_states (conditional pass alone)"
    meta["maps.words"] = json.dumps(list(CAPTURE_WORDS))

    # ---- vae
    g = case_generator("vae.image")
    image = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64).float() * 2 - 1
    latent = randn("vae.latent", 1, 4, 8, 8).float()
    with torch.no_grad():
        T["vae.image"] = image
        T["vae.encoded_mean"] = pipe.vae.encode(image).latent_dist.mean
        T["vae.latent"] = latent
        T["vae.decoded"] = pipe.vae.decode(latent).sample

    # ---- DDIM generation through diffusers' pipeline (epsilon and v-prediction)
    init = randn("ddim.init_latents", 1, 4, 16, 16).float()
    run_ddim(pipe, init, "ddim", T)
    run_ddim(pipe_v, init, "ddim_v", T)

    # ---- DDIM inversion (conditional only), plain and fixed-point, from a random latent
    z0 = randn("inv.z0", 1, 4, 16, 16).float()
    T["inv.z0"] = z0
    inv_t, plain = invert(pipe.unet, pipe.scheduler, cond, z0, INV_STEPS, None)
    _, fixed = invert(pipe.unet, pipe.scheduler, cond, z0, INV_STEPS, INV_FIXED_POINT_ITERS)
    T["inv.timesteps"] = inv_t.to(torch.int64)
    for (t, z), (_, w) in zip(plain, fixed):
        T[f"inv.plain_z{t}"] = z
        T[f"inv.fixed_point_z{t}"] = w
    # cross-check the plain update with diffusers' DDIMInverseScheduler.step (same formula)
    inv_sched = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inv_sched.set_timesteps(INV_STEPS)
    z = z0
    with torch.no_grad():
        for t in inv_sched.timesteps:
            z = inv_sched.step(pipe.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    inv_check = rel_err(z, plain[-1][1])
    assert inv_check < 1e-5, inv_check

    # fixed point with one iteration is plain inversion
    _, one = invert(pipe.unet, pipe.scheduler, cond, z0, INV_STEPS, 1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(one, plain))
    meta.update({
        "prompt": PROMPT,
        "negative_prompt": "",
        "ddim.guidance_scale": str(GUIDANCE),
        "ddim.num_inference_steps": str(DDIM_STEPS),
        "ddim.eta": "0.0",
        "inv.steps": str(INV_STEPS),
        "inv.fixed_point_iterations": str(INV_FIXED_POINT_ITERS),
        "inv.guidance_scale": "1.0",
        "unet.config": json.dumps(UNET_CONFIG),
        "vae.config": json.dumps(VAE_CONFIG),
        "weights": "float16 in the model directories; these references use the same values in float32",
        "model_dirs": "tests/fixtures/tiny-sd21 (epsilon), tests/fixtures/tiny-sd21-v (v_prediction)",
    })
    errs = float64_check(pipe, pipe_v, T, tokens)
    meta["float32_vs_float64_rel_err"] = json.dumps({k: f"{v:.2e}" for k, v in errs.items()})
    path = save_fixture(REFERENCE, T, meta)

    # ---- summary
    print()
    print("files:")
    total = 0
    for d in (OUT, OUT_V):
        for name, size in dir_files(d):
            print(f"  {name:60s} {size:9d}")
            total += size
    size = path.stat().st_size
    total += size
    print(f"  {path.name:60s} {size:9d}")
    print(f"  total {total} bytes ({total / 2**20:.2f} MiB)")
    print(f"tokenizer files transformers wrote: {tok_written} (+ vocab.json, merges.txt, special_tokens_map.json)")
    print(f"vocab {len(tok_json)}; pad {tok_json.pad_token_id} bos {tok_json.bos_token_id} eos {tok_json.eos_token_id}")
    print(f"input_ids[:16] {ids_list[:16]}")
    for w, toks in zip(CAPTURE_WORDS, tokens):
        print(f"capture {w!r}: token indices {toks} (ids {[ids_list[i] for i in toks]})")
    print(f"N = {maps.shape[1]} maps per word; layer order (name, resolution, heads):")
    for o in order:
        print(f"  {o}")
    print(f"capture processor vs diffusers' SDPA processor, unet.out rel err {capture_vs_sdpa:.2e}")
    print(f"plain inversion vs DDIMInverseScheduler.step: rel err {inv_check:.2e}")
    print("float32 references vs float64 (max abs err / max abs), and the float64 finite-difference check:")
    for k, v in errs.items():
        print(f"  {k:32s} {v:.2e}")
    print("tensors:")
    for k in sorted(T):
        t = T[k]
        extra = "" if not t.is_floating_point() else f"  std {t.double().std().item():.3g}  max|.| {t.abs().max().item():.3g}"
        print(f"  {k:32s} {str(t.dtype):14s} {tuple(t.shape)}{extra}")
    print(f"ddim.timesteps {T['ddim.timesteps'].tolist()}  inv.timesteps {T['inv.timesteps'].tolist()}")


if __name__ == "__main__":
    main()
