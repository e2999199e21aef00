"""PyTorch CUDA baseline for `steer-bench attention`: attention at SD2.1 and FLUX sizes, bf16.

    python tests/reference/bench_attention.py --cases JSON [--repeats 20] [--warmup 3]

Two PyTorch versions of each case, timed with CUDA events (median of `repeats` after `warmup`):
- "sdpa": torch.nn.functional.scaled_dot_product_attention (flash / cuDNN kernels), which cannot
  return maps: the fastest attention torch has, without capture;
- "explicit": what the Learn-to-Steer reference does to capture maps: logits = scale q k^T,
  P = softmax(logits), out = P v, maps = mean of P's word columns (or of a softmax over the text
  columns only, for FLUX), all materialised.
Each is timed forward, and forward + backward (the loss sum(out * dout) + sum(maps * dmaps)).
Prints one JSON object on stdout: {"torch": ..., "device": ..., "cases": [{"name": ...,
"sdpa": {"fwd": {"median_s", "min_s", "peak_bytes"}, "fwd_bwd": {...}}, "explicit": {...}}]}.
peak_bytes is torch.cuda.max_memory_allocated during the timed calls, above the inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", required=True, help="JSON list of cases (steer-bench passes it)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device")
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return {"median_s": statistics.median(times), "min_s": min(times),
                "peak_bytes": torch.cuda.max_memory_allocated() - base}

    results = []
    for case in json.loads(args.cases):
        b, h, lq, lk, d = (case[k] for k in ("b", "h", "lq", "lk", "d"))
        scale = d ** -0.5
        words = case["words"]
        cols = case.get("map_cols") or [0, lk]
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
                   for n in (lq, lk, lk))
        dout = torch.randn(b, h, lq, d, device=dev, dtype=torch.bfloat16)
        dmaps = torch.randn(b, len(words), h, lq, device=dev, dtype=torch.float32)

        def explicit(q, k, v):
            logits = torch.matmul(q, k.transpose(-1, -2)) * scale
            p = logits.float().softmax(-1)
            out = torch.matmul(p.to(q.dtype), v)
            if not words:
                return out, None
            pm = p if cols == [0, lk] else logits[..., cols[0]:cols[1]].float().softmax(-1)
            maps = torch.stack([pm[..., [c - cols[0] for c in w]].mean(-1) for w in words], 1)
            return out, maps

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, scale=scale), None

        row = {"name": case["name"]}
        for name, fn in (("sdpa", sdpa), ("explicit", explicit)):
            def fwd(fn=fn):
                with torch.no_grad():
                    fn(q, k, v)

            def fwd_bwd(fn=fn):
                qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
                out, maps = fn(qg, kg, vg)
                loss = (out.float() * dout.float()).sum()
                if maps is not None:
                    loss = loss + (maps * dmaps).sum()
                loss.backward()

            row[name] = {"fwd": timed(fwd), "fwd_bwd": timed(fwd_bwd)}
            print(f"{case['name']} {name}: fwd {row[name]['fwd']['median_s'] * 1e3:.3f} ms, "
                  f"fwd+bwd {row[name]['fwd_bwd']['median_s'] * 1e3:.3f} ms", file=sys.stderr)
        results.append(row)
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "repeats": args.repeats, "warmup": args.warmup, "cases": results}))


if __name__ == "__main__":
    main()
