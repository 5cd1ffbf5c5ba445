//! The `tallyd` binary: parse the command line, set up logging, and hand over to the library.

use clap::Parser;
use tallyd::config::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tallyd::telemetry::init_logging();
    let result = match cli.command {
        Command::Serve(config) => tallyd::serve_until_signal(config),
        Command::Verify(args) => tallyd::verify::run(&args.db),
        Command::Import(args) => tallyd::verify::import(&args.from, &args.db),
        Command::Keys(args) => tallyd::auth::keys::run(&args).map_err(Into::into),
        Command::Archive(args) => tallyd::verify::archive(&args.db, args.before_id, &args.to),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
