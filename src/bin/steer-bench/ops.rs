//! `steer-bench ops` times the CPU backend's fp32 GEMM (`ops::matmul`), 3x3 convolution
//! (`ops::conv2d` and its input gradient) and self-attention (`ops::attention`, and with its
//! backward) at SD2.1 UNet sizes next to PyTorch on the same shapes with the same thread
//! count (tests/reference/bench_ops.py, embedded in this binary), and prints both with the ratio
//! of our time to torch's. Each case's timed calls are split into rounds (`--rounds`), and the two
//! sides take turns round by round (torch's round, then ours), so a drift in the machine's speed
//! falls on both alike while each side's calls run back to back, as in a model. (Alternating
//! single calls of 10 ms put a cold start, threads waking and caches refilling, into every call
//! of both sides: 4096x320x320 took 14 ms a call that way, 9 ms back to back. One round a case
//! still let a slow second land on one side: 1024x1280x1280 came out at 1.66x in one run and
//! 0.99-1.11x in three others.)
//!
//! The Python interpreter: see `common::find_python`. Without a Python that imports torch (or
//! with `--no-torch`) it prints our figures alone and says why the baseline is missing.

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};
use steer::ops::{self, Conv2dParams};
use steer::{DType, Tensor};

use crate::common::{call_times, init_threads, load_average, torch_turn, PythonSide, Timing};

/// The PyTorch side, embedded so the binary works from any directory.
const BENCH_OPS_PY: &str = include_str!("../../../tests/reference/bench_ops.py");

#[derive(Args)]
pub struct OpsArgs {
    /// Threads for both sides (rayon's global pool; torch.set_num_threads). Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Timed calls per case; the median is reported.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Untimed calls per case before timing (then one before each later round).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Rounds each case's timed calls are split into; the two sides alternate round by round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Python with torch for the baseline (default: $STEER_REF_VENV/bin/python, then
    /// ~/.cache/steer/ref-venv/bin/python, then python3 on PATH).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip the PyTorch baseline.
    #[arg(long)]
    no_torch: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy)]
enum Kind {
    Gemm {
        m: usize,
        k: usize,
        n: usize,
    },
    Conv {
        batch: usize,
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        /// The input gradient (`ops::conv2d_backward` without the weight gradient) instead.
        backward: bool,
    },
    /// Self-attention of one image's tokens; `backward`: forward, then dQ, dK and dV.
    Attention {
        heads: usize,
        tokens: usize,
        head_dim: usize,
        backward: bool,
    },
}

struct Case {
    name: &'static str,
    kind: Kind,
}

const fn conv3x3(name: &'static str, c: usize, hw: usize, backward: bool) -> Case {
    Case {
        name,
        kind: Kind::Conv {
            batch: 1,
            cin: c,
            cout: c,
            h: hw,
            w: hw,
            kernel: 3,
            stride: 1,
            padding: 1,
            backward,
        },
    }
}

/// SD2.1's first-level self-attention (5 heads of 64 over a 64x64 latent's tokens).
const fn attention(name: &'static str, backward: bool) -> Case {
    Case {
        name,
        kind: Kind::Attention {
            heads: 5,
            tokens: 4096,
            head_dim: 64,
            backward,
        },
    }
}

/// SD2.1 UNet at a 64x64 latent: attention / feed-forward projections (tokens x channels) at the
/// first and last levels, the ResNet blocks' 3x3 convolutions and their input gradients, and the
/// first level's self-attention, alone and with its backward. The same list as
/// bench_ops.py's DEFAULT_CASES (this one is passed to it, so the two cannot drift).
const CASES: &[Case] = &[
    Case {
        name: "gemm 4096x320x320",
        kind: Kind::Gemm {
            m: 4096,
            k: 320,
            n: 320,
        },
    },
    Case {
        name: "gemm 4096x320x1280",
        kind: Kind::Gemm {
            m: 4096,
            k: 320,
            n: 1280,
        },
    },
    Case {
        name: "gemm 1024x1280x1280",
        kind: Kind::Gemm {
            m: 1024,
            k: 1280,
            n: 1280,
        },
    },
    conv3x3("conv3x3 320x64x64", 320, 64, false),
    conv3x3("conv3x3 1280x16x16", 1280, 16, false),
    conv3x3("conv3x3 320x64x64 dx", 320, 64, true),
    conv3x3("conv3x3 1280x16x16 dx", 1280, 16, true),
    attention("attention 5x4096x64", false),
    attention("attention 5x4096x64 +bwd", true),
];

/// A convolution's output height and width.
fn conv_output(h: usize, w: usize, kernel: usize, stride: usize, padding: usize) -> (usize, usize) {
    let side = |x: usize| (x + 2 * padding - kernel) / stride + 1;
    (side(h), side(w))
}

