//! What every stage binary shares: running `main` with simile's exit codes, common flags.
use crate::error::Error;

/// Runs a stage's main, printing the error chain and exiting with 2 for the user's errors
/// (bad input, bad flags) and 1 for simile's own failures.
pub fn run(main: impl FnOnce() -> anyhow::Result<()>) -> ! {
    // A closed stdout (`| head`) ends the process quietly, as for any Unix tool, instead of
    // a panic in `println!`: outputs are committed before anything is printed.
    #[cfg(unix)]
    // SAFETY: restoring the default action of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match main() {
        Ok(()) => std::process::exit(0),
        // Not a failure: the stage found its output up to date and did nothing.
        Err(e) if matches!(e.downcast_ref::<Error>(), Some(Error::UpToDate(_))) => {
            eprintln!("{e}");
            std::process::exit(0)
        }
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::exit(code)
        }
    }
}

/// 2 if any error in the chain is the user's, else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for c in e.chain() {
        if let Some(se) = c.downcast_ref::<Error>() {
            return se.exit_code();
        }
        if c.downcast_ref::<UserError>().is_some() {
            return 2;
        }
    }
    1
}

/// A user error raised in a binary (a bad combination of flags, say).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(pub String);

/// Fails with exit code 2 and a message.
pub fn user_error(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(msg.into()))
}

/// Where a stage that runs models or searches computes (train, embed, distance, rerank):
/// one definition of `--device` and `--threads`, flattened into each binary.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// auto (CUDA when there is one, else the CPU), cpu, cuda or cuda:<index>.
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceArg,
    /// CPU threads, libtorch's and simile's own pool together (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: Option<u64>,
}

impl DeviceArgs {
    /// The start-up of every device stage, before anything starts a thread pool: one thread
    /// count for libtorch and rayon (`device::set_threads`) and, for stages that run
    /// networks, freed activations kept for the next batch (`device::keep_freed_memory`).
    /// (libgomp's wait policy is chosen even earlier, first thing in `main`:
    /// `device::reexec_with_passive_openmp`.) Returns the thread count.
    pub fn start(&self, runs_networks: bool) -> usize {
        if runs_networks {
            crate::device::keep_freed_memory();
        }
        crate::device::set_threads(self.threads.map(|n| n as usize))
    }
}

/// `--force`: every stage's way past its up-to-date check.
#[derive(clap::Args, Clone, Debug)]
pub struct ForceArg {
    /// Redo the work even when the output is up to date (its manifest records the same
    /// inputs, parameters and version).
    #[arg(long)]
    pub force: bool,
}

impl ForceArg {
    /// Applies the flag to this process's up-to-date check (`manifest::reuse_up_to_date`).
    pub fn apply(&self) {
        crate::manifest::reuse_up_to_date(!self.force);
    }
}
