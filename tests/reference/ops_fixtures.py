"""Write tests/fixtures/ops.safetensors: PyTorch's forward results for every op of steer's CPU op
set, on small random non-zero inputs. tests/ops_vs_torch.rs compares steer's ops with them.

    $STEER_REF_VENV/bin/python tests/reference/ops_fixtures.py

Names are `<case>.<role>`:
  - inputs (`x`, `w`, `b`, `q`, ...) in float64 (the Rust test rounds them to f32 itself, as
    torch's `.float()` does: both round to nearest), integer inputs (`ids`, `targets`) in int64;
  - `y`: PyTorch's output computed in float64 from the float64 inputs;
  - `y_f32`: PyTorch's output computed in float32 from the inputs rounded to float32.
Attention cases also have `maps` / `maps_f32` (captured probabilities), and the timestep cases'
`y_f32` is diffusers' own get_timestep_embedding (which always computes in float32).

Where a diffusers function defines the math but casts to float32 internally (RMSNorm, RoPE,
get_timestep_embedding), `y` is the same formula written out in float64, and the script asserts
that it agrees with the diffusers function in float32.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures import randn, save_fixture, setup_determinism  # noqa: E402

from diffusers.models.activations import GEGLU  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb, get_timestep_embedding  # noqa: E402
from diffusers.models.normalization import RMSNorm  # noqa: E402

T: dict[str, torch.Tensor] = {}
META: dict[str, str] = {}


def put(case: str, role: str, t: torch.Tensor) -> None:
    key = f"{case}.{role}"
    assert key not in T, key
    T[key] = t


def both(case: str, fn, inputs: dict[str, torch.Tensor], out_roles=("y",)) -> None:
    """Store `inputs` (float64, int64 untouched) under `case`, then `fn(**inputs)` in float64 as
    `<role>` and `fn(**inputs_f32)` as `<role>_f32` for each output role."""
    for role, t in inputs.items():
        put(case, role, t)
    f64 = fn(**inputs)
    f32 = fn(**{k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()})
    if not isinstance(f64, tuple):
        f64, f32 = (f64,), (f32,)
    for role, a, b in zip(out_roles, f64, f32):
        assert a.dtype == torch.float64 and b.dtype == torch.float32, (case, role, a.dtype, b.dtype)
        put(case, role, a)
        put(case, f"{role}_f32", b)


def close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    assert err <= tol, f"{what}: rel error {err:.3e} > {tol:.1e}"


# ---------------------------------------------------------------------------------------------
# linear algebra and convolution
def linalg() -> None:
    both("linear", lambda x, w, b: F.linear(x, w, b),
         dict(x=randn("linear", 3, 4, 8, role="x"), w=randn("linear", 5, 8, role="w"),
              b=randn("linear", 5, role="b")))
    both("matmul", lambda a, b: torch.matmul(a, b),
         dict(a=randn("matmul", 2, 3, 5, 7, role="a"), b=randn("matmul", 2, 3, 7, 4, role="b")))

    conv = [  # case, x shape, kernel, stride, padding
        ("conv2d_3x3", (2, 4, 8, 8), 3, 1, 1),
        ("conv2d_1x1", (2, 4, 8, 8), 1, 1, 0),
        ("conv2d_s2", (2, 4, 9, 9), 3, 2, 1),
    ]
    for case, xs, k, stride, pad in conv:
        both(case, lambda x, w, b, s=stride, p=pad: F.conv2d(x, w, b, stride=s, padding=p),
             dict(x=randn(case, *xs, role="x"), w=randn(case, 6, xs[1], k, k, role="w"),
                  b=randn(case, 6, role="b")))
        META[f"{case}.params"] = f"stride={stride} padding={pad}"


# ---------------------------------------------------------------------------------------------
# normalisation
def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def norms() -> None:
    # Offsets and scales so that mean and variance matter.
    x = randn("group_norm", 2, 32, 4, 4, role="x") * 2.0 + 0.5
    both("group_norm", lambda x, gamma, beta: F.group_norm(x, 8, gamma, beta, eps=1e-6),
         dict(x=x, gamma=randn("group_norm", 32, role="gamma"), beta=randn("group_norm", 32, role="beta")))
    META["group_norm.params"] = "groups=8 eps=1e-6"

    x = randn("layer_norm", 2, 5, 16, role="x") * 1.5 - 0.3
    both("layer_norm", lambda x, g, b: F.layer_norm(x, (16,), g, b, eps=1e-5),
         dict(x=x, g=randn("layer_norm", 16, role="g"), b=randn("layer_norm", 16, role="b")))
    META["layer_norm.params"] = "affine eps=1e-5"
    x = randn("layer_norm_plain", 2, 5, 16, role="x") * 1.5 + 0.7
    both("layer_norm_plain", lambda x: F.layer_norm(x, (16,), None, None, eps=1e-6), dict(x=x))
    META["layer_norm_plain.params"] = "no affine eps=1e-6"

    x, w = randn("rms_norm", 2, 5, 16, role="x") * 1.5 + 0.2, randn("rms_norm", 16, role="w")
    both("rms_norm", lambda x, w: rms_norm_ref(x, w, 1e-6), dict(x=x, w=w))
    META["rms_norm.params"] = "eps=1e-6, x * rsqrt(mean(x^2) + eps) * w as diffusers RMSNorm"
    m = RMSNorm(16, eps=1e-6, elementwise_affine=True)
    with torch.no_grad():
        m.weight.copy_(w.float())
        close(m(x.float()), rms_norm_ref(x, w, 1e-6), 1e-6, "rms_norm vs diffusers RMSNorm")


# ---------------------------------------------------------------------------------------------
# activations and softmax
def activations() -> None:
    acts = {
        "silu": F.silu,
        "gelu": lambda x: F.gelu(x),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "relu": F.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    }
    for case, fn in acts.items():
        both(case, lambda x, fn=fn: fn(x), dict(x=randn(case, 4, 33, role="x", scale=3.0)))
    META["leaky_relu.params"] = "negative_slope=0.1"

    def geglu(x):
        h, gate = x.chunk(2, dim=-1)
        return h * F.gelu(gate)

    x = randn("geglu", 2, 5, 16, role="x", scale=2.0)
    both("geglu", geglu, dict(x=x))
    # The same math as diffusers' GEGLU after its projection: an identity projection.
    m = GEGLU(16, 8, bias=False)
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(16))
        close(m(x.float()), geglu(x), 1e-6, "geglu vs diffusers GEGLU")

    x = randn("softmax", 3, 4, 9, role="x", scale=4.0)
    x[0, 0] += 80.0  # large logits: the max must be subtracted
    both("softmax", lambda x: torch.softmax(x, dim=-1), dict(x=x))


# ---------------------------------------------------------------------------------------------
# attention with capture
def word_maps(p: torch.Tensor, words: list[list[int]], offset: int = 0) -> torch.Tensor:
    """p (B, H, Lq, K) -> (B, n_words, H, Lq): each word's columns (minus offset) averaged."""
    return torch.stack([p[..., [j - offset for j in w]].mean(-1) for w in words], dim=1)


