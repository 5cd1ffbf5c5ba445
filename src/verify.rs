//! `tallyd verify --db PATH`: checks every invariant of a database file and says what it checked.

use std::path::Path;
use std::process::ExitCode;

use crate::store::sqlite;

pub fn run(db: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !db.exists() {
        return Err(format!("no database at {}", db.display()).into());
    }
    let (transactions, checks) = sqlite::verify(db)?;
    println!("verifying {} ({transactions} transactions)", db.display());
    let mut failed = 0;
    for check in &checks {
        let verdict = if check.violations == 0 { "ok" } else { "FAILED" };
        println!("  {verdict:6} {} ({} violations)", check.name, check.violations);
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
