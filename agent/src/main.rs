//! The `edgespool` binary: parse the command line and hand over to [`edgespool::cli`].

fn main() -> std::process::ExitCode {
    edgespool::cli::main()
}
