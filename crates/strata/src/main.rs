//! The `strata` binary: parse the command line, then either run as a zygote (when the master
//! re-executed us as one) or hand over to [`strata::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    // A zygote must stay single-threaded: decide before anything else starts.
    if strata_appserver::is_zygote() {
        return ExitCode::from(strata_appserver::zygote::main() as u8);
    }
    strata::cli::main()
}
