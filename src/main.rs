//! The `sycoscope` command line: a thin layer over the library (see `sycoscope --help`).

fn main() {
    let code = sycoscope::cli::main();
    std::process::exit(code);
}
