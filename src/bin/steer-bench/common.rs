//! What the benchmarks share: timing summaries, the thread pool, the load average, peak memory,
//! and running an embedded PyTorch script with the reference venv's Python.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;

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
    f: impl FnMut() -> steer::Result<T>,
) -> steer::Result<Timing> {
    Ok(Timing::of(&call_times(warmup, repeats, f)?))
}

/// `warmup` untimed calls of `f`, then the wall time of each of `repeats` calls, in seconds.
pub fn call_times<T>(
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> steer::Result<T>,
) -> steer::Result<Vec<f64>> {
    for _ in 0..warmup {
        std::hint::black_box(f()?);
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = std::time::Instant::now();
        std::hint::black_box(f()?);
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(times)
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

/// The pause around each of the PyTorch side's turns.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);

/// A PyTorch script (the text of `tests/reference/<name>`, embedded in this binary) running in
/// its own process, with the Python that `find_python` picks, `args`, and the thread count in the
/// environment. Its stderr (progress) is passed through as it comes; its report is the last
/// stdout line that is a JSON object.
///
/// Started with turns (the script gets `--turns`), the script stops before each turn (one call,
/// or a round of calls), prints `READY` and waits for a `go` line, so that its work and ours
/// alternate: the speed of this project's shared machines drifts by tens of percent over
/// minutes, and timing one side after the other put all of that drift on one side. Only one side
/// computes at a time.
pub struct PythonSide {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<Vec<String>>>,
    /// Stdout lines that were not `READY` (the report among them).
    lines: Vec<String>,
    python: PathBuf,
    how: String,
    name: String,
}

impl PythonSide {
    /// Start the script; with `turns`, return once it is waiting at its first turn. An error says
    /// why there is no baseline (no Python, no torch, a failure).
    pub fn start(
        explicit: Option<PathBuf>,
        name: &str,
        script: &str,
        args: &[String],
        threads: usize,
        turns: bool,
    ) -> Result<PythonSide, String> {
        let (python, how) = find_python(explicit);
        eprintln!(
            "running the PyTorch baseline ({name}) with {} (from {how}){} ...",
            python.display(),
            if turns { ", in turns with ours" } else { "" }
        );
        // `-c`: stdin stays free for the turns.
        let mut child = Command::new(&python)
            .arg("-c")
            .arg(script)
            .args(args)
            .args(turns.then_some("--turns"))
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
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut side = PythonSide {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            lines: Vec::new(),
            python,
            how,
            name: name.to_string(),
        };
        if turns && !side.wait_ready() {
            return Err(side.failure());
        }
        Ok(side)
    }

    /// Read stdout up to the next `READY` (true) or its end (false).
    fn wait_ready(&mut self) -> bool {
        let mut line = String::new();
        loop {
            line.clear();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) if line.trim_end() == "READY" => return true,
                Ok(_) => self.lines.push(line.trim_end().to_string()),
            }
        }
    }

    /// Let the script take its next turn, and wait until it has and is waiting again. A pause
    /// before and after lets the side that just finished go idle (GNU OpenMP's threads, and
    /// rayon's, spin for a while before they sleep), so that its spinning does not take a core
    /// from the other side's timed calls.
    pub fn turn(&mut self) -> Result<(), String> {
        std::thread::sleep(SETTLE);
        let sent = self
            .stdin
            .as_mut()
            .is_some_and(|s| s.write_all(b"go\n").and_then(|()| s.flush()).is_ok());
        if sent && self.wait_ready() {
            std::thread::sleep(SETTLE);
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    /// Release the script from its last turn (if it has turns) and wait for its report.
    pub fn finish(mut self) -> Result<Value, String> {
        if let Some(mut s) = self.stdin.take() {
            // A script without turns never reads it; one that has exited cannot.
            let _ = s.write_all(b"go\n");
        }
        if self.wait_ready() {
            return Err(format!("{}: asked for more turns than ours", self.name));
        }
        let status = self.child.wait();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            return Err(self.failure());
        }
        let name = &self.name;
        let line = self
            .lines
            .iter()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .map_or("", String::as_str);
        serde_json::from_str(line).map_err(|e| {
            format!(
                "unreadable report from {name} ({e}): {}",
                self.lines.join("\n")
            )
        })
    }

    /// Why the script stopped: a missing module, or its exit status and last words.
    fn failure(&mut self) -> String {
        self.stdin = None;
        let status = self
            .child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        let stderr: Vec<String> = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let (python, how) = (self.python.display(), &self.how);
        let all = stderr.join("\n");
        for module in ["torch", "diffusers", "safetensors"] {
            if all.contains(&format!("No module named '{module}'")) {
                return format!(
                    "{python} (from {how}) has no {module}; tests/reference/setup_venv.sh makes a \
                     venv with it (then set STEER_REF_VENV or pass --python)"
                );
            }
        }
        let tail: Vec<&str> = stderr.iter().rev().take(3).map(String::as_str).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{python} (from {how}) stopped ({status}): {}",
            tail.join(" | ")
        )
    }
}

/// Let the PyTorch side (started with turns) take its next turn; if it fails, the baseline is
/// dropped with the reason and ours goes on alone.
pub fn torch_turn(torch: &mut Result<PythonSide, String>) {
    if let Ok(side) = torch {
        if let Err(why) = side.turn() {
            *torch = Err(why);
        }
    }
}

/// Run a script without turns to its end: [`PythonSide::start`] then [`PythonSide::finish`].
pub fn run_python_script(
    explicit: Option<PathBuf>,
    name: &str,
    script: &str,
    args: &[String],
    threads: usize,
) -> Result<Value, String> {
    PythonSide::start(explicit, name, script, args, threads, false)?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a bench script: `calls` turns, then its report.
    fn script(calls: usize) -> String {
        format!(
            "import sys\nassert sys.argv[-1] == '--turns'\nfor i in range({calls} + 1):\n    \
             print('READY', flush=True)\n    if not sys.stdin.readline():\n        \
             sys.exit('closed')\n    print(f'call {{i}}', file=sys.stderr)\nprint('{{\"calls\": {calls}}}')\n"
        )
    }

    fn start(text: &str) -> Result<PythonSide, String> {
        PythonSide::start(Some("python3".into()), "test", text, &[], 1, true)
    }

    #[test]
    fn turns_alternate_and_the_report_comes_last() {
        let mut side = start(&script(3)).expect("python3 runs the script");
        for _ in 0..3 {
            side.turn().expect("a turn");
        }
        let report = side.finish().expect("the report");
        assert_eq!(report["calls"], 3);
    }

    #[test]
    fn a_script_that_stops_early_is_an_error_naming_its_last_words() {
        let mut side = start(&script(1)).expect("python3 runs the script");
        side.turn().expect("the one call");
        // Its closing turn: after it the script reports and exits, so a further turn fails.
        let err = side.turn().expect_err("no third turn");
        assert!(err.contains("stopped"), "{err}");
        let err = start("import sys\nsys.exit('no torch here')")
            .err()
            .expect("no first turn");
        assert!(err.contains("no torch here"), "{err}");
    }

    #[test]
    fn a_script_that_wants_more_turns_than_ours_is_an_error() {
        let mut side = start(&script(2)).expect("python3 runs the script");
        side.turn().expect("a turn");
        let err = side.finish().expect_err("one turn short");
        assert!(err.contains("more turns"), "{err}");
    }
}
