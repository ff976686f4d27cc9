//! Choosing a server: the algorithms as pure functions of a snapshot of the candidates, so
//! their choices are tested without a network.
//!
//! - `p2c` (default): two candidates drawn at random in proportion to their weight; the one
//!   with the lower cost (peak-EWMA latency × (requests in flight + 1) ÷ weight) wins. A slow
//!   server is avoided as soon as it is slow, and a fast one never gets everything at once.
//! - `least-requests`: fewest requests in flight per unit of weight.
//! - `round-robin`: each candidate in turn.
//! - `weighted`: at random, in proportion to weight.
//!
//! Weights here already include slow start (a new or recovered server ramps from 10 %).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The algorithms of `lb.backends[].balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    P2c,
    LeastRequests,
    RoundRobin,
    Weighted,
}

impl Balance {
    pub fn parse(name: &str) -> Self {
        match name {
            "least-requests" => Self::LeastRequests,
            "round-robin" => Self::RoundRobin,
            "weighted" => Self::Weighted,
            _ => Self::P2c,
        }
    }
}

/// One server that may be chosen.
#[derive(Debug, Clone, Copy, Default)]
pub struct Candidate {
    pub weight: f64,
    pub in_flight: usize,
    /// Peak-EWMA latency, seconds.
    pub latency: f64,
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ 0x9e37_79b9_7f4a_7c15) | 1
}

/// A uniform random number in [0, 1) (xorshift64*: choices, not secrets).
pub fn random() -> f64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// A candidate drawn in proportion to weight, skipping `except`.
fn draw(candidates: &[Candidate], except: Option<usize>, roll: f64) -> Option<usize> {
    let total: f64 = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != except)
        .map(|(_, c)| c.weight)
        .sum();
    let mut left = roll * total;
    let mut last = None;
    for (i, c) in candidates.iter().enumerate() {
        if Some(i) == except {
            continue;
        }
        last = Some(i);
        if left < c.weight {
            return Some(i);
        }
        left -= c.weight;
    }
    last
}

fn cost(c: &Candidate) -> f64 {
    c.latency * (c.in_flight as f64 + 1.0) / c.weight
}

/// The index of the chosen candidate; `turn` counts calls, for round robin.
pub fn pick(balance: Balance, candidates: &[Candidate], turn: usize) -> Option<usize> {
    if candidates.len() <= 1 {
        return (!candidates.is_empty()).then_some(0);
    }
    match balance {
        Balance::RoundRobin => Some(turn % candidates.len()),
        Balance::Weighted => draw(candidates, None, random()),
        Balance::LeastRequests => {
            // Ties go to a random one of them: start the scan at a random place.
            let start = (random() * candidates.len() as f64) as usize;
            (0..candidates.len())
                .map(|k| (start + k) % candidates.len())
                .min_by(|a, b| {
                    let load =
                        |i: &usize| (candidates[*i].in_flight as f64 + 1.0) / candidates[*i].weight;
                    load(a).total_cmp(&load(b))
                })
        }
        Balance::P2c => {
            let first = draw(candidates, None, random())?;
            let second = draw(candidates, Some(first), random())?;
            if cost(&candidates[second]) < cost(&candidates[first]) {
                Some(second)
            } else {
                Some(first)
            }
        }
    }
}

/// The share of its weight a server gets `elapsed` after it joined or recovered.
pub fn slow_start(elapsed: Duration, ramp: Duration) -> f64 {
    if ramp.is_zero() {
        return 1.0;
    }
    (elapsed.as_secs_f64() / ramp.as_secs_f64()).clamp(0.1, 1.0)
}

/// How long latencies take to fade from a peak-EWMA.
const DECAY: Duration = Duration::from_secs(10);

/// Latency that jumps to a new peak at once, moves towards lower samples over [`DECAY`], and
/// fades while no sample comes, so a server passed over for one bad moment is tried again.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    value: f64,
    at: Instant,
}

impl PeakEwma {
    pub fn new(seed: f64, now: Instant) -> Self {
        Self {
            value: seed,
            at: now,
        }
    }

    fn keep(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (-elapsed / DECAY.as_secs_f64()).exp()
    }

    pub fn observe(&mut self, sample: f64, now: Instant) {
        if sample > self.value {
            self.value = sample;
        } else {
            let keep = self.keep(now);
            self.value = self.value * keep + sample * (1.0 - keep);
        }
        self.at = now;
    }

    /// The estimate at `now`.
    pub fn get(&self, now: Instant) -> f64 {
        self.value * self.keep(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(weight: f64, in_flight: usize, latency: f64) -> Candidate {
        Candidate {
            weight,
            in_flight,
            latency,
        }
    }

    fn shares(balance: Balance, candidates: &[Candidate], rounds: usize) -> Vec<usize> {
        let mut counts = vec![0; candidates.len()];
        for turn in 0..rounds {
            counts[pick(balance, candidates, turn).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_takes_turns_and_weighted_follows_weights() {
        let c = [candidate(1.0, 0, 0.01), candidate(3.0, 0, 0.01)];
        assert_eq!(shares(Balance::RoundRobin, &c, 10), vec![5, 5]);
        let counts = shares(Balance::Weighted, &c, 4000);
        assert!((800..1200).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn least_requests_prefers_the_idle_server() {
        let c = [
            candidate(1.0, 5, 0.01),
            candidate(1.0, 0, 0.01),
            candidate(1.0, 3, 0.01),
        ];
        assert_eq!(shares(Balance::LeastRequests, &c, 50), vec![0, 50, 0]);
    }

    #[test]
    fn p2c_avoids_the_slow_server_and_ramps_a_new_one() {
        let c = [
            candidate(1.0, 0, 0.001),
            candidate(1.0, 0, 0.001),
            candidate(1.0, 0, 0.1),
        ];
        let counts = shares(Balance::P2c, &c, 3000);
        // The slow one wins only when drawn twice, which cannot happen: never.
        assert_eq!(counts[2], 0, "{counts:?}");
        // A server at 10 % of its weight (slow start) is drawn rarely.
        let c = [candidate(1.0, 0, 0.001), candidate(0.1, 0, 0.001)];
        let counts = shares(Balance::P2c, &c, 3000);
        assert!(counts[1] < 300, "{counts:?}");
    }

    #[test]
    fn slow_start_ramps_from_ten_percent() {
        let ramp = Duration::from_secs(30);
        assert_eq!(slow_start(Duration::ZERO, ramp), 0.1);
        assert_eq!(slow_start(Duration::from_secs(15), ramp), 0.5);
        assert_eq!(slow_start(Duration::from_secs(60), ramp), 1.0);
        assert_eq!(slow_start(Duration::ZERO, Duration::ZERO), 1.0);
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let start = Instant::now();
        let mut ewma = PeakEwma::new(0.01, start);
        ewma.observe(0.5, start);
        assert_eq!(ewma.get(start), 0.5);
        let later = start + Duration::from_secs(10);
        ewma.observe(0.01, later);
        assert!(ewma.get(later) < 0.5 * 0.4 + 0.01, "{}", ewma.get(later));
        // Without samples it fades.
        assert!(ewma.get(later + Duration::from_secs(30)) < ewma.get(later) * 0.1);
    }
}
