//! `steer-bench unet` times the full-size SD2.1 UNet on the CPU (fp32, batch 1, 64x64 latent,
//! conditional pass only) next to PyTorch + diffusers on the same machine, weights and inputs:
//!
//! - `forward`: `UNet2DConditionModel::forward` without capture or tape; torch: `unet(...)` under
//!   `no_grad` with diffusers' default (SDPA) attention processors;
//! - `forward+backward`: `unet_with_maps` (every cross-attention layer's maps of the captured
//!   words, SPEC section 3, keeping the tape) then `sample_grad` of `sum(maps * cotangent)`;
//!   torch: the same forward with a probability-materialising processor on attn2 (SDPA on attn1),
//!   the same maps, and autograd to the sample.
//!
//! The PyTorch side (tests/reference/bench_unet.py, embedded, in a process of its own) builds the
//! random-weight model once and saves it with `save_pretrained` in the cache folder, and writes
//! the inputs (sample, context, cotangent) and its outputs there; we load that model and those
//! inputs and time the same cases. The two sides take turns call by call (torch's call, then
//! ours, warm-ups included), so a drift in the machine's speed falls on both alike and only one
//! side computes at a time. We report the relative error of our output, maps and latent gradient
//! against torch's. Peak memory is each
//! side's resident high-water mark over one case's calls (reset before the case, so the weights
//! count and model loading does not).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};
use steer::models::unet::UNet2DConditionModel;
use steer::safetensors_io::SafetensorsFile;
use steer::steering::unet_maps::unet_with_maps;
use steer::{DType, Tensor};

use crate::common::{
    cpu_seconds, init_threads, load_average, peak_rss_gib, reset_peak_rss, rss_gib, torch_turn,
    PythonSide, Timing,
};

/// The PyTorch side, embedded so the binary works from any directory.
const BENCH_UNET_PY: &str = include_str!("../../../tests/reference/bench_unet.py");

/// Names shared with bench_unet.py (RANDOM_DIR, INPUTS, OUTPUTS there).
const RANDOM_DIR: &str = "sd21-unet-random";
const INPUTS: &str = "unet-inputs.safetensors";
const OUTPUTS: &str = "unet-torch-outputs.safetensors";
const TEXT_TOKENS: usize = 77;
/// The target: our time at most this multiple of torch's, for both cases.
const TARGET_RATIO: f64 = 1.0;

#[derive(Args)]
pub struct UnetArgs {
    /// Threads for both sides (rayon's global pool; torch.set_num_threads). Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Timed calls per case; the median is reported.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Untimed calls per case before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Python with torch and diffusers for the baseline (default: $STEER_REF_VENV/bin/python,
    /// then ~/.cache/steer/ref-venv/bin/python, then python3 on PATH).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip the PyTorch baseline (and the comparison); needs the model from an earlier run, or
    /// --model.
    #[arg(long)]
    no_torch: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Folder for the random-weight model (DIR/sd21-unet-random, 3.5 GB, written once by the
    /// PyTorch side) and the tensors the two sides exchange. Default: ~/.cache/steer/bench.
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// A diffusers unet/ folder to time instead of the random-weight SD2.1 UNet.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// The diffusion timestep of every call.
    #[arg(long, default_value_t = 500)]
    timestep: u32,
    /// The captured words: a JSON list of token index lists into the 77 text tokens.
    #[arg(long, default_value = "[[2], [5, 6]]")]
    words: String,
}

/// One case on one side.
#[derive(Clone, Copy, Default)]
struct Measured {
    total: Option<Timing>,
    /// forward+backward only: its two halves.
    forward: Option<Timing>,
    backward: Option<Timing>,
    /// Median process CPU time (user + system, all threads) of one call.
    cpu_s: Option<f64>,
    peak_gib: Option<f64>,
    rss_before_gib: Option<f64>,
}

impl Measured {
    fn from_json(case: Option<&Value>) -> Measured {
        let Some(c) = case else {
            return Measured::default();
        };
        let half = |p: &str| {
            Some(Timing {
                median_s: c.get(format!("{p}_median_s"))?.as_f64()?,
                min_s: c.get(format!("{p}_min_s"))?.as_f64()?,
            })
        };
        Measured {
            total: Timing::from_json(c),
            forward: half("forward"),
            backward: half("backward"),
            cpu_s: c.get("cpu_median_s").and_then(Value::as_f64),
            peak_gib: c.get("peak_rss_gib").and_then(Value::as_f64),
            rss_before_gib: c.get("rss_before_gib").and_then(Value::as_f64),
        }
    }

