"""PyTorch CPU baseline for `steer-bench ops`: fp32 GEMM, conv2d and attention at SD2.1 sizes.

    python tests/reference/bench_ops.py --threads 2 [--repeats 10] [--warmup 2] [--cases JSON]
        [--rounds 1] [--turns]

Prints one JSON object on stdout (diagnostics go to stderr):
    {"torch": "2.15.0+...", "threads": 2, "repeats": 10, "warmup": 2,
     "cases": [{"name": ..., "kind": "gemm"|"conv2d"|"attention", "gflop": ..., "median_s": ...,
                "min_s": ..., "gflops": ...}, ...]}
`median_s` is the median wall time of one call over `repeats` calls, in `rounds` rounds: the
first after `warmup` untimed calls, each later one after one;
`gflops` = gflop / median_s. steer-bench passes its own case list with --cases (the same JSON
shape as DEFAULT_CASES below) and runs this file from a copy embedded in its binary, so the two
always time the same shapes. With --turns (steer-bench passes it) the script prints READY and
waits for a line on stdin before each round (its warm-up and timed calls back to back) and once
more before its report, so that steer-bench alternates the two sides round by round and they
never compute at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# The same cases as steer-bench's defaults. Shapes of the SD2.1 UNet at a 64x64 latent:
# attention/feed-forward projections (tokens x channels), the ResNet blocks' 3x3 convs (with
# "backward": the input gradient alone, as a gradient to the latent needs), and the first level's
# self-attention (with "backward": forward, then dQ, dK and dV).
DEFAULT_CASES = [
    {"name": "gemm 4096x320x320", "kind": "gemm", "m": 4096, "k": 320, "n": 320},
    {"name": "gemm 4096x320x1280", "kind": "gemm", "m": 4096, "k": 320, "n": 1280},
    {"name": "gemm 1024x1280x1280", "kind": "gemm", "m": 1024, "k": 1280, "n": 1280},
    {"name": "conv3x3 320x64x64", "kind": "conv2d", "batch": 1, "cin": 320, "cout": 320,
     "h": 64, "w": 64, "kernel": 3, "stride": 1, "padding": 1},
    {"name": "conv3x3 1280x16x16", "kind": "conv2d", "batch": 1, "cin": 1280, "cout": 1280,
     "h": 16, "w": 16, "kernel": 3, "stride": 1, "padding": 1},
    {"name": "conv3x3 320x64x64 dx", "kind": "conv2d", "batch": 1, "cin": 320, "cout": 320,
     "h": 64, "w": 64, "kernel": 3, "stride": 1, "padding": 1, "backward": True},
    {"name": "conv3x3 1280x16x16 dx", "kind": "conv2d", "batch": 1, "cin": 1280, "cout": 1280,
     "h": 16, "w": 16, "kernel": 3, "stride": 1, "padding": 1, "backward": True},
    {"name": "attention 5x4096x64", "kind": "attention", "heads": 5, "tokens": 4096,
     "head_dim": 64},
    {"name": "attention 5x4096x64 +bwd", "kind": "attention", "heads": 5, "tokens": 4096,
     "head_dim": 64, "backward": True},
]


def gflop(case: dict) -> float:
    """Multiply-adds x 2. Attention: QK^T and PV; its backward recomputes QK^T (flash attention
    keeps only the row statistics) and adds dP, dV, dQ and dK: 7 such products in all."""
    if case["kind"] == "gemm":
        return 2.0 * case["m"] * case["k"] * case["n"] / 1e9
    if case["kind"] == "attention":
        products = 7 if case.get("backward") else 2
        return products * 2.0 * case["heads"] * case["tokens"] ** 2 * case["head_dim"] / 1e9
    ho = (case["h"] + 2 * case["padding"] - case["kernel"]) // case["stride"] + 1
    wo = (case["w"] + 2 * case["padding"] - case["kernel"]) // case["stride"] + 1
    return 2.0 * case["batch"] * case["cout"] * ho * wo * case["cin"] * case["kernel"] ** 2 / 1e9


def round_sizes(repeats: int, rounds: int) -> list[int]:
    """Timed calls per round: `repeats` shared out over `rounds`, the first rounds one more."""
    rounds = max(1, min(rounds, repeats))
    return [repeats // rounds + (r < repeats % rounds) for r in range(rounds)]


def turn(enabled: bool) -> None:
    """The pause before each call: with --turns, READY on stdout, then wait for a line."""
    if enabled:
        print("READY", flush=True)
        if not sys.stdin.readline():
            raise SystemExit("steer-bench closed the turns")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cases", help="JSON list of cases (default: the SD2.1 set)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="split each case's timed calls into this many rounds")
    ap.add_argument("--turns", action="store_true", help="alternate rounds with steer-bench")
    args = ap.parse_args()

    # Before torch loads its OpenMP runtime.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = json.loads(args.cases) if args.cases else DEFAULT_CASES

    results = []
    # No inference mode: the backward cases need autograd. Inputs that do not require grad
    # record no graph, so the forward cases pay nothing for it.
    for case in cases:
        backward = case.get("backward", False)
        if case["kind"] == "gemm":
            a = torch.randn(case["m"], case["k"])
            b = torch.randn(case["k"], case["n"])
            fn = lambda a=a, b=b: torch.matmul(a, b)  # noqa: E731
        elif case["kind"] == "conv2d" and not backward:
            x = torch.randn(case["batch"], case["cin"], case["h"], case["w"])
            w = torch.randn(case["cout"], case["cin"], case["kernel"], case["kernel"])
            bias = torch.randn(case["cout"])
            fn = lambda x=x, w=w, bias=bias, c=case: F.conv2d(  # noqa: E731
                x, w, bias, stride=c["stride"], padding=c["padding"])
        elif case["kind"] == "conv2d":
            # The input gradient alone (aten::convolution_backward with only grad_input asked).
            shape = (case["batch"], case["cin"], case["h"], case["w"])
            w = torch.randn(case["cout"], case["cin"], case["kernel"], case["kernel"])
            dy = F.conv2d(torch.randn(shape), w, stride=case["stride"], padding=case["padding"])
            dy = torch.randn_like(dy)
            fn = lambda shape=shape, w=w, dy=dy, c=case: torch.nn.grad.conv2d_input(  # noqa: E731
                shape, w, dy, stride=c["stride"], padding=c["padding"])
        elif case["kind"] == "attention":
            shape = (1, case["heads"], case["tokens"], case["head_dim"])
            q, k, v = (torch.randn(shape, requires_grad=backward) for _ in range(3))
            dout = torch.randn(shape)
            if backward:
                def fn(q=q, k=k, v=v, dout=dout):
                    out = F.scaled_dot_product_attention(q, k, v)
                    return torch.autograd.grad(out, (q, k, v), dout)
            else:
                fn = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        else:
            raise SystemExit(f"unknown case kind {case['kind']!r}")
        times = []
        for r, calls in enumerate(round_sizes(args.repeats, args.rounds)):
            turn(args.turns)
            for _ in range(args.warmup if r == 0 else min(args.warmup, 1)):
                fn()
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results.append({"name": case["name"], "kind": case["kind"], "gflop": gflop(case),
                        "median_s": med, "min_s": min(times), "gflops": gflop(case) / med})
        print(f"torch {case['name']}: {med * 1e3:.2f} ms", file=sys.stderr)

    turn(args.turns)  # the last: steer-bench's last call comes before our report
    json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
               "repeats": args.repeats, "warmup": args.warmup, "cases": results}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
