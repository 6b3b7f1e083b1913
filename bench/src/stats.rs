//! Order statistics over repeated runs.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub runs: usize,
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub max: f64,
}

/// Nearest-rank percentiles; None for no samples.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    };
    Some(Summary {
        runs: sorted.len(),
        min: sorted[0],
        median: rank(0.5),
        p95: rank(0.95),
        max: sorted[sorted.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = summarize(&samples).unwrap();
        assert_eq!((s.runs, s.min, s.median, s.p95, s.max), (20, 1.0, 10.0, 19.0, 20.0));
        assert_eq!(summarize(&[3.0]).unwrap().p95, 3.0);
        assert!(summarize(&[]).is_none());
    }
}
