//! What the hand-run benchmarks (`harness = false`) share: their command line and the
//! test environment's coordinates.

use std::collections::BTreeMap;

/// Whether to run: `cargo test --benches` lists or runs bench targets without
/// `--bench`; they are benchmarks, not tests, so they then only say how to run them.
pub fn should_run(usage: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("{usage}");
        return false;
    }
    true
}

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_owned())
}

/// The number after `name`, or `default`.
pub fn num(name: &str, default: usize) -> usize {
    arg(name, &default.to_string()).parse().unwrap_or_else(|_| panic!("{name} takes a number"))
}

/// The variables `scripts/test-env` wrote (`HPCFORGE_TEST_*`).
pub fn test_env() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string("/var/lib/hpcforge-test-env/env")
        .expect("the test environment is up (scripts/test-env, as root)");
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches("export ").split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}