def attention() -> None:
    B, H, Lq, D = 2, 3, 10, 8
    scale = D ** -0.5
    META["attention.scale"] = "D^-0.5 with D=8"
    for case, lk, words, cols in [
        ("attn_cross", 6, [[1], [2, 3]], None),
        ("attn_self", 10, [[1], [2, 3]], None),
        ("attn_flux", 10, [[2], [3, 4]], (2, 6)),
    ]:
        q = randn(case, B, H, Lq, D, role="q")
        k = randn(case, B, H, lk, D, role="k")
        v = randn(case, B, H, lk, D, role="v")

        def fn(q, k, v, words=words, cols=cols):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            logits = (q @ k.transpose(-1, -2)) * scale
            manual = torch.softmax(logits, dim=-1) @ v
            close(manual, out, 1e-5 if q.dtype == torch.float32 else 1e-12, f"{case} sdpa vs manual")
            if cols is None:
                maps = word_maps(torch.softmax(logits, dim=-1), words)
            else:
                p_text = torch.softmax(logits[..., cols[0]:cols[1]], dim=-1)
                maps = word_maps(p_text, words, offset=cols[0])
            return out, maps

        both(case, fn, dict(q=q, k=k, v=v), out_roles=("y", "maps"))
        META[f"{case}.capture"] = f"words={words} softmax_cols={cols}"


