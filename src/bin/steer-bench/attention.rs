//! `steer-bench attention` times the fused attention kernel (kernels/attention.cu) on a GPU at
//! SD2.1 and FLUX sizes, with map capture where steering uses it, then runs PyTorch on the same
//! GPU and shapes (tests/reference/bench_attention.py, embedded in the binary) and
//! prints our time over each of torch's: SDPA (flash attention, no maps) and the explicit
//! softmax the Learn-to-Steer reference uses to capture maps.
//!
//! "fwd+bwd" is what one steering step pays for attention: our `ops::attention` then
//! `ops::attention_backward` (which recomputes the forward: 2 forwards + 1 backward), against
//! torch's autograd forward + backward (1 + 1).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use serde_json::{json, Value};
use steer::cuda::CudaDevice;
use steer::ops::{self, Capture};
use steer::{DType, Tensor};

use crate::common::{run_python_script, time_calls, Timing};

const BENCH_ATTENTION_PY: &str = include_str!("../../../tests/reference/bench_attention.py");

#[derive(Args)]
pub struct AttentionArgs {
    /// The GPU to use.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Timed calls per case; the median is reported.
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Untimed calls per case before timing.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Python with a CUDA build of torch (default: as for the other benches).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip the PyTorch baseline.
    #[arg(long)]
    no_torch: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

struct Case {
    name: &'static str,
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    /// Captured words' key columns (empty: no capture).
    words: &'static [&'static [usize]],
    /// Maps over these key columns only (FLUX's text columns); None: all keys.
    map_cols: Option<(usize, usize)>,
}

/// SD2.1 at 512 px with classifier-free guidance (batch 2; 64x64 latent: 4096 queries, 5 heads of
/// 64), and FLUX.1 at 1024 px (4096 image + 512 text tokens, 24 heads of 128, maps over the text).
const CASES: &[Case] = &[
    Case {
        name: "sd21 self 64x64",
        b: 2,
        h: 5,
        lq: 4096,
        lk: 4096,
        d: 64,
        words: &[],
        map_cols: None,
    },
    Case {
        name: "sd21 cross 64x64 +maps",
        b: 2,
        h: 5,
        lq: 4096,
        lk: 77,
        d: 64,
        words: &[&[2], &[5, 6]],
        map_cols: None,
    },
    Case {
        name: "sd21 cross 16x16 +maps",
        b: 2,
        h: 20,
        lq: 256,
        lk: 77,
        d: 64,
        words: &[&[2], &[5, 6]],
        map_cols: None,
    },
    Case {
        name: "flux joint 1024px +maps",
        b: 1,
        h: 24,
        lq: 4608,
        lk: 4608,
        d: 128,
        words: &[&[3], &[7, 8]],
        map_cols: Some((0, 512)),
    },
];

impl Case {
    fn capture(&self) -> Option<Capture> {
        (!self.words.is_empty()).then(|| Capture {
            words: self.words.iter().map(|w| w.to_vec()).collect(),
            softmax_cols: self.map_cols.map(|(a, b)| a..b),
        })
    }

    /// Tensor-core FLOPs of the forward (QK^T and PV).
    fn fwd_gflop(&self) -> f64 {
        4.0 * (self.b * self.h * self.lq * self.lk * self.d) as f64 / 1e9
    }

    fn to_json(&self) -> Value {
        json!({"name": self.name, "b": self.b, "h": self.h, "lq": self.lq, "lk": self.lk,
               "d": self.d, "words": self.words, "map_cols": self.map_cols})
    }
}

fn time_ours(
    dev: &Arc<CudaDevice>,
    c: &Case,
    args: &AttentionArgs,
) -> steer::Result<(Timing, Timing)> {
    let up = |shape: &[usize], dtype, seed| Tensor::randn(shape, dtype, seed).to_cuda(dev);
    let q = up(&[c.b, c.h, c.lq, c.d], DType::BF16, 1)?;
    let k = up(&[c.b, c.h, c.lk, c.d], DType::BF16, 2)?;
    let v = up(&[c.b, c.h, c.lk, c.d], DType::BF16, 3)?;
    let dout = up(&[c.b, c.h, c.lq, c.d], DType::BF16, 4)?;
    let capture = c.capture();
    let dmaps = up(&[c.b, c.words.len().max(1), c.h, c.lq], DType::F32, 5)?;
    let scale = 1.0 / (c.d as f64).sqrt();
    let fwd = time_calls(args.warmup, args.repeats, || {
        ops::attention(&q, &k, &v, scale, capture.as_ref())?;
        dev.synchronize()
    })?;
    let fwd_bwd = time_calls(args.warmup, args.repeats, || {
        ops::attention(&q, &k, &v, scale, capture.as_ref())?;
        let cap = capture.as_ref().map(|cap| (cap, &dmaps));
        ops::attention_backward(&q, &k, &v, scale, &dout, cap, true)?;
        dev.synchronize()
    })?;
    Ok((fwd, fwd_bwd))
}

