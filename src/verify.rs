//! The offline commands: `tallyd verify --db PATH` checks every invariant of a database file and
//! says what it checked; `tallyd import --from FLASK.db --db NEW.db` makes a tallyd database from
//! the Flask processor's, then verifies it; `tallyd archive` moves old history to an archive file,
//! then verifies what is left.

use std::path::Path;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use crate::store::sqlite;

pub fn run(db: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if crate::store::postgres::is_url(db) {
        return run_postgres(db);
    }
    if !db.exists() {
        return Err(format!("no database at {}", db.display()).into());
    }
    // A bar on a terminal (indicatif hides it when stderr is not one), with each check's name:
    // on ten million accounts a check takes seconds.
    let bar = ProgressBar::new(sqlite::CHECKS as u64).with_style(
        ProgressStyle::with_template("{pos}/{len} [{elapsed}] {wide_msg}").expect("a valid template"),
    );
    let started = std::time::Instant::now();
    let mut done = 0;
    let result = sqlite::verify(db, &mut |name| {
        bar.set_position(done);
        bar.set_message(name);
        done += 1;
    });
    bar.finish_and_clear();
    let (transactions, checks) = result?;
    report(db, started, transactions, &checks)
}

/// `verify` on PostgreSQL: the same report, from [`crate::store::postgres::verify`].
fn run_postgres(db: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let started = std::time::Instant::now();
    let url = db.to_str().ok_or("the database URL is not UTF-8")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (transactions, checks) = runtime.block_on(crate::store::postgres::verify::verify(url))?;
    let shown = crate::store::postgres::redacted(db);
    report(Path::new(&shown), started, transactions, &checks)
}

fn report(
    db: &Path,
    started: std::time::Instant,
    transactions: i64,
    checks: &[sqlite::Check],
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    println!(
        "verifying {} ({transactions} transactions, {:.1} s)",
        db.display(),
        started.elapsed().as_secs_f64()
    );
    let mut failed = 0;
    for check in checks {
        let verdict = if check.violations == 0 { "ok" } else { "FAILED" };
        println!(
            "  {verdict:6} {} ({} violations, {:.2} s)",
            check.name, check.violations, check.seconds
        );
        failed += usize::from(check.violations != 0);
    }
    if failed == 0 {
        println!("all {} checks hold", checks.len());
    } else {
        println!("{failed} of {} checks FAILED", checks.len());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `tallyd migrate --from SQLITE --to postgres://...`: the copy, then `verify` of it.
pub fn migrate(from: &Path, to: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !crate::store::postgres::is_url(to) {
        return Err(format!("--to must be a postgres:// URL, not {}", to.display()).into());
    }
    let url = to.to_str().ok_or("the database URL is not UTF-8")?;
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let copied = runtime.block_on(crate::store::postgres::copy::copy(from, url))?;
    println!(
        "migrated {} into {} in one transaction in {:.2} s: {} accounts, {} transactions, {} idempotency records, \
         {} holds, {} accounts with credit terms, {} API keys, {} archive cuts",
        from.display(),
        crate::store::postgres::redacted(to),
        started.elapsed().as_secs_f64(),
        copied.accounts,
        copied.transactions,
        copied.idempotency_records,
        copied.holds,
        copied.credit_rows,
        copied.api_keys,
        copied.archive_cuts
    );
    drop(runtime);
    run(to)
}

pub fn archive(db: &Path, before_id: i64, to: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let started = std::time::Instant::now();
    let report = sqlite::archive::archive(db, before_id, to)?;
    println!(
        "archived {} transactions below id {before_id} from {} into {} in {:.2} s; {} accounts reopened at \
         their balance before it; {} idempotency records of archived transactions dropped; {} bytes -> {} bytes",
        report.transactions,
        db.display(),
        to.display(),
        started.elapsed().as_secs_f64(),
        report.accounts_reopened,
        report.idempotency_records_dropped,
        report.bytes_before,
        report.bytes_after
    );
    run(db)
}

pub fn import(from: &Path, to: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let started = std::time::Instant::now();
    let report = sqlite::import::import(from, to)?;
    println!(
        "imported {} into {} in {:.2} s: {} accounts, {} transactions ({} declined rows counted, not imported; {} skipped)",
        from.display(),
        to.display(),
        started.elapsed().as_secs_f64(),
        report.accounts,
        report.transactions,
        report.declined,
        report.skipped
    );
    println!(
        "each account opens with its balance less its imported history: {} minor units in all",
        report.opening_total
    );
    println!(
        "{} accounts' histories did not add up to their balances: adjusted by {} minor units in all \
         (kept the balance; one adjustment transaction each)",
        report.adjusted_accounts, report.adjusted_total
    );
    run(to)
}