impl Case {
    fn gflop(&self) -> f64 {
        match self.kind {
            Kind::Gemm { m, k, n } => 2.0 * (m * k * n) as f64 / 1e9,
            Kind::Conv {
                batch,
                cin,
                cout,
                h,
                w,
                kernel,
                stride,
                padding,
                ..
            } => {
                let (ho, wo) = conv_output(h, w, kernel, stride, padding);
                2.0 * (batch * cout * ho * wo * cin * kernel * kernel) as f64 / 1e9
            }
            // QK^T and PV; the backward adds the recomputed QK^T, dP, dV, dQ and dK (as
            // bench_ops.py's gflop).
            Kind::Attention {
                heads,
                tokens,
                head_dim,
                backward,
            } => {
                let products = if backward { 7.0 } else { 2.0 };
                products * 2.0 * (heads * tokens * tokens * head_dim) as f64 / 1e9
            }
        }
    }

    /// The case as bench_ops.py reads it.
    fn to_json(&self) -> Value {
        match self.kind {
            Kind::Gemm { m, k, n } => {
                json!({"name": self.name, "kind": "gemm", "m": m, "k": k, "n": n})
            }
            Kind::Conv {
                batch,
                cin,
                cout,
                h,
                w,
                kernel,
                stride,
                padding,
                backward,
            } => json!({
                "name": self.name, "kind": "conv2d", "batch": batch, "cin": cin, "cout": cout,
                "h": h, "w": w, "kernel": kernel, "stride": stride, "padding": padding,
                "backward": backward,
            }),
            Kind::Attention {
                heads,
                tokens,
                head_dim,
                backward,
            } => json!({
                "name": self.name, "kind": "attention", "heads": heads, "tokens": tokens,
                "head_dim": head_dim, "backward": backward,
            }),
        }
    }
}

/// Timed calls per round: `repeats` shared out over `rounds`, the first rounds one more (as
/// bench_ops.py's `round_sizes`).
fn round_sizes(repeats: usize, rounds: usize) -> Vec<usize> {
    let rounds = rounds.clamp(1, repeats.max(1));
    (0..rounds)
        .map(|r| repeats / rounds + usize::from(r < repeats % rounds))
        .collect()
}

/// The median and minimum of `call`'s timed calls in rounds, each round after one of torch's:
/// the first round after `warmup` untimed calls, each later one after one.
fn time_rounds(
    args: &OpsArgs,
    torch: &mut Result<PythonSide, String>,
    mut call: impl FnMut() -> steer::Result<Tensor>,
) -> steer::Result<Timing> {
    let mut times = Vec::with_capacity(args.repeats);
    for (r, calls) in round_sizes(args.repeats, args.rounds)
        .into_iter()
        .enumerate()
    {
        torch_turn(torch);
        let warmup = if r == 0 {
            args.warmup
        } else {
            args.warmup.min(1)
        };
        times.extend(call_times(warmup, calls, &mut call)?);
    }
    Ok(Timing::of(&times))
}

/// Our calls of one case.
fn time_ours(
    case: &Case,
    args: &OpsArgs,
    torch: &mut Result<PythonSide, String>,
) -> steer::Result<Timing> {
    match case.kind {
        Kind::Gemm { m, k, n } => {
            let a = Tensor::randn(&[m, k], DType::F32, 1);
            let b = Tensor::randn(&[k, n], DType::F32, 2);
            time_rounds(args, torch, || ops::matmul(&a, &b))
        }
        Kind::Conv {
            batch,
            cin,
            cout,
            h,
            w,
            kernel,
            stride,
            padding,
            backward,
        } => {
            let x = Tensor::randn(&[batch, cin, h, w], DType::F32, 1);
            let wt = Tensor::randn(&[cout, cin, kernel, kernel], DType::F32, 2);
            let b = Tensor::randn(&[cout], DType::F32, 3);
            let p = Conv2dParams { stride, padding };
            if !backward {
                return time_rounds(args, torch, || ops::conv2d(&x, &wt, Some(&b), p));
            }
            let (ho, wo) = conv_output(h, w, kernel, stride, padding);
            let dy = Tensor::randn(&[batch, cout, ho, wo], DType::F32, 4);
            time_rounds(args, torch, || {
                Ok(ops::conv2d_backward(&x, &wt, &dy, p, false)?.dx)
            })
        }
        Kind::Attention {
            heads,
            tokens,
            head_dim,
            backward,
        } => {
            let shape = [1, heads, tokens, head_dim];
            let [q, k, v, dout] = [1, 2, 3, 4].map(|seed| Tensor::randn(&shape, DType::F32, seed));
            let scale = 1.0 / (head_dim as f64).sqrt();
            time_rounds(args, torch, || {
                let out = ops::attention(&q, &k, &v, scale, None)?.out;
                if !backward {
                    return Ok(out);
                }
                Ok(ops::attention_backward(&q, &k, &v, scale, &dout, None, true)?.dq)
            })
        }
    }
}