    fn to_json(self) -> Value {
        let t = |t: Option<Timing>| t.map(|t| json!({"median_s": t.median_s, "min_s": t.min_s}));
        json!({
            "time": t(self.total),
            "forward": t(self.forward),
            "backward": t(self.backward),
            "cpu_median_s": self.cpu_s,
            "peak_rss_gib": self.peak_gib,
            "rss_before_gib": self.rss_before_gib,
        })
    }
}

fn steer_err<T>(r: steer::Result<T>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// The inputs both sides use: bench_unet.py's file when it fits the model, else our own draw.
struct Inputs {
    sample: Tensor,
    context: Tensor,
    /// (words, N, 16, 16); None: drawn once the maps' shape is known.
    cotangent: Option<Tensor>,
    source: String,
}

fn read_inputs(path: &Path, unet: &UNet2DConditionModel) -> Result<Inputs, String> {
    let cfg = &unet.config;
    let size = cfg.sample_size.unwrap_or(64);
    let sample_shape = [1, cfg.in_channels, size, size];
    let context_shape = [1, TEXT_TOKENS, cfg.cross_attention_dim];
    let draw = |why: String| Inputs {
        sample: Tensor::randn(&sample_shape, DType::F32, 1),
        context: Tensor::randn(&context_shape, DType::F32, 2),
        cotangent: None,
        source: format!("drawn here ({why})"),
    };
    if !path.exists() {
        return Ok(draw(format!("no {}", path.display())));
    }
    let file = steer_err(SafetensorsFile::open(path), "inputs")?;
    let read = |name: &str, shape: Option<&[usize]>| -> Result<Tensor, String> {
        let t = steer_err(file.tensor(name), "inputs")?;
        if let Some(shape) = shape {
            if t.shape() != shape {
                return Err(format!(
                    "{}: `{name}` is {:?}, the model wants {shape:?}",
                    path.display(),
                    t.shape()
                ));
            }
        }
        steer_err(t.to_dtype(DType::F32), "inputs")
    };
    match (
        read("sample", Some(&sample_shape)),
        read("encoder_hidden_states", Some(&context_shape)),
    ) {
        (Ok(sample), Ok(context)) => Ok(Inputs {
            sample,
            context,
            cotangent: read("maps_cotangent", None).ok(),
            source: path.display().to_string(),
        }),
        (Err(e), _) | (_, Err(e)) => Ok(draw(e)),
    }
}

/// `f` called `warmup` then `repeats` times, each call after one of torch's; each returns its
/// (forward, backward) seconds (backward 0 for a forward alone; `split`: report the two halves).
/// Returns the timings and the case's peak memory.
fn time_case(
    label: &str,
    split: bool,
    warmup: usize,
    repeats: usize,
    torch: &mut Result<PythonSide, String>,
    mut f: impl FnMut() -> Result<(f64, f64), String>,
) -> Result<Measured, String> {
    let rss_before_gib = rss_gib();
    reset_peak_rss();
    for i in 0..warmup {
        torch_turn(torch);
        let (a, b) = f()?;
        eprintln!("ours  {label} warm-up {}/{warmup}: {:.2} s", i + 1, a + b);
    }
    let (mut fwd, mut bwd, mut total, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..repeats {
        torch_turn(torch);
        let c0 = cpu_seconds();
        let (a, b) = f()?;
        if let (Some(c0), Some(c1)) = (c0, cpu_seconds()) {
            cpu.push(c1 - c0);
        }
        eprintln!("ours  {label} {}/{repeats}: {:.2} s", i + 1, a + b);
        fwd.push(a);
        bwd.push(b);
        total.push(a + b);
    }
    Ok(Measured {
        total: Some(Timing::of(&total)),
        forward: split.then(|| Timing::of(&fwd)),
        backward: split.then(|| Timing::of(&bwd)),
        cpu_s: (!cpu.is_empty()).then(|| Timing::of(&cpu).median_s),
        peak_gib: peak_rss_gib(),
        rss_before_gib,
    })
}

fn default_cache() -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or("HOME is not set: pass --cache DIR")?;
    Ok(PathBuf::from(home).join(".cache/steer/bench"))
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

pub fn run(args: UnetArgs) -> Result<(), String> {
    if args.repeats == 0 {
        return Err("--repeats must be at least 1".into());
    }
    let words: Vec<Vec<usize>> = serde_json::from_str(&args.words)
        .map_err(|e| format!("--words must be a JSON list of token index lists: {e}"))?;
    if words.is_empty() || words.iter().any(Vec::is_empty) {
        return Err("--words: at least one word, each with at least one token index".into());
    }
    let threads = init_threads(args.threads)?;
    let cache = match &args.cache {
        Some(c) => c.clone(),
        None => default_cache()?,
    };
    let model_dir = args.model.clone().unwrap_or_else(|| cache.join(RANDOM_DIR));
    let load_before = load_average();

    // ---- PyTorch, in its own process: it writes the model on the first run, then waits for its
    // first turn.
    let mut torch = if args.no_torch {
        Err("--no-torch".to_string())
    } else {
        let mut script_args = vec![
            "--threads".to_string(),
            threads.to_string(),
            "--repeats".into(),
            args.repeats.to_string(),
            "--warmup".into(),
            args.warmup.to_string(),
            "--cache".into(),
            cache.display().to_string(),
            "--timestep".into(),
            args.timestep.to_string(),
            "--words".into(),
            serde_json::to_string(&words).map_err(|e| e.to_string())?,
        ];
        if let Some(m) = &args.model {
            script_args.extend(["--model".to_string(), m.display().to_string()]);
        }
        PythonSide::start(
            args.python.clone(),
            "bench_unet.py",
            BENCH_UNET_PY,
            &script_args,
            threads,
            true,
        )
    };
    if let Err(why) = &torch {
        eprintln!("no PyTorch baseline: {why}");
    }

    // ---- ours
    if !model_dir.join("config.json").exists() {
        let why = match &torch {
            Ok(_) => "the PyTorch side did not write it".to_string(),
            Err(e) => {
                format!("the PyTorch side writes it on its first run, and it did not run: {e}")
            }
        };
        return Err(format!(
            "no UNet at {} ({why}); or pass --model DIR (a diffusers unet/ folder)",
            model_dir.display()
        ));
    }
    eprintln!("loading {} ...", model_dir.display());
    let t0 = Instant::now();
    let unet = steer_err(
        UNet2DConditionModel::from_dir(&model_dir),
        "loading the UNet",
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    eprintln!("ours  loaded in {load_s:.1} s");
    let inputs = read_inputs(&cache.join(INPUTS), &unet)?;
    let t = f64::from(args.timestep);
    let (sample, context) = (&inputs.sample, &inputs.context);

    let mut out = None;
    let forward = time_case(
        "forward",
        false,
        args.warmup,
        args.repeats,
        &mut torch,
        || {
            out = None; // the previous result does not stay alive through the next call
            let t0 = Instant::now();
            let o = steer_err(unet.forward(sample, t, context, None, false), "forward")?.out;
            let s = t0.elapsed().as_secs_f64();
            out = Some(o);
            Ok((s, 0.0))
        },
    )?;

    let mut cot: Option<Tensor> = None;
    let mut maps_grad: Option<(Tensor, Tensor)> = None;
    let capture = time_case(
        "forward+backward",
        true,
        args.warmup,
        args.repeats,
        &mut torch,
        || {
            maps_grad = None;
            let t0 = Instant::now();
            let o = steer_err(
                unet_with_maps(&unet, sample, t, context, &words, true),
                "forward with capture",
            )?;
            let t1 = Instant::now();
            if cot.is_none() {
                let c = match &inputs.cotangent {
                    Some(c) if c.numel() == o.maps.numel() => c.reshape(o.maps.shape()),
                    _ => Ok(Tensor::randn(o.maps.shape(), DType::F32, 3)),
                };
                cot = Some(steer_err(c, "cotangent")?);
            }
            let dmaps = cot.as_ref().expect("set above");
            let g = steer_err(o.sample_grad(&unet, dmaps), "backward to the sample")?;
            let t2 = Instant::now();
            maps_grad = Some((o.maps.clone(), g));
            Ok(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()))
        },
    )?;
    let load_after = load_average();
    let torch = torch.and_then(PythonSide::finish);
    if let Err(why) = &torch {
        eprintln!("no PyTorch baseline: {why}");
    }
    let torch_case = |name: &str| {
        torch
            .as_ref()
            .ok()
            .and_then(|r| r.get("cases")?.as_array())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
            })
    };

    // ---- agreement with torch on the same inputs
    let mut errors: Vec<(&str, Result<f64, String>)> = Vec::new();
    if let Ok(report) = &torch {
        let compare = |ours: Option<&Tensor>, name: &str| -> Result<f64, String> {
            let path = report
                .get("outputs")
                .and_then(Value::as_str)
                .map_or_else(|| cache.join(OUTPUTS), PathBuf::from);
            let file = steer_err(SafetensorsFile::open(&path), "torch outputs")?;
            let theirs = steer_err(file.tensor(name), "torch outputs")?;
            let ours = ours.ok_or("no result of ours")?;
            let ours = steer_err(ours.reshape(theirs.shape()), name)?;
            steer_err(ours.rel_error(&theirs), name)
        };
        let used_same = inputs.cotangent.is_some() && !inputs.source.starts_with("drawn");
        if used_same {
            errors.push(("out (forward)", compare(out.as_ref(), "out")));
            let (m, g) = maps_grad.as_ref().map(|(m, g)| (m, g)).unzip();
            errors.push(("maps", compare(m, "maps")));
            errors.push(("sample_grad", compare(g, "sample_grad")));
        } else {
            errors.push((
                "all",
                Err(format!(
                    "not compared: our inputs were {} instead of torch's",
                    inputs.source
                )),
            ));
        }
    }

    // ---- the table
    let t_fwd = Measured::from_json(torch_case("forward"));
    let t_cap = Measured::from_json(torch_case("capture"));
    println!();
    println!(
        "steer-bench unet: SD2.1 UNet ({}), fp32, batch 1, latent {}x{}, t = {}, {} captured \
         word(s); {threads} thread(s), median of {} call(s) after {} warm-up",
        torch
            .as_ref()
            .ok()
            .and_then(|r| r.get("model_source")?.as_str())
            .map_or_else(|| model_dir.display().to_string(), String::from),
        sample.shape()[2],
        sample.shape()[3],
        args.timestep,
        words.len(),
        args.repeats,
        args.warmup
    );
    println!("model: {}", model_dir.display());
    match &torch {
        Ok(report) => {
            let s = |k: &str| report.get(k).and_then(Value::as_str).unwrap_or("?");
            let tthreads = report.get("threads").and_then(Value::as_u64).unwrap_or(0);
            println!(
                "baseline: PyTorch {} + diffusers {} on CPU, {tthreads} thread(s); its calls and \
                 ours alternate",
                s("torch"),
                s("diffusers")
            );
            if tthreads as usize != threads {
                println!("warning: torch ran with {tthreads} threads, ours with {threads}");
            }
        }
        Err(why) => println!("baseline: none ({why})"),
    }
    println!(
        "{:<28} {:>8} {:>8} {:>11} {:>9} {:>9} {:>10}",
        "case", "ours s", "torch s", "ours/torch", "(min t)", "ours GiB", "torch GiB"
    );
    let ratio = |o: Option<Timing>, t: Option<Timing>| -> (Option<f64>, Option<f64>) {
        match (o, t) {
            (Some(o), Some(t)) => (Some(o.median_s / t.median_s), Some(o.min_s / t.min_s)),
            _ => (None, None),
        }
    };
    let row = |name: &str, o: Option<Timing>, t: Option<Timing>, og: Option<f64>, tg| {
        let (r, rmin) = ratio(o, t);
        println!(
            "{:<28} {:>8} {:>8} {:>11} {:>9} {:>9} {:>10}",
            name,
            fmt_opt(o.map(|o| o.median_s), |v| format!("{v:.2}")),
            fmt_opt(t.map(|t| t.median_s), |v| format!("{v:.2}")),
            fmt_opt(r, |v| format!("{v:.2}x")),
            fmt_opt(rmin, |v| format!("{v:.2}x")),
            fmt_opt(og, |v| format!("{v:.2}")),
            fmt_opt(tg, |v| format!("{v:.2}")),
        );
        r
    };
    let r_fwd = row(
        "forward",
        forward.total,
        t_fwd.total,
        forward.peak_gib,
        t_fwd.peak_gib,
    );
    let r_cap = row(
        "forward+backward (capture)",
        capture.total,
        t_cap.total,
        capture.peak_gib,
        t_cap.peak_gib,
    );
    row(
        "  of which forward+capture",
        capture.forward,
        t_cap.forward,
        None,
        None,
    );
    row(
        "  of which backward",
        capture.backward,
        t_cap.backward,
        None,
        None,
    );
    if let (Some(a), Some(b)) = (r_fwd, r_cap) {
        let verdict = |r: f64| if r <= TARGET_RATIO { "met" } else { "NOT met" };
        println!(
            "target <= {TARGET_RATIO:.1}x torch (median): forward {a:.2}x {}, forward+backward \
             {b:.2}x {}",
            verdict(a),
            verdict(b)
        );
    }
    if !errors.is_empty() {
        let text: Vec<String> = errors
            .iter()
            .map(|(name, e)| match e {
                Ok(v) => format!("{name} {v:.2e}"),
                Err(why) => format!("{name}: {why}"),
            })
            .collect();
        println!(
            "ours vs torch, same weights and inputs (max|diff| / max|torch|): {}",
            text.join(", ")
        );
    }
    if let Some(e) = torch
        .as_ref()
        .ok()
        .and_then(|r| r.get("capture_vs_sdpa_out_rel_err")?.as_f64())
    {
        println!("torch's capture processor vs its SDPA forward, out: {e:.2e}");
    }
    println!(
        "CPU time per call (user + system, all threads, spin-waits included): forward ours {}, \
         torch {}; forward+backward ours {}, torch {}",
        fmt_opt(forward.cpu_s, |v| format!("{v:.1} s")),
        fmt_opt(t_fwd.cpu_s, |v| format!("{v:.1} s")),
        fmt_opt(capture.cpu_s, |v| format!("{v:.1} s")),
        fmt_opt(t_cap.cpu_s, |v| format!("{v:.1} s")),
    );
    let torch_load = torch.as_ref().ok().and_then(|r| r.get("load_s")?.as_f64());
    println!(
        "model loading (not in the table): ours {load_s:.1} s, torch {}; memory: resident \
         high-water mark over each case's calls, weights included (resident before the case: \
         ours {}, torch {} GiB)",
        fmt_opt(torch_load, |v| format!("{v:.1} s")),
        fmt_opt(forward.rss_before_gib, |v| format!("{v:.2}")),
        fmt_opt(t_fwd.rss_before_gib, |v| format!("{v:.2}")),
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if let (Some(a), Some(b)) = (load_before, load_after) {
        let noisy = if a.max(b) > 0.5 {
            ": other processes shared the cores, so these figures are noisy (the min-time ratio \
             suffers least)"
        } else {
            ""
        };
        println!("load average: {a:.1} before, {b:.1} after ({cores} cores){noisy}");
    }

    if let Some(path) = &args.json {
        let report = json!({
            "bench": "unet",
            "dtype": "f32",
            "model_dir": model_dir.display().to_string(),
            "threads": threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timestep": args.timestep,
            "words": words,
            "inputs": inputs.source,
            "torch_version": torch.as_ref().ok().and_then(|r| r.get("torch")).cloned(),
            "diffusers_version": torch.as_ref().ok().and_then(|r| r.get("diffusers")).cloned(),
            "torch_absent_reason": torch.as_ref().err(),
            "load_s": {"ours": load_s, "torch": torch_load},
            "cases": [
                {
                    "name": "forward",
                    "ours": forward.to_json(),
                    "torch": t_fwd.to_json(),
                    "ratio_time_ours_over_torch": r_fwd,
                    "ratio_min_time_ours_over_torch": ratio(forward.total, t_fwd.total).1,
                },
                {
                    "name": "forward+backward (capture)",
                    "ours": capture.to_json(),
                    "torch": t_cap.to_json(),
                    "ratio_time_ours_over_torch": r_cap,
                    "ratio_min_time_ours_over_torch": ratio(capture.total, t_cap.total).1,
                },
            ],
            "rel_errors_vs_torch": errors
                .iter()
                .map(|(n, e)| (n.to_string(), e.as_ref().map_or_else(|w| json!(w), |v| json!(v))))
                .collect::<serde_json::Map<_, _>>(),
            "torch_capture_vs_sdpa_out_rel_err": torch.as_ref().ok().and_then(|r| r.get("capture_vs_sdpa_out_rel_err")).cloned(),
            "load_average": {"before": load_before, "after": load_after, "cores": cores},
            "torch_report": torch.as_ref().ok(),
        });
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
