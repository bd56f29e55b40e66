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
