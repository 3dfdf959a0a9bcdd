//! What the unit tests share: how a test that cannot run here says so, and reproducible
//! random numbers.

/// Says why `test` cannot run here: a printed SKIP, or a panic when `KWIRE_TESTS_STRICT=1`
/// (`make test` sets it; CI runs as root with every tool, so a skip there hides a broken test).
/// The caller returns afterwards.
pub(crate) fn skip(test: &str, why: &str) {
    if std::env::var("KWIRE_TESTS_STRICT").is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why} (KWIRE_TESTS_STRICT=1 makes a skip a failure)");
    }
    eprintln!("SKIP {test}: {why}");
}

/// A reproducible random number below `n` per call (xorshift64 from `seed`, not zero).
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}
