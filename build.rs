// Gives every binary an rpath to torch's lib folder (so no LD_LIBRARY_PATH is needed). The
// binaries that can use a device (train, embed, distance, rerank) also link libtorch.so without
// --as-needed, so libtorch_cuda is loaded when the wheel has it and the same build uses a GPU
// where one exists (tch-rs issues #907, #980); the others (prepare, score) never touch a device
// and do not pay for loading the CUDA libraries at start-up.
const DEVICE_BINS: [&str; 4] = [
    "simile-train",
    "simile-embed",
    "simile-distance",
    "simile-rerank",
];

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let torch_lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(lib) = &torch_lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        for bin in DEVICE_BINS {
            println!("cargo:rustc-link-arg-bin={bin}=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-bin={bin}=-L{lib}");
            println!("cargo:rustc-link-arg-bin={bin}=-ltorch");
        }
        // Tests and examples use devices too (tests/*.rs load models).
        println!("cargo:rustc-link-arg-tests=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-tests=-L{lib}");
        println!("cargo:rustc-link-arg-tests=-ltorch");
        println!("cargo:rustc-env=SIMILE_LIBTORCH_LIB={lib}");
    }
    build_shim(torch_lib.as_deref());
    // The commit recorded in manifests; empty outside a git checkout.
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=SIMILE_COMMIT={commit}");
    // Only paths that exist: cargo reruns a build script on every build for a missing one,
    // which would relink every binary and make the pipeline redo every stage.
    for p in [".git/HEAD", ".git/refs/heads"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}

/// Where Debian's libgloo-dev puts the gloo headers (the torch wheel has none, and
/// ProcessGroupGloo.hpp includes them). Both folders are on the compiler's default include path,
/// so only their presence is checked: adding `-I/usr/include` would break libstdc++'s
/// `#include_next`.
const GLOO_HEADER_DIRS: [&str; 2] = ["/usr/include", "/usr/local/include"];

/// Compiles `cpp/` (the C++ shim over libtorch's c10d and autocast, used only by
/// `src/torch_ext/`) into a static library linked into simile, against torch's own headers;
/// with the NCCL backend where libtorch has CUDA.
fn build_shim(torch_lib: Option<&str>) {
    println!("cargo:rerun-if-changed=cpp");
    let Some(lib) = torch_lib else {
        panic!(
            "simile: torch-sys gave no libtorch lib folder (DEP_TCH_LIBTORCH_LIB); \
             build with the torch wheel (`. scripts/env.sh`, or through make)"
        );
    };
    let Some(gloo) = GLOO_HEADER_DIRS
        .iter()
        .map(|d| std::path::Path::new(d).join("gloo/algorithm.h"))
        .find(|h| h.exists())
    else {
        panic!(
            "simile needs the gloo headers: install Debian's libgloo-dev (`make deps` does); \
             looked for gloo/algorithm.h in {}",
            GLOO_HEADER_DIRS.join(", ")
        );
    };
    println!("cargo:rerun-if-changed={}", gloo.display());
    let include = std::path::Path::new(lib).join("../include");
    let nccl = nccl_headers(lib);
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .file("cpp/simile_ext.cpp")
        .include("cpp")
        // Torch's headers as system headers: their warnings are not ours.
        .flag("-isystem")
        .flag(include.display().to_string())
        .flag("-isystem")
        .flag(include.join("torch/csrc/api/include").display().to_string())
        // As libtorch 2.13.0 was built (share/cmake/Caffe2/Caffe2Targets.cmake, TorchConfig.cmake).
        .flag("-std=c++20")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_DISTRIBUTED", None)
        .define("USE_C10D_GLOO", None);
    match &nccl {
        Some(dirs) => {
            build
                .file("cpp/simile_nccl.cpp")
                .define("USE_C10D_NCCL", None);
            for d in dirs {
                build.flag("-isystem").flag(d.display().to_string());
            }
        }
        None => {
            build.file("cpp/simile_no_nccl.cpp");
        }
    }
    build.compile("simile_ext");
    // The shim calls into libtorch_cpu and c10 (torch-sys links them too; named here so the
    // shim does not depend on that).
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl.is_some() {
        // ProcessGroupNCCL and c10::cuda, for the ranks that train on CUDA.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

/// The include folders ProcessGroupNCCL.hpp needs beyond torch's own, where libtorch has CUDA
/// (`libtorch_cuda.so` beside `libtorch_cpu.so`); `None` for a CPU-only libtorch, which has no
/// NCCL backend. The torch wheel ships NCCL's header (`nvidia-nccl-cu13`) and the CUDA runtime's
/// (`nvidia-cuda-runtime`), but the CUDA runtime headers include `crt/` and `cuda/std/` from
/// two wheels torch does not pull in, `nvidia-cuda-crt` and `nvidia-cuda-cccl`
/// (scripts/bootstrap-torch.sh installs them). A system CUDA (`CUDA_HOME`) serves as well.
fn nccl_headers(lib: &str) -> Option<Vec<std::path::PathBuf>> {
    use std::path::{Path, PathBuf};
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=SIMILE_NO_NCCL");
    if !Path::new(lib).join("libtorch_cuda.so").exists()
        || std::env::var_os("SIMILE_NO_NCCL").is_some()
    {
        return None;
    }
    // The wheel's site-packages/nvidia/<package>/include folders, then CUDA_HOME's.
    let mut roots: Vec<PathBuf> = std::fs::read_dir(Path::new(lib).join("../../nvidia"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("include"))
        .filter(|p| p.is_dir())
        .collect();
    roots.sort();
    if let Some(cuda) = std::env::var_os("CUDA_HOME") {
        roots.push(Path::new(&cuda).join("include"));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut missing = Vec::new();
    // Each header, and the folder that must be on the include path for it.
    for (header, sub) in [
        ("nccl.h", ""),
        ("cuda_runtime_api.h", ""),
        ("crt/host_config.h", ""),
        ("cuda/std/version", "cccl"),
    ] {
        let found = roots.iter().find_map(|r| {
            [r.join(sub), r.clone()]
                .into_iter()
                .find(|d| d.join(header).exists())
        });
        match found {
            Some(d) => {
                println!("cargo:rerun-if-changed={}", d.join(header).display());
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
            None => missing.push(header),
        }
    }
    if !missing.is_empty() {
        panic!(
            "simile: libtorch has CUDA ({lib}/libtorch_cuda.so), so simile builds its NCCL backend, \
             but these headers are missing: {}. Install the wheels nvidia-cuda-crt and \
             nvidia-cuda-cccl that match torch's CUDA (scripts/bootstrap-torch.sh and `make deps` \
             do), set CUDA_HOME to a CUDA toolkit, or set SIMILE_NO_NCCL=1 to build without it",
            missing.join(", ")
        );
    }
    Some(dirs)
}
