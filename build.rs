//! Compiles `kernels/*.cu` twice: to PTX with nvcc, embedded in the crate for the GPU, and as
//! host C++ through the emulation header `kernels/emu.h`, linked in so that the kernels run
//! without a GPU (`steer::cuda::emulated`, tested in CI).
//!
//! nvcc is looked for in `NVCC`, then `CUDA_HOME/bin/nvcc`, then `PATH`. Without one the build is
//! CPU-only (a cargo warning says so) and the CUDA backend reports "built without kernels". With
//! one, a kernel that does not compile fails the build. The result is `$OUT_DIR/kernels.rs`:
//! `KERNELS`, a list of (module name, PTX text) that `src/cuda` loads into each context.
//!
//! Setting `STEER_REQUIRE_GPU=1` also sets the cfg `steer_require_gpu`, which turns the GPU tests
//! in tests/cuda.rs from "ignored" into tests that must find a GPU.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// PTX for compute_80 is JIT-compiled by the driver for Ampere and Hopper alike.
const ARCH: &str = "compute_80";

fn main() {
    println!("cargo::rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "PATH", "STEER_REQUIRE_GPU"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(steer_require_gpu)");
    if env::var("STEER_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=steer_require_gpu");
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let sources = kernel_sources(Path::new("kernels"));
    let modules: Vec<(String, PathBuf)> = match find_nvcc() {
        Some(nvcc) => sources
            .iter()
            .map(|src| compile(&nvcc, src, &out_dir))
            .collect(),
        None => {
            println!(
                "cargo::warning=steer: nvcc not found (NVCC, CUDA_HOME/bin/nvcc, PATH): building \
                 CPU-only; the CUDA backend will report \"built without kernels\"."
            );
            println!(
                "cargo::warning=steer: for a CUDA build, `pip install --target DIR \
                 nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
                 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85` and rebuild with \
                 NVCC=DIR/nvidia/cu13/bin/nvcc (see README)."
            );
            Vec::new()
        }
    };

    let mut generated = String::from("/// (module name, PTX) for every kernels/*.cu.\n");
    generated.push_str("pub(crate) const KERNELS: &[(&str, &str)] = &[\n");
    for (name, ptx) in &modules {
        writeln!(
            generated,
            "    ({name:?}, include_str!({:?})),",
            ptx.display().to_string()
        )
        .expect("writing to a String cannot fail");
    }
    generated.push_str("];\n");
    let path = out_dir.join("kernels.rs");
    fs::write(&path, generated)
        .unwrap_or_else(|e| fail(format!("writing {}: {e}", path.display())));

    compile_emulation(&sources, &out_dir);
}

/// Compiles every kernel file as host C++ (C++20 for the emulation header) into one static
/// library, and writes `$OUT_DIR/emu_kernels.rs`: the launcher each `STEER_EMU_EXPORT(name)`
/// defines, as `EMU_KERNELS`, a list of (kernel name, launcher).
fn compile_emulation(sources: &[PathBuf], out_dir: &Path) {
    let mut names = Vec::new();
    for src in sources {
        let text = fs::read_to_string(src)
            .unwrap_or_else(|e| fail(format!("reading {}: {e}", src.display())));
        names.extend(text.lines().filter_map(|line| {
            let rest = line.trim().strip_prefix("STEER_EMU_EXPORT(")?;
            Some(rest.split(')').next()?.trim().to_string())
        }));
    }
    if !sources.is_empty() {
        cc::Build::new()
            .cpp(true)
            .std("c++20")
            // g++ does not know the .cu extension; -x must come before the file.
            .flag("-x")
            .flag("c++")
            .define("STEER_EMULATE", None)
            .include("kernels")
            // Fibers and the emulated mma are slow unoptimised, whatever the profile.
            .opt_level(2)
            // Keep a * b - c two roundings, as the GPU kernels ask with __fmul_rn/__fsub_rn.
            .flag("-ffp-contract=off")
            .flag("-Wno-unknown-pragmas")
            .files(sources)
            .compile("steer_kernels_emu");
    }
    let mut generated = String::from(
        "// The emulated launchers (kernels/emu.h, STEER_EMU_EXPORT), by kernel name.\n",
    );
    generated.push_str("extern \"C\" {\n");
    for name in &names {
        writeln!(
            generated,
            "    fn steer_emu_{name}(grid: *const u32, block: *const u32, smem: u32, \
             args: *mut *mut std::ffi::c_void) -> i32;"
        )
        .expect("writing to a String cannot fail");
    }
    generated.push_str("}\npub(crate) const EMU_KERNELS: &[(&str, EmuLaunch)] = &[\n");
    for name in &names {
        writeln!(generated, "    ({name:?}, steer_emu_{name}),")
            .expect("writing to a String cannot fail");
    }
    generated.push_str("];\n");
    let path = out_dir.join("emu_kernels.rs");
    fs::write(&path, generated)
        .unwrap_or_else(|e| fail(format!("writing {}: {e}", path.display())));
}

/// The `.cu` files in `dir`, sorted so the generated list is stable.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sources: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| fail(format!("reading {}: {e}", dir.display())))
                .path()
        })
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    sources
}

/// nvcc from `NVCC`, `CUDA_HOME/bin/nvcc` or `PATH`, resolved to its real path: nvcc finds its
/// own tools relative to the path it was started by, so a symlink to it does not work.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        // An explicit choice that does not exist is a mistake to report, not to fall back from.
        let nvcc = PathBuf::from(nvcc);
        return Some(
            fs::canonicalize(&nvcc)
                .unwrap_or_else(|e| fail(format!("NVCC={}: {e}", nvcc.display()))),
        );
    }
    let from_cuda_home = env::var_os("CUDA_HOME").map(|home| Path::new(&home).join("bin/nvcc"));
    let from_path = env::var_os("PATH")
        .map(|path| {
            env::split_paths(&path)
                .map(|dir| dir.join("nvcc"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_cuda_home
        .into_iter()
        .chain(from_path)
        .find(|p| p.is_file())
        .map(|p| fs::canonicalize(&p).unwrap_or_else(|e| fail(format!("{}: {e}", p.display()))))
}

/// Compiles one `.cu` file to `$OUT_DIR/<stem>.ptx`; fails the build with nvcc's output.
fn compile(nvcc: &Path, src: &Path, out_dir: &Path) -> (String, PathBuf) {
    let name = src
        .file_stem()
        .expect("a .cu file has a stem")
        .to_string_lossy()
        .into_owned();
    let ptx = out_dir.join(format!("{name}.ptx"));
    let output = Command::new(nvcc)
        .args([
            "-ptx",
            &format!("-arch={ARCH}"),
            "-std=c++17",
            "-O3",
            "-Ikernels",
            "-o",
        ])
        .arg(&ptx)
        .arg(src)
        .output()
        .unwrap_or_else(|e| fail(format!("running {}: {e}", nvcc.display())));
    if !output.status.success() {
        fail(format!(
            "nvcc failed on {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    (name, ptx)
}

/// Fails the build with `msg` alone (a panic would bury it under a backtrace).
fn fail(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
