//! Sampled mode (`--sample-bytes`): unbiased estimates of a known leak.
//! Privileged: run as root, one at a time.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn sampled_estimates_of_a_64_mib_leak_are_within_10_percent() {
    require_root();
    let bin = build_target("big_leak.c", "big_leak", "gcc", NOFP_C);
    let mut target = Target::spawn(&bin);
    // 64 MiB at one sample per 32 KiB: about 2000 samples. The standard error of these
    // estimates is about 2.5% (count) and 2.3% (bytes) for this size mix, so +-10% is four
    // standard errors (docs/benchmarks.md: error ~ sqrt(N / leaked bytes)).
    let (code, out, err) = attach_with(
        &mut target,
        &["--duration", "4s", "--format", "json", "--sample-bytes", "32KiB"],
        Target::leak,
    );
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["sampling"]["estimated"], true);
    assert_eq!(report["sampling"]["sample_bytes"].as_u64(), Some(32768));
    check_64_mib_estimate(&report);
    // Most allocations were passed over without a stack.
    assert!(report["activity"]["unsampled_allocs"].as_u64().unwrap() > 100_000);
}
