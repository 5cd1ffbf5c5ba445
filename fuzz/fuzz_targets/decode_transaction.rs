//! libFuzzer target: any bytes as a `POST /transaction` body. `decode::transaction` must not
//! panic, and its answer must keep every property in `tallyd_fuzz::check` (valid values on
//! success, a documented 400 otherwise, agreement with an independent model of the rules).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    tallyd_fuzz::check(body);
});