pub fn run(args: AttentionArgs) -> Result<(), String> {
    if args.repeats == 0 {
        return Err("--repeats must be at least 1".into());
    }
    let dev = CudaDevice::new(args.gpu).map_err(|e| e.to_string())?;
    let mut ours = Vec::new();
    for c in CASES {
        let t = time_ours(&dev, c, &args).map_err(|e| format!("{}: {e}", c.name))?;
        eprintln!(
            "ours  {}: fwd {:.3} ms, fwd+bwd {:.3} ms",
            c.name,
            t.0.median_s * 1e3,
            t.1.median_s * 1e3
        );
        ours.push(t);
    }
    let torch = if args.no_torch {
        Err("--no-torch".to_string())
    } else {
        let cases = Value::Array(CASES.iter().map(Case::to_json).collect());
        let script_args = [
            "--cases".to_string(),
            cases.to_string(),
            "--repeats".into(),
            args.repeats.to_string(),
            "--warmup".into(),
            args.warmup.to_string(),
        ];
        run_python_script(
            args.python.clone(),
            "bench_attention.py",
            BENCH_ATTENTION_PY,
            &script_args,
            1,
        )
    };
    let torch_t = |case: &str, variant: &str, pass: &str| -> Option<Timing> {
        let cases = torch.as_ref().ok()?.get("cases")?.as_array()?;
        let c = cases
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(case))?;
        Timing::from_json(c.get(variant)?.get(pass)?)
    };

    println!();
    println!(
        "steer-bench attention: bf16, median of {} call(s) after {} warm-up",
        args.repeats, args.warmup
    );
    match &torch {
        Ok(r) => println!(
            "baseline: PyTorch {} on {}",
            r.get("torch").and_then(Value::as_str).unwrap_or("?"),
            r.get("device").and_then(Value::as_str).unwrap_or("?")
        ),
        Err(why) => println!("baseline: none ({why})"),
    }
    println!(
        "{:<26} {:>8} {:>9} {:>8} {:>11} {:>11}",
        "case / pass", "GFLOP", "ours ms", "TFLOP/s", "/ torch sdpa", "/ torch expl."
    );
    let mut rows = Vec::new();
    for (c, (fwd, fwd_bwd)) in CASES.iter().zip(&ours) {
        for (pass, key, t, gflop) in [
            ("fwd", "fwd", fwd, c.fwd_gflop()),
            ("fwd+bwd", "fwd_bwd", fwd_bwd, 3.5 * c.fwd_gflop()),
        ] {
            let ratio = |variant| torch_t(c.name, variant, key).map(|tt| t.median_s / tt.median_s);
            let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
            println!(
                "{:<26} {:>8.1} {:>9.3} {:>8.1} {:>11} {:>11}",
                format!("{} {pass}", c.name),
                gflop,
                t.median_s * 1e3,
                gflop / t.median_s / 1e3,
                show(ratio("sdpa")),
                show(ratio("explicit")),
            );
            rows.push(json!({
                "case": c.name, "pass": pass, "gflop": gflop,
                "ours": {"median_s": t.median_s, "min_s": t.min_s},
                "torch_sdpa": torch_t(c.name, "sdpa", key).map(|t| json!({"median_s": t.median_s})),
                "torch_explicit": torch_t(c.name, "explicit", key).map(|t| json!({"median_s": t.median_s})),
            }));
        }
    }
    println!(
        "(fwd+bwd GFLOP counts ours: 2 forwards + the backward's 5 products = 3.5x the forward)"
    );
    if let Some(path) = &args.json {
        let report = json!({"bench": "attention", "torch": torch.as_ref().ok(), "torch_absent_reason": torch.as_ref().err(), "rows": rows});
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
