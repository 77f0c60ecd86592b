//! The `sycoscope` command line: a thin layer over the library (see `sycoscope --help`).

fn main() {
    // Behave like a Unix tool when the reader of our output goes away (`sycoscope hooks | head`):
    // end quietly instead of panicking on a broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default SIGPIPE disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let code = sycoscope::cli::main();
    std::process::exit(code);
}
