//! goose load tests for tallyd: three scenarios against a running server.
//!
//! - `mix` (the default): `POST /transaction` 10 : `GET /balance` 2 : `GET /metrics` 1, random seeded cards,
//!   deposits and withdrawals. Every answer must be one the contract allows for a valid request.
//! - `hotcard`: the same kind of traffic with most transactions on a handful of cards.
//! - `flask`: the Flask processor's Locust file against a database imported from it (`tallyd import`): its card
//!   format `6219 8619 NNNN 8640`, amounts -5,000 to 5,000, `GET /metrics` and `GET /`.
//! - `overload`: transactions as fast as the users can send them; meant for a server started with a tiny
//!   `--queue-depth`. `503 queue_full` (with `Retry-After`) counts as an expected answer, and the run fails if
//!   it never saw one.
//!
//! Every option is goose's own (`--help` lists them). This binary only changes goose's defaults: the host is
//! `http://127.0.0.1:8080`, the run stops by itself, only `mix` runs unless `--scenarios` names others, and
//! the reports go to `loadtest/reports/report.{html,json,md}` unless `--report-file` is given. After the run
//! it prints one `tallyd-loadtest: committed=...` line that scripts compare with the database.

mod cards;
mod scenarios;
mod tally;

use goose::config::GooseConfiguration;
use goose::prelude::*;
use std::path::Path;
use std::process::ExitCode;

/// Where the reports go when the command line names none: beside this crate, whatever the working directory.
const REPORT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/reports");

/// The report formats goose can write, picked by extension.
const REPORT_EXTENSIONS: [&str; 3] = ["html", "json", "md"];

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tallyd-loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<ExitCode, GooseError> {
    let mut configuration = GooseConfiguration::parse_args_default_or_exit();
    if configuration.report_file.is_empty() && !configuration.no_metrics {
        std::fs::create_dir_all(REPORT_DIR)?;
        configuration.report_file = REPORT_EXTENSIONS
            .iter()
            .map(|extension| format!("{REPORT_DIR}/report.{extension}"))
            .collect();
    }

    let result = GooseAttack::initialize_with_config(configuration)?
        .register_scenario(scenarios::mix()?)
        .register_scenario(scenarios::hot_card()?)
        .register_scenario(scenarios::overload()?)
        .register_scenario(scenarios::flask()?)
        .set_default(GooseDefault::Host, "http://127.0.0.1:8080")?
        .set_default(GooseDefault::Scenarios, "mix")?
        .set_default(GooseDefault::Users, 32)?
        .set_default(GooseDefault::IncreaseRate, "32")?
        .set_default(GooseDefault::RunTime, 30)?
        .set_default(GooseDefault::Timeout, "15")?
        .set_default(GooseDefault::NoTelnet, true)?
        .execute()
        .await;

    let totals = tally::snapshot();
    println!("{totals}");
    for extension in REPORT_EXTENSIONS {
        let path = format!("{REPORT_DIR}/report.{extension}");
        if Path::new(&path).exists() {
            eprintln!("tallyd-loadtest: report {path}");
        }
    }
    result?;

    if totals.overload_sent > 0 && totals.queue_full == 0 {
        eprintln!(
            "tallyd-loadtest: the overload scenario sent {} transactions and never saw 503 queue_full; \
             start tallyd with a tiny --queue-depth (e.g. 2) and use more users",
            totals.overload_sent
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
