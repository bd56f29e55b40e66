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
            let mut said = e.to_string();
            eprintln!("error: {said}");
            // A cause already in the message (an I/O error's, which names its file and
            // carries the OS error as its source) is not said twice.
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !said.contains(&c) {
                    eprintln!("  caused by: {c}");
                    said.push_str(&c);
                }
            }
            std::process::exit(code)
        }
    }
}

/// Parses the command line as [`clap::Parser::parse`] does, except that a value may start
/// with `-` (so `-k -3` or `--val-fraction -0.1` reach the value's own check and are refused
/// as negative, instead of clap's "unexpected argument '-3'").
pub fn parse<T: clap::Parser>() -> T {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    fn negatives_are_values(c: clap::Command) -> clap::Command {
        let names: Vec<String> = c
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        let mut c = c.allow_negative_numbers(true);
        for n in names {
            c = c.mut_subcommand(n, negatives_are_values);
        }
        c
    }
    let matches = negatives_are_values(T::command())
        .try_get_matches()
        .and_then(|m| T::from_arg_matches(&m));
    match matches {
        Ok(t) => t,
        Err(e) => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => Some(v.clone()),
                _ => None,
            };
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) => a.clone(),
                _ => String::new(),
            };
            // Only clap's own number parsing ("invalid digit"): a parser of simile's says why.
            let generic = e.to_string().contains("invalid digit");
            match value {
                Some(v)
                    if e.kind() == ErrorKind::ValueValidation && generic && v.starts_with('-') =>
                {
                    eprintln!("error: {arg}: {v} is negative; the value must be a positive number");
                    std::process::exit(2)
                }
                _ => e.exit(),
            }
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
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
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
