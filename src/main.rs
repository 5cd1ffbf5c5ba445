//! The `tallyd` binary: parse the command line, set up logging, and hand over to the library.

use clap::Parser;
use tallyd::config::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tallyd::telemetry::init_logging();
    if !matches!(cli.command, Command::Serve(_)) {
        // The offline commands print reports that are often piped (`tallyd verify | head`): when
        // the reader goes away, end quietly as other command-line tools do, instead of panicking
        // in println!. Only these: a server must survive writing to a closed socket.
        // SAFETY: setting a signal's disposition to its default, before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Serve(config) => tallyd::serve_until_signal(config),
        Command::Verify(args) => tallyd::verify::run(&args.db),
        Command::Import(args) => tallyd::verify::import(&args.from, &args.db),
        Command::Keys(args) => tallyd::auth::keys::run(&args).map_err(Into::into),
        Command::Archive(args) => tallyd::verify::archive(&args.db, args.before_id, &args.to),
        Command::Migrate(args) => tallyd::verify::migrate(&args.from, &args.to),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
