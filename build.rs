// Gives every binary an rpath to torch's lib folder (so no LD_LIBRARY_PATH is needed) and
// links libtorch.so without --as-needed, so libtorch_cuda is loaded when the wheel has it
// and the same build uses a GPU where one exists (tch-rs issues #907, #980).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch");
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
