//! The `host` binary.

fn main() -> std::process::ExitCode {
    exechost::cli::main()
}
