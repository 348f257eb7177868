//! The zstd level of a push, steered so that compression keeps the link busy without
//! starving it.
//!
//! Two measurements meet here. The connections report each batch they post (bytes,
//! seconds, requests in flight at the time), from which the link's rate is estimated: a
//! request sharing the link with `k - 1` others gets about a `k`-th of it. The compressors
//! report each batch they compress (level, output bytes, seconds), from which their speed is
//! known at that level and, through a table of how zstd's output rate falls with the level,
//! predicted at the others. While the queue of compressed batches is full the level rises,
//! up to two steps per batch, to the highest level at which the compressors would still
//! produce at least [`HEADROOM`] times what the link takes; it falls as soon as they would
//! not keep up at the current one, and whenever a connection waits for a batch.
//!
//! Without the prediction the level overshot: a full queue raised it batch after batch up
//! to 15, where one 4 MiB batch takes a core a second, the link then went idle and the level
//! fell back to 1 (measured on the 100 Mbit/s benchmark link: 79 % of the link used).

use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

/// Compressed output of one core, MB/s, at zstd levels 1 to 19 (index 0 unused): measured
/// with `zstd -T1` on the benchmark's 135 MB of new ext4 blocks (level 3: 0.47 s, 45.3 MB).
/// Only the ratios between levels matter: the real speed is measured as the push runs.
const OUTPUT_RATE: [f64; 20] = [
    0.0, 160.0, 132.0, 96.0, 70.0, 43.0, 30.0, 24.0, 19.0, 15.6, 12.0, 9.5, 7.3, 4.5, 3.2, 2.4,
    1.8, 1.2, 0.9, 0.68,
];

/// Compressors must be able to produce this many times the link's rate at a level before
/// the level is raised to it.
pub const HEADROOM: f64 = 1.3;

/// Weight of a new measurement in the running estimates.
const ALPHA: f64 = 0.3;

#[derive(Debug, Default)]
struct Estimates {
    /// Link rate, bytes per second.
    link: Option<f64>,
    /// Measured compressor speed over the table's, for this data on this machine.
    scale: Option<f64>,
}

/// The level a push compresses at, and how it moves.
#[derive(Debug)]
pub struct Steering {
    level: AtomicI32,
    min: i32,
    max: i32,
    compressors: f64,
    adaptive: bool,
    estimates: Mutex<Estimates>,
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    old.map_or(sample, |o| o + ALPHA * (sample - o))
}

impl Steering {
    /// Starts at `start` and adapts between `min` and `max` (levels 1 to 19) for
    /// `compressors` compressing threads.
    pub fn adaptive(start: i32, min: i32, max: i32, compressors: usize) -> Self {
        let (min, max) = (min.clamp(1, 19), max.clamp(1, 19).max(min.clamp(1, 19)));
        Self {
            level: AtomicI32::new(start.clamp(min, max)),
            min,
            max,
            compressors: compressors.max(1) as f64,
            adaptive: true,
            estimates: Mutex::default(),
        }
    }

    /// Always `level`.
    pub fn fixed(level: i32) -> Self {
        let level = level.clamp(1, 19);
        Self {
            level: AtomicI32::new(level),
            min: level,
            max: level,
            compressors: 1.0,
            adaptive: false,
            estimates: Mutex::default(),
        }
    }

    /// The level to compress the next batch at.
    pub fn level(&self) -> i32 {
        self.level.load(Ordering::Relaxed)
    }

    /// The link's estimated rate (bytes per second), once a batch has been posted.
    pub fn link_rate(&self) -> Option<f64> {
        self.lock().link
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Estimates> {
        self.estimates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Predicted output (bytes per second) of all compressors at `level`.
    fn supply(&self, level: i32, scale: f64) -> f64 {
        self.compressors * OUTPUT_RATE[level as usize] * 1e6 * scale
    }

    fn set(&self, level: i32) {
        self.level
            .store(level.clamp(self.min, self.max), Ordering::Relaxed);
    }

    /// A compressor turned a batch into `output` bytes at `level` in `seconds`; `queue_full`
    /// says whether the compressed batches waiting for a connection fill their queue.
    pub fn compressed(&self, level: i32, output: usize, seconds: f64, queue_full: bool) {
        if !self.adaptive || seconds <= 0.0 || !(1..=19).contains(&level) {
            return;
        }
        let mut e = self.lock();
        let sample = output as f64 / seconds / 1e6 / OUTPUT_RATE[level as usize];
        let scale = ewma(e.scale, sample);
        e.scale = Some(scale);
        let current = self.level();
        match e.link {
            Some(link) if self.supply(current, scale) < link => self.set(current - 1),
            Some(link) if queue_full => {
                // Up to two steps toward the highest level with headroom.
                let target = (current..=self.max.min(current + 2))
                    .rev()
                    .find(|&l| self.supply(l, scale) >= HEADROOM * link)
                    .unwrap_or(current);
                self.set(target);
            }
            None if queue_full => self.set(current + 1),
            _ => {}
        }
    }

    /// A connection posted `bytes` in `seconds` while `in_flight` requests (itself
    /// included) were under way.
    pub fn sent(&self, bytes: usize, seconds: f64, in_flight: usize) {
        if !self.adaptive || seconds <= 0.0 || bytes == 0 {
            return;
        }
        let mut e = self.lock();
        let sample = bytes as f64 / seconds * in_flight.max(1) as f64;
        e.link = Some(ewma(e.link, sample));
    }

    /// A connection waited for a compressed batch: compression is the bottleneck.
    pub fn starved(&self) {
        if self.adaptive {
            self.set(self.level() - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the loop against a link of `link` bytes/s and compressors `speed` times as fast
    /// as the table, posting 4 MiB batches (3:1) over 4 connections; returns the levels.
    fn settle(link: f64, speed: f64) -> Vec<i32> {
        let s = Steering::adaptive(3, 1, 16, 2);
        let mut levels = Vec::new();
        for _ in 0..40 {
            let level = s.level();
            levels.push(level);
            let out = 1_400_000usize;
            let secs = out as f64 / (OUTPUT_RATE[level as usize] * 1e6 * speed);
            // Two compressors supply 2 × out per `secs`; the link drains `link`.
            let supply = 2.0 * out as f64 / secs;
            let full = supply > link;
            s.compressed(level, out, secs, full);
            // Four requests share the link when it is the bottleneck.
            let share = link.min(supply) / 4.0;
            s.sent(out, out as f64 / share, 4);
            if !full {
                s.starved();
            }
        }
        levels
    }

    #[test]
    fn a_slow_link_gets_the_highest_level_compression_keeps_up_with() {
        // 100 Mbit/s: two cores at the table's speed keep up to level 11 (2 × 9.5 MB/s ≥
        // 1.3 × 12.5 MB/s); level 12 would leave no headroom and 13 would starve the link.
        let levels = settle(12.5e6, 1.0);
        let tail = &levels[20..];
        assert!(tail.iter().all(|&l| (10..=11).contains(&l)), "{levels:?}");
    }

    #[test]
    fn a_fast_link_gets_the_fastest_levels() {
        // 1 Gbit/s: even level 1 barely keeps up on two cores.
        let levels = settle(125e6, 0.5);
        assert!(levels[10..].iter().all(|&l| l <= 2), "{levels:?}");
    }

    #[test]
    fn a_fixed_level_never_moves() {
        let s = Steering::fixed(19);
        s.compressed(19, 1000, 1.0, true);
        s.sent(1000, 0.001, 4);
        s.starved();
        assert_eq!(s.level(), 19);
        assert_eq!(s.link_rate(), None);
    }
}
