//! The `rimg` binary: parses the command line once and hands the command to
//! [`cli`], which drives the library and reports errors as one line (exit 1;
//! `grep` exits 0, 1 or 2 as grep does).

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// An image of up to 1000 layers keeps two files open per layer, past the
/// usual soft limit of 1024: raise it to the hard limit, as Go programs do.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
    let cli = cli::Cli::parse_from(cli::argv());
    cli::run(cli.command)
}
