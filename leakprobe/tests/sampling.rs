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
    assert_no_drops(&report);

    let truth_bytes = 64u64 << 20;
    let truth_count = 65536u64;
    let (bytes, count, _, _) = sum(sites(&report).iter().filter(|s| has_frame(s, "leak_block")));
    let err_bytes = bytes as f64 / truth_bytes as f64 - 1.0;
    let err_count = count as f64 / truth_count as f64 - 1.0;
    eprintln!("estimated {bytes} bytes ({err_bytes:+.3}), {count} blocks ({err_count:+.3})");
    assert!(err_bytes.abs() <= 0.10, "bytes estimate {bytes} vs {truth_bytes}");
    assert!(err_count.abs() <= 0.10, "count estimate {count} vs {truth_count}");
    // The churn is freed: its estimate is zero outstanding.
    let churn = sum(sites(&report).iter().filter(|s| has_frame(s, "churn")));
    assert_eq!((churn.0, churn.1), (0, 0));
    // Most allocations were passed over without a stack.
    assert!(report["activity"]["unsampled_allocs"].as_u64().unwrap() > 100_000);
}
