//! Tables for Poisson sampling by bytes (`--sample-bytes`), computed here and loaded into the
//! eBPF maps: pure arithmetic, unit-tested.
//!
//! Each thread counts down an exponentially distributed number of bytes (mean N) and samples
//! the allocation that crosses zero, so an allocation of s bytes is sampled with probability
//! P(s) = 1 - e^(-s/N), independently of everything else. Weighting each sampled block by
//! 1/P(s) makes the sums unbiased: it stands for s/P(s) bytes and 1/P(s) allocations. For a
//! leak of L bytes in small blocks the relative standard error is about sqrt(N/L).

use leakprobe_common::sampling::{WEIGHT_ENTRIES, WEIGHT_ONE, WEIGHT_STEPS_PER_UNIT};

/// Largest accepted --sample-bytes (the kernel side multiplies it by table values < 2^24).
pub const MAX_SAMPLE_BYTES: u64 = 1 << 40;

/// `n` equally likely countdown values: the midpoint quantiles of Exp(mean).
pub fn exponential_quantiles(mean: u64, n: u32) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let u = (f64::from(i) + 0.5) / f64::from(n);
            (-(1.0 - u).ln() * mean as f64).round().max(1.0) as u64
        })
        .collect()
}

/// f(x) = x / (1 - e^-x) in WEIGHT_ONE fixed point at x = (i + 0.5) / WEIGHT_STEPS_PER_UNIT:
/// a sampled block of s bytes stands for N * f(s/N) bytes.
pub fn weight_curve() -> Vec<u64> {
    (0..WEIGHT_ENTRIES)
        .map(|i| {
            let x = (f64::from(i) + 0.5) / WEIGHT_STEPS_PER_UNIT as f64;
            (x / (1.0 - (-x).exp()) * WEIGHT_ONE as f64).round() as u64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_have_the_right_mean() {
        let q = exponential_quantiles(512 * 1024, 1024);
        let mean = q.iter().sum::<u64>() as f64 / q.len() as f64;
        // The midpoint quantiles lose a little of the tail: under 1%.
        assert!((mean / (512.0 * 1024.0) - 1.0).abs() < 0.01, "mean {mean}");
        assert!(q.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn weights_match_the_unbiased_estimate() {
        let w = weight_curve();
        assert_eq!(w.len(), WEIGHT_ENTRIES as usize);
        // Tiny blocks stand for about N bytes; big ones for themselves.
        assert!((w[0] as f64 / WEIGHT_ONE as f64 - 1.0).abs() < 0.01);
        let last = *w.last().unwrap() as f64 / WEIGHT_ONE as f64;
        let x = (WEIGHT_ENTRIES as f64 - 0.5) / WEIGHT_STEPS_PER_UNIT as f64;
        assert!((last - x).abs() < 0.001);
        // s = N: sampled with probability 1 - 1/e, stands for N / (1 - 1/e) bytes.
        let at_one = w[WEIGHT_STEPS_PER_UNIT as usize] as f64 / WEIGHT_ONE as f64;
        assert!((at_one - 1.0 / (1.0 - (-1.0f64).exp())).abs() < 0.01);
    }
}
