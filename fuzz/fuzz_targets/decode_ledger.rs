//! libFuzzer target: the ledger's decoders. The first byte picks one (`b`: a `POST /transfers/bulk` body;
//! otherwise modulo 4: a `POST /transfers`
//! body, a `POST /accounts` body, an `Idempotency-Key` header, a path or query parameter) and the
//! rest is its input; `tallyd_fuzz::check_ledger` checks the answer against a model of the rules.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tallyd_fuzz::check_ledger(data);
});
