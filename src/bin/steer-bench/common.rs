//! What the benchmarks share: timing summaries, the thread pool, the load average, peak memory,
//! and running an embedded PyTorch script with the reference venv's Python.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Median and minimum seconds of one call.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
}

impl Timing {
    /// The median and minimum of `times` (at least one).
    pub fn of(times: &[f64]) -> Timing {
        let mut t = times.to_vec();
        t.sort_by(f64::total_cmp);
        let n = t.len();
        let median_s = if n % 2 == 1 {
            t[n / 2]
        } else {
            0.5 * (t[n / 2 - 1] + t[n / 2])
        };
        Timing {
            median_s,
            min_s: t[0],
        }
    }

    /// `median_s` and `min_s` of a JSON object (the Python side's report of one case).
    pub fn from_json(v: &Value) -> Option<Timing> {
        Some(Timing {
            median_s: v.get("median_s")?.as_f64()?,
            min_s: v.get("min_s")?.as_f64()?,
        })
    }
}

/// `warmup` untimed calls of `f`, then the median and minimum wall time of `repeats` calls. A
/// call must finish its work before returning (a GPU call synchronizes).
pub fn time_calls<T>(
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> steer::Result<T>,
) -> steer::Result<Timing> {
    for _ in 0..warmup {
        std::hint::black_box(f()?);
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = std::time::Instant::now();
        std::hint::black_box(f()?);
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(Timing::of(&times))
}

/// Start rayon's global pool with `threads` (default: all cores); the count used.
pub fn init_threads(threads: Option<usize>) -> Result<usize, String> {
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
    Ok(threads)
}

/// The 1-minute load average (Linux), to flag runs that competed with other work.
pub fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

const GIB: f64 = (1u64 << 30) as f64;

/// A `/proc/self/status` field in KiB (Linux), as GiB.
fn status_gib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / GIB)
}

/// Resident memory now (VmRSS), GiB.
pub fn rss_gib() -> Option<f64> {
    status_gib("VmRSS")
}

/// The resident-set high-water mark (VmHWM) since the process started or since the last
/// `reset_peak_rss`, GiB.
pub fn peak_rss_gib() -> Option<f64> {
    status_gib("VmHWM")
}

/// Reset VmHWM to the current RSS (Linux >= 4.0: `5` into /proc/self/clear_refs). False where
/// that is not possible; `peak_rss_gib` is then the whole process's peak.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU time this process has used so far (user + system, all threads), seconds (Linux:
/// /proc/self/stat, in USER_HZ = 100 ticks).
pub fn cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on: utime is 14, stime 15.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The interpreter to use and how it was chosen.
pub fn find_python(explicit: Option<PathBuf>) -> (PathBuf, String) {
    if let Some(p) = explicit {
        return (p, "--python".into());
    }
    if let Some(v) = std::env::var_os("STEER_REF_VENV").filter(|v| !v.is_empty()) {
        return (
            PathBuf::from(v).join("bin/python"),
            "$STEER_REF_VENV".into(),
        );
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cache/steer/ref-venv/bin/python");
        if p.exists() {
            return (p, "~/.cache/steer/ref-venv".into());
        }
    }
    (PathBuf::from("python3"), "PATH".into())
}

/// Run `script` (the text of `tests/reference/<name>`, embedded in this binary) with the Python
/// that `find_python` picks, fed on stdin, with `args` and the thread count in the environment.
/// Its stderr (progress) is passed through as it comes; its report is the last stdout line that
/// is a JSON object. An error says why there is no report (no Python, no torch, a failure).
pub fn run_python_script(
    explicit: Option<PathBuf>,
    name: &str,
    script: &str,
    args: &[String],
    threads: usize,
) -> Result<Value, String> {
    let (python, how) = find_python(explicit);
    eprintln!(
        "running the PyTorch baseline ({name}) with {} (from {how}) ...",
        python.display()
    );
    let mut child = Command::new(&python)
        .arg("-")
        .args(args)
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {} (from {how}): {e}", python.display()))?;
    // Pass stderr through line by line, keeping it to explain a failure.
    let stderr = child.stderr.take().map(|s| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                eprintln!("  {line}");
                kept.push(line);
            }
            kept
        })
    });
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing the script to Python: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", python.display()))?;
    let stderr: Vec<String> = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !out.status.success() {
        let all = stderr.join("\n");
        for module in ["torch", "diffusers", "safetensors"] {
            if all.contains(&format!("No module named '{module}'")) {
                return Err(format!(
                    "{} (from {how}) has no {module}; tests/reference/setup_venv.sh makes a venv \
                     with it (then set STEER_REF_VENV or pass --python)",
                    python.display()
                ));
            }
        }
        let tail: Vec<&str> = stderr.iter().rev().take(3).map(String::as_str).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{} (from {how}) failed ({}): {}",
            python.display(),
            out.status,
            tail.join(" | ")
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| format!("unreadable report from {name} ({e}): {stdout}"))
}
