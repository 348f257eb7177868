fn main() -> std::process::ExitCode {
    certo::cli::main()
}
