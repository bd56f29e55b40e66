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
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
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
