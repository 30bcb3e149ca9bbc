//! Confidence intervals: the Wilson score interval for a proportion.
//!
//! The report uses it for every column. For math and code the per-prompt
//! scores are 0/1, so it is exactly Wilson's interval. For the win rate the
//! per-prompt scores lie in [0, 1] (the mean of the two judge orders, a tie
//! counting 0.5); a variable in [0, 1] with mean p has variance at most
//! p(1-p), so the same interval is conservative there.

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval of a proportion `p` observed on `n` trials.
/// `n == 0` gives the uninformative (0, 1).
pub fn wilson(p: f64, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = p.clamp(0.0, 1.0);
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Mean of per-sample scores in [0, 1] and its 95% Wilson interval.
pub fn summarize(scores: &[f64]) -> (Option<f64>, f64, f64) {
    if scores.is_empty() {
        return (None, 0.0, 1.0);
    }
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let (lo, hi) = wilson(mean, scores.len(), Z95);
    (Some(mean), lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-5
    }

    #[test]
    fn wilson_matches_published_values() {
        // 8 of 10 (statsmodels proportion_confint(8, 10, method="wilson")).
        let (lo, hi) = wilson(0.8, 10, Z95);
        assert!(close(lo, 0.49016), "{lo}");
        assert!(close(hi, 0.94332), "{hi}");
        // 0 of 10: lower bound 0, upper 0.27753.
        let (lo, hi) = wilson(0.0, 10, Z95);
        assert_eq!(lo, 0.0);
        assert!(close(hi, 0.27753), "{hi}");
        // 10 of 10 mirrors it.
        let (lo, hi) = wilson(1.0, 10, Z95);
        assert!(close(lo, 0.72247), "{lo}");
        assert!(close(hi, 1.0));
        // 50 of 100: 0.40383 .. 0.59617.
        let (lo, hi) = wilson(0.5, 100, Z95);
        assert!(close(lo, 0.40383) && close(hi, 0.59617), "{lo} {hi}");
        // 1 of 20: 0.00889 .. 0.23613.
        let (lo, hi) = wilson(0.05, 20, Z95);
        assert!(close(lo, 0.00889) && close(hi, 0.23613), "{lo} {hi}");
    }

    #[test]
    fn wilson_edges() {
        assert_eq!(wilson(0.3, 0, Z95), (0.0, 1.0));
        let (lo, hi) = wilson(0.3, 1_000_000, Z95);
        assert!(hi - lo < 0.002 && lo < 0.3 && hi > 0.3);
        assert_eq!(summarize(&[]), (None, 0.0, 1.0));
        let (m, lo, hi) = summarize(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m, Some(0.75));
        assert!(lo < 0.75 && hi > 0.75);
    }
}
