//! Per-pod value history for `window` triggers, shared by both stores.
//!
//! A pod's value is a step function of time: it holds from one report until
//! the next one changes it. The history keeps only the change points (time in
//! milliseconds on the store's clock, value), so a pod whose load is steady
//! costs one entry however long the window. `max` is the largest step that
//! overlaps the window; `avg` is the time-weighted mean over the part of the
//! window the pod existed for.

use std::time::Duration;

/// How each pod's values inside the window are reduced to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WindowReduce {
    #[default]
    Max,
    Avg,
}

/// A window over each pod's recent values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    pub length: Duration,
    pub reduce: WindowReduce,
}

/// A change point: from `at_ms` on, the pod's value was `value`.
pub type Point = (u64, f64);

/// Appends a report to `history` (only when the value changed) and forgets
/// points that no window up to `keep` can still see. The last point before the
/// horizon is kept: its value still holds at the horizon.
pub fn push(history: &mut Vec<Point>, at_ms: u64, value: f64, keep: Duration) {
    if history.last().is_none_or(|&(_, v)| v != value) {
        history.push((at_ms, value));
    }
    let horizon = at_ms.saturating_sub(keep.as_millis() as u64);
    // Index of the first point after the horizon; everything before the point
    // preceding it is invisible to every window.
    let first_after = history.partition_point(|&(t, _)| t <= horizon);
    if first_after > 1 {
        history.drain(..first_after - 1);
    }
}

/// Reduces `history` over `[now - window.length, now]`. `None` when the history
/// is empty (the caller then has no value for the pod).
pub fn reduce(history: &[Point], now_ms: u64, window: Window) -> Option<f64> {
    let start = now_ms.saturating_sub(window.length.as_millis() as u64);
    // The point in force at `start` (the last one at or before it), if any.
    let first = history
        .partition_point(|&(t, _)| t <= start)
        .saturating_sub(1);
    let visible = history.get(first..)?;
    if visible.is_empty() {
        return None;
    }
    match window.reduce {
        WindowReduce::Max => visible
            .iter()
            .filter(|&&(t, _)| t <= now_ms)
            .map(|&(_, v)| v)
            .reduce(f64::max)
            .or(Some(visible[0].1)),
        WindowReduce::Avg => {
            let mut weighted = 0.0;
            let mut covered = 0u64;
            for (i, &(t, v)) in visible.iter().enumerate() {
                let from = t.max(start);
                let to = visible
                    .get(i + 1)
                    .map_or(now_ms, |&(next, _)| next.min(now_ms));
                if to > from {
                    weighted += v * (to - from) as f64;
                    covered += to - from;
                }
            }
            // A pod reported for the first time at `now` has covered nothing
            // yet: its current value is the best average there is.
            Some(if covered == 0 {
                visible[visible.len() - 1].1
            } else {
                weighted / covered as f64
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1000;

    fn w(secs: u64, reduce: WindowReduce) -> Window {
        Window {
            length: Duration::from_secs(secs),
            reduce,
        }
    }

    #[test]
    fn unchanged_values_take_no_room() {
        let mut h = Vec::new();
        for i in 0..100 {
            push(&mut h, i * 5 * S, 3.0, Duration::from_secs(600));
        }
        assert_eq!(h, vec![(0, 3.0)]);
    }

    #[test]
    fn max_sees_a_spike_inside_the_window_only() {
        let mut h = Vec::new();
        let keep = Duration::from_secs(600);
        push(&mut h, 0, 1.0, keep);
        push(&mut h, 10 * S, 9.0, keep);
        push(&mut h, 15 * S, 2.0, keep);
        assert_eq!(reduce(&h, 20 * S, w(30, WindowReduce::Max)), Some(9.0));
        // At t=50 s the window [20 s, 50 s] starts after the spike ended.
        assert_eq!(reduce(&h, 50 * S, w(30, WindowReduce::Max)), Some(2.0));
    }

    #[test]
    fn avg_is_time_weighted() {
        let keep = Duration::from_secs(600);
        let mut h = Vec::new();
        push(&mut h, 0, 0.0, keep);
        push(&mut h, 20 * S, 10.0, keep);
        // Window [0, 30 s]: 20 s at 0, 10 s at 10 → 100/30.
        let avg = reduce(&h, 30 * S, w(30, WindowReduce::Avg)).unwrap();
        assert!((avg - 10.0 / 3.0).abs() < 1e-9, "{avg}");
    }

    #[test]
    fn avg_of_a_new_pod_covers_only_its_life() {
        let mut h = Vec::new();
        push(&mut h, 100 * S, 4.0, Duration::from_secs(600));
        assert_eq!(reduce(&h, 110 * S, w(30, WindowReduce::Avg)), Some(4.0));
        assert_eq!(reduce(&h, 100 * S, w(30, WindowReduce::Avg)), Some(4.0));
    }

    #[test]
    fn pruning_keeps_the_point_in_force_at_the_horizon() {
        let keep = Duration::from_secs(60);
        let mut h = Vec::new();
        push(&mut h, 0, 5.0, keep);
        push(&mut h, 10 * S, 6.0, keep);
        push(&mut h, 100 * S, 7.0, keep);
        // Horizon is 40 s: the 6.0 set at 10 s still holds there.
        assert_eq!(h, vec![(10 * S, 6.0), (100 * S, 7.0)]);
        assert_eq!(reduce(&h, 100 * S, w(60, WindowReduce::Max)), Some(7.0));
        assert_eq!(reduce(&h, 99 * S, w(60, WindowReduce::Max)), Some(6.0));
    }

    #[test]
    fn empty_history_has_no_value() {
        assert_eq!(reduce(&[], 10, w(30, WindowReduce::Max)), None);
    }

    proptest! {
        /// Against a reference that samples the step function every millisecond.
        #[test]
        fn matches_a_sampled_reference(
            steps in proptest::collection::vec((1u64..500, 0u32..50), 1..12),
            win in 1u64..3000,
        ) {
            let keep = Duration::from_secs(3600);
            let mut h = Vec::new();
            let mut t = 0;
            let mut truth: Vec<(u64, f64)> = Vec::new();
            for (dt, v) in steps {
                t += dt;
                push(&mut h, t, v as f64, keep);
                truth.push((t, v as f64));
            }
            let now = t + 100;
            let start = now.saturating_sub(win);
            let first_t = truth[0].0;
            let value_at = |ms: u64| truth.iter().rev().find(|(at, _)| *at <= ms).map(|p| p.1);
            let samples: Vec<f64> = (start.max(first_t)..now).filter_map(value_at).collect();
            let max = reduce(&h, now, Window { length: Duration::from_millis(win), reduce: WindowReduce::Max }).unwrap();
            let avg = reduce(&h, now, Window { length: Duration::from_millis(win), reduce: WindowReduce::Avg }).unwrap();
            let ref_max = samples.iter().copied().fold(value_at(now).unwrap(), f64::max);
            prop_assert_eq!(max, ref_max);
            if !samples.is_empty() {
                let ref_avg = samples.iter().sum::<f64>() / samples.len() as f64;
                prop_assert!((avg - ref_avg).abs() < 1e-6, "avg {} ref {}", avg, ref_avg);
            }
        }
    }
}