# ---------------------------------------------------------------------------------------------
# RoPE, resizing, timestep embedding
def rope_ref(x, cos, sin):
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


def positional() -> None:
    B, H, L, D = 2, 3, 5, 8
    x = randn("rope", B, H, L, D, role="x")
    # Angles as FLUX makes them: position * theta^(-2i/D).
    pos = torch.arange(L, dtype=torch.float64)[:, None] * 1.5 + 0.25
    freqs = pos * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    both("rope", rope_ref, dict(x=x, cos=cos, sin=sin))
    # diffusers' apply_rotary_emb (FLUX: use_real_unbind_dim=-1) takes cos/sin repeated per pair.
    ours = apply_rotary_emb(x.float(), (cos.float().repeat_interleave(2, -1),
                                        sin.float().repeat_interleave(2, -1)),
                            use_real=True, use_real_unbind_dim=-1, sequence_dim=2)
    close(ours, rope_ref(x, cos, sin), 1e-6, "rope vs diffusers apply_rotary_emb")

    both("upsample_nearest2x", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
         dict(x=randn("upsample_nearest2x", 2, 3, 4, 5, role="x")))
    for case, hw in [("resize_8to16", (8, 8)), ("resize_32to16", (32, 32)), ("resize_5x7to16", (5, 7))]:
        both(case, lambda x: F.interpolate(x, size=(16, 16), mode="bilinear",
                                           align_corners=False, antialias=False),
             dict(x=randn(case, 1, 2, *hw, role="x")))

    t = torch.tensor([1.0, 981.0, 500.5], dtype=torch.float64)
    for case, dim, flip, shift in [("timestep_320", 320, True, 0.0), ("timestep_256", 256, False, 1.0)]:
        half = dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - shift)
        arg = t[:, None] * torch.exp(exponent)[None, :]
        emb = torch.cat([arg.sin(), arg.cos()], dim=-1)
        if flip:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        put(case, "t", t)
        put(case, "y", emb)
        # diffusers computes in float32 whatever the input: its result is the f32 reference.
        y32 = get_timestep_embedding(t.float(), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert y32.dtype == torch.float32
        put(case, "y_f32", y32)
        close(y32, emb, 1e-3, f"{case} diffusers f32 vs f64 formula")
        META[f"{case}.params"] = f"dim={dim} flip_sin_to_cos={flip} downscale_freq_shift={shift}"


# ---------------------------------------------------------------------------------------------
# embedding lookup and loss
def lookup_and_loss() -> None:
    ids = torch.tensor([3, 0, 9, 3, 7], dtype=torch.int64)
    both("embedding", lambda weight, ids: F.embedding(ids, weight),
         dict(weight=randn("embedding", 10, 6, role="weight"), ids=ids))

    targets = torch.tensor([2, 0, 6, 3], dtype=torch.int64)
    both("cross_entropy", lambda logits, targets: F.cross_entropy(logits, targets),
         dict(logits=randn("cross_entropy", 4, 7, role="logits", scale=2.0), targets=targets))
    META["cross_entropy.params"] = "mean over the batch; y has shape []"


def main() -> None:
    setup_determinism(0)
    linalg()
    norms()
    activations()
    attention()
    positional()
    lookup_and_loss()
    for k, t in T.items():
        if t.is_floating_point():
            assert bool((t != 0).all()) or k.endswith((".y", ".y_f32")), f"{k} has zeros"
    # No two tensors of a case alike (a repeated draw would hide e.g. a k/v or gamma/beta swap).
    keys = sorted(T)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            ta, tb = T[a], T[b]
            if a.split(".")[0] != b.split(".")[0]:
                continue
            assert not (ta.shape == tb.shape and ta.dtype == tb.dtype and torch.equal(ta, tb)), (a, b)
    META["seed"] = "0 (each case seeded by crc32 of its name)"
    save_fixture("ops", T, META)


if __name__ == "__main__":
    main()