/// PyTorch's side (bench_ops.py), started in turns, or why there is none.
fn start_torch(args: &OpsArgs, threads: usize) -> Result<PythonSide, String> {
    let cases = Value::Array(CASES.iter().map(Case::to_json).collect());
    let script_args = [
        "--threads".to_string(),
        threads.to_string(),
        "--repeats".into(),
        args.repeats.to_string(),
        "--warmup".into(),
        args.warmup.to_string(),
        "--rounds".into(),
        args.rounds.to_string(),
        "--cases".into(),
        cases.to_string(),
    ];
    PythonSide::start(
        args.python.clone(),
        "bench_ops.py",
        BENCH_OPS_PY,
        &script_args,
        threads,
        true,
    )
}

pub fn run(args: OpsArgs) -> Result<(), String> {
    if args.repeats == 0 {
        return Err("--repeats must be at least 1".into());
    }
    let threads = init_threads(args.threads)?;

    let load_before = load_average();
    let mut torch = if args.no_torch {
        Err("--no-torch".to_string())
    } else {
        start_torch(&args, threads)
    };
    let mut ours = Vec::new();
    for case in CASES {
        let t = time_ours(case, &args, &mut torch).map_err(|e| format!("{}: {e}", case.name))?;
        eprintln!("ours  {}: {:.2} ms", case.name, t.median_s * 1e3);
        ours.push(t);
    }
    let torch = torch.and_then(PythonSide::finish);
    let torch_case = |name: &str| -> Option<Timing> {
        let cases = torch.as_ref().ok()?.get("cases")?.as_array()?;
        let c = cases
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(name))?;
        Timing::from_json(c)
    };

    // The table.
    println!();
    println!(
        "steer-bench ops: fp32, {threads} thread(s), median of {} call(s) in {} round(s) after {} \
         warm-up",
        args.repeats,
        round_sizes(args.repeats, args.rounds).len(),
        args.warmup
    );
    match &torch {
        Ok(report) => {
            let version = report.get("torch").and_then(Value::as_str).unwrap_or("?");
            let tthreads = report.get("threads").and_then(Value::as_u64).unwrap_or(0);
            println!(
                "baseline: PyTorch {version} on CPU, {tthreads} thread(s); its calls and ours \
                 alternate"
            );
            if tthreads as usize != threads {
                println!("warning: torch ran with {tthreads} threads, ours with {threads}");
            }
        }
        Err(why) => println!("baseline: none ({why})"),
    }
    println!(
        "{:<26} {:>7} {:>9} {:>10} {:>9} {:>10} {:>13} {:>9}",
        "case",
        "GFLOP",
        "ours ms",
        "ours GF/s",
        "torch ms",
        "torch GF/s",
        "ours/torch t",
        "(min t)"
    );
    let mut rows = Vec::new();
    let mut worst: Option<f64> = None;
    for (case, o) in CASES.iter().zip(&ours) {
        let gflop = case.gflop();
        let t = torch_case(case.name);
        let ratio = t.map(|t| o.median_s / t.median_s);
        let min_ratio = t.map(|t| o.min_s / t.min_s);
        if let Some(r) = ratio {
            worst = Some(worst.map_or(r, |w: f64| w.max(r)));
        }
        let dash = || "-".to_string();
        println!(
            "{:<26} {:>7.2} {:>9.2} {:>10.1} {:>9} {:>10} {:>13} {:>9}",
            case.name,
            gflop,
            o.median_s * 1e3,
            gflop / o.median_s,
            t.map_or_else(dash, |t| format!("{:.2}", t.median_s * 1e3)),
            t.map_or_else(dash, |t| format!("{:.1}", gflop / t.median_s)),
            ratio.map_or_else(dash, |r| format!("{r:.2}x")),
            min_ratio.map_or_else(dash, |r| format!("{r:.2}x")),
        );
        rows.push(json!({
            "name": case.name,
            "gflop": gflop,
            "ours": {"median_s": o.median_s, "min_s": o.min_s, "gflops": gflop / o.median_s},
            "torch": t.map(|t| json!({"median_s": t.median_s, "min_s": t.min_s, "gflops": gflop / t.median_s})),
            "ratio_time_ours_over_torch": ratio,
            "ratio_min_time_ours_over_torch": min_ratio,
        }));
    }
    if let Some(w) = worst {
        let verdict = if w <= 1.5 { "within" } else { "NOT within" };
        println!("worst ratio {w:.2}x (median times): {verdict} the 1.5x target");
    }
    if let Some(load) = load_before {
        if load > 0.5 {
            println!(
                "note: load average {load:.1} before the run: other processes share the cores, \
                 so these figures are noisy (the min-time ratio suffers least)"
            );
        }
    }

    if let Some(path) = &args.json {
        let report = json!({
            "bench": "ops",
            "dtype": "f32",
            "threads": threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch_version": torch.as_ref().ok().and_then(|r| r.get("torch")).cloned(),
            "torch_absent_reason": torch.as_ref().err(),
            "worst_ratio": worst,
            "load_average_before": load_before,
            "cases": rows,
        });
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
