"""Write tests/fixtures/optim.safetensors: torch.optim.AdamW and
torch.optim.lr_scheduler.ReduceLROnPlateau on fixed sequences, for tests/optim.rs (the training
optimiser of `steer train`, src/train/optim.rs).

    $STEER_REF_VENV/bin/python tests/reference/optim_fixtures.py

AdamW (case `adamw`): torch defaults except lr 1e-3 and weight_decay 0.05 (betas 0.9/0.999,
eps 1e-8, amsgrad off, not maximising; on CPU torch takes its single-tensor path). Three float32
parameters `a` (3, 4), `b` (5,), `c` (2, 3), eight steps of random gradients:
  - `b`'s gradients are scaled by 1e-6, so that sqrt(v) is of the order of eps (checks where eps
    goes in the denominator);
  - `c` has no gradient at steps 3 and 6: torch skips it there (its step count lags behind);
  - the learning rate drops to 5e-4 before step 5 (as ReduceLROnPlateau would set it).
Names (k = 1..8):
  `adamw.init.<p>` (f32)       the parameters before step 1
  `adamw.grad<k>.<p>` (f32)    the gradient of step k (absent where torch had None)
  `adamw.param<k>.<p>` (f32)   the parameters after step k
  `adamw.lrs` (f64, [8])       the learning rate used at step k
  `adamw.exp_avg.<p>`, `adamw.exp_avg_sq.<p>` (f32), `adamw.step.<p>` (i64, []): torch's state
                               after step 8

ReduceLROnPlateau (cases `plateau_*`): a one-parameter SGD optimiser holds the learning rate;
`<case>.metrics` (f64, [n]) is fed to `scheduler.step`, `<case>.lrs` (f64, [n]) is the learning
rate after each call; metadata `<case>.config` is the scheduler's arguments as JSON (with `lr`,
the initial learning rate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures import case_generator, save_fixture, setup_determinism  # noqa: E402

T: dict[str, torch.Tensor] = {}
META: dict[str, str] = {}


def adamw_case() -> None:
    case = "adamw"
    gen = case_generator(case)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 3)}
    grad_scale = {"a": 1.0, "b": 1e-6, "c": 1.0}
    no_grad = {"c": {3, 6}}
    lr_at = {1: 1e-3, 5: 5e-4}
    steps = 8
    params = {n: torch.randn(*s, generator=gen, dtype=torch.float32) for n, s in shapes.items()}
    for n, p in params.items():
        T[f"{case}.init.{n}"] = p.detach().clone()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.05)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert not opt.defaults["amsgrad"] and not opt.defaults["maximize"]
    lrs = []
    for k in range(1, steps + 1):
        if k in lr_at:
            for g in opt.param_groups:
                g["lr"] = lr_at[k]
        lrs.append(opt.param_groups[0]["lr"])
        for n, p in params.items():
            g = torch.randn(*shapes[n], generator=gen, dtype=torch.float32) * grad_scale[n]
            if k in no_grad.get(n, ()):
                p.grad = None
            else:
                p.grad = g
                T[f"{case}.grad{k}.{n}"] = g.clone()
        opt.step()
        for n, p in params.items():
            T[f"{case}.param{k}.{n}"] = p.detach().clone()
    T[f"{case}.lrs"] = torch.tensor(lrs, dtype=torch.float64)
    for n, p in params.items():
        st = opt.state[p]
        T[f"{case}.exp_avg.{n}"] = st["exp_avg"].clone()
        T[f"{case}.exp_avg_sq.{n}"] = st["exp_avg_sq"].clone()
        T[f"{case}.step.{n}"] = torch.tensor(int(st["step"].item()), dtype=torch.int64)
    META[f"{case}.config"] = json.dumps({"lr": 1e-3, "weight_decay": 0.05, "steps": steps,
                                         "grad_scale": grad_scale, "no_grad": {"c": [3, 6]},
                                         "lr_at": {str(k): v for k, v in lr_at.items()}})


def plateau_case(case: str, metrics: list[float], lr: float, **kwargs) -> None:
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    lrs = []
    for m in metrics:
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
    T[f"{case}.metrics"] = torch.tensor(metrics, dtype=torch.float64)
    T[f"{case}.lrs"] = torch.tensor(lrs, dtype=torch.float64)
    META[f"{case}.config"] = json.dumps({"lr": lr, **kwargs}, sort_keys=True)
    print(case, lrs)


def main() -> None:
    setup_determinism()
    adamw_case()
    # torch's defaults (threshold 1e-4 relative, cooldown 0, min_lr 0, eps 1e-8) with factor 0.5
    # and patience 2. 0.79995 after 0.8 improves by 6e-5 relative: below the threshold, so it is
    # a bad epoch; 0.7 after 0.8 is an improvement.
    plateau_case("plateau_default",
                 [1.0, 0.9, 0.8, 0.8, 0.79995, 0.8, 0.7, 0.7, 0.71, 0.72, 0.69, 0.69, 0.69,
                  0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.49994, 0.6, 0.6],
                 lr=1e-3, mode="min", factor=0.5, patience=2)
    # The reference trainer's scheduler (train_relation_classifier/train.py): factor 0.5,
    # patience 5, threshold 0.0, min_lr 1e-6. Tiny improvements count (threshold 0); long
    # plateaus drive the rate down to min_lr, where it stays.
    plateau_case("plateau_reference",
                 [2.0, 1.5, 1.4, 1.4, 1.4, 1.4, 1.4, 1.4, 1.4, 1.3999999, 1.4, 1.4, 1.4, 1.4,
                  1.4, 1.4] + [1.39] * 30 + [1.0, 1.0],
                 lr=1e-5, mode="min", factor=0.5, patience=5, threshold=0.0, min_lr=1e-6)
    # Mode max, absolute threshold, a cooldown, and min_lr near the rate (the eps rule).
    plateau_case("plateau_max_abs_cooldown",
                 [0.1, 0.2, 0.205, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.5, 0.4, 0.4, 0.4, 0.4,
                  0.4, 0.4, 0.4, 0.4, 0.4],
                 lr=1e-3, mode="max", factor=0.1, patience=1, threshold=0.01,
                 threshold_mode="abs", cooldown=2, min_lr=1e-5)
    save_fixture("optim", T, META)


if __name__ == "__main__":
    main()
