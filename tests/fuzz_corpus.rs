//! Replays every input the fuzzers keep under plain `cargo test`, so the properties they check hold
//! on every build without libFuzzer: through `http::decode::transaction`,
//! `fuzz/corpus/decode_transaction/` (hand-made seeds and what the fuzzer kept) and
//! `fuzz/regressions/` (inputs that once broke a property, named after what they were); through
//! the ledger's decoders (transfer and account bodies, the `Idempotency-Key`, path and query
//! parameters), `fuzz/corpus/decode_ledger/` and `fuzz/regressions/decode_ledger/`.
//! The checks are the fuzz target's own, `fuzz/src/lib.rs`, compiled in here as a module.

#[path = "../fuzz/src/lib.rs"]
mod check;

use std::panic;
use std::path::{Path, PathBuf};

/// Fewest seeds the corpus is expected to hold; fewer means the directory went missing or empty.
const CORPUS_FILES_MIN: usize = 20;

#[test]
fn every_corpus_input_keeps_the_decoders_properties() {
    let replayed = replay("fuzz/corpus/decode_transaction", check::check);
    assert!(
        replayed >= CORPUS_FILES_MIN,
        "only {replayed} corpus inputs; expected at least {CORPUS_FILES_MIN}"
    );
}

#[test]
fn every_regression_input_keeps_the_decoders_properties() {
    replay("fuzz/regressions", check::check);
}

#[test]
fn every_ledger_corpus_input_keeps_the_decoders_properties() {
    let replayed = replay("fuzz/corpus/decode_ledger", check::check_ledger);
    assert!(
        replayed >= CORPUS_FILES_MIN,
        "only {replayed} ledger corpus inputs; expected at least {CORPUS_FILES_MIN}"
    );
}

#[test]
fn every_ledger_regression_input_keeps_the_decoders_properties() {
    replay("fuzz/regressions/decode_ledger", check::check_ledger);
}

#[test]
fn the_transfer_model_knows_each_documented_code() {
    use check::ExpectedTransfer::{Accept, Malformed, Refuse};
    let cases: Vec<(&str, check::ExpectedTransfer)> = vec![
        (r#"{"source":"111111","destination":"222222""#, Malformed),
        ("[]", Refuse("invalid_json")),
        (r#"{"source":"111111","amount":5}"#, Refuse("missing_field")),
        (r#"{"source":"111111","x":1}"#, Refuse("unknown_field")),
        (r#"{"amount":5,"amount":5}"#, Refuse("duplicate_field")),
        (
            r#"{"source":"11111","destination":"222222","amount":5}"#,
            Refuse("invalid_card_number"),
        ),
        (
            r#"{"source":"111111","destination":"222222","amount":0}"#,
            Refuse("invalid_amount"),
        ),
        (
            r#"{"source":"111111","destination":"222222","amount":5,"reference":true}"#,
            Refuse("invalid_reference"),
        ),
        (
            r#"{"source":"111111","destination":"222222","amount":5,"reference":"\ud800"}"#,
            Refuse("invalid_json"),
        ),
        (
            r#"{"source":"111111","destination":"111-111","amount":5}"#,
            Refuse("same_account"),
        ),
        (
            r#"{"source":"111 111","destination":"222-222","amount":5,"reference":null}"#,
            Accept {
                source: "111111".to_owned(),
                destination: "222222".to_owned(),
                amount: 5,
                reference: None,
            },
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(check::model_transfer(body.as_bytes()), expected, "{body}");
        check::check_transfer(body.as_bytes());
    }
    assert_eq!(check::TRANSFER_CODES.len(), 8);
    for key in [&b"k"[..], b"", &[b'k'; 256], b"a\x7fb"] {
        check::check_idempotency_key(key);
    }
}

#[test]
fn the_model_knows_each_documented_code() {
    let deep_amount = format!(
        r#"{{"card_number":"123456","amount":{}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let cases: [(&[u8], check::Expected); 12] = [
        (b"{", check::Expected::Malformed),
        (b"[]", check::Expected::Refuse("invalid_json")),
        (br#"{"amount":5}"#, check::Expected::Refuse("missing_field")),
        (br#"{"x":1}"#, check::Expected::Refuse("unknown_field")),
        (
            br#"{"amount":5,"amount":5}"#,
            check::Expected::Refuse("duplicate_field"),
        ),
        (
            br#"{"card_number":"12345","amount":5}"#,
            check::Expected::Refuse("invalid_card_number"),
        ),
        (
            br#"{"card_number":"123456","amount":-0}"#,
            check::Expected::Refuse("invalid_amount"),
        ),
        (
            br#"{"card_number":"123456","amount":1e400}"#,
            check::Expected::Refuse("invalid_amount"),
        ),
        (deep_amount.as_bytes(), check::Expected::Refuse("invalid_amount")),
        (
            br#"{"card_number":"\ud800123456","amount":5}"#,
            check::Expected::Refuse("invalid_json"),
        ),
        (
            br#"{"card_number":"12345\u0036","amount":9223372036854775808}"#,
            check::Expected::Refuse("invalid_amount"),
        ),
        (
            br#"{"card_number":"123456","amount":-5}"#,
            check::Expected::Accept {
                card: "123456".to_owned(),
                amount: -5,
            },
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(check::model(body), expected, "{}", String::from_utf8_lossy(body));
        check::check(body);
    }
    assert_eq!(check::DOCUMENTED_CODES.len(), 6);
}

/// Runs the checks over every file in `dir` (relative to the crate), names every file that broke
/// a property, and returns how many files it read.
fn replay(dir: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file() && !is_note(path))
        .collect();
    files.sort();
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let body = std::fs::read(path).expect("a readable corpus file");
            panic::catch_unwind(|| check(&body)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "properties broken by: {failed:#?}");
    files.len()
}

/// A `README.md` beside the inputs explains them; it is not an input.
fn is_note(path: &Path) -> bool {
    path.extension().is_some_and(|extension| extension == "md")
}
