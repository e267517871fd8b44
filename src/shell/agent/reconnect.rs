//! The dialer's pure decisions: how long to wait before the next connection attempt
//! (exponential backoff, capped) and which mirror-connect path to try (path 0 first,
//! the next path after a failure). No clock, no sockets: the caller passes outcomes in.

/// Exponential backoff: `initial_ms`, doubled after every failure up to `max_ms`; reset
/// after a link that stayed up long enough to count as healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    next_ms: u64,
}

impl Backoff {
    pub fn new(initial_ms: u64, max_ms: u64) -> Backoff {
        assert!(initial_ms > 0 && initial_ms <= max_ms);
        Backoff {
            initial_ms,
            max_ms,
            next_ms: initial_ms,
        }
    }

    /// The delay before the next attempt; the one after it is doubled (capped).
    pub fn next_delay_ms(&mut self) -> u64 {
        let delay = self.next_ms;
        self.next_ms = self.next_ms.saturating_mul(2).min(self.max_ms);
        delay
    }

    /// A healthy link: the next failure starts again from the initial delay.
    pub fn reset(&mut self) {
        self.next_ms = self.initial_ms;
    }
}

/// Which of the (one or two) mirror-connect paths the dialer uses. It starts on path 0
/// and stays on a path while it works; any failure on it (connect refused or timed
/// out, handshake failed, link lost) moves to the next path, wrapping around, so a
/// broken network costs one failed attempt and the other network takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSelector {
    count: usize,
    current: usize,
}

impl PathSelector {
    pub fn new(count: usize) -> PathSelector {
        assert!(count >= 1, "a mirror has at least one path");
        PathSelector { count, current: 0 }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// The attempt on the current path failed, or its link was lost.
    pub fn failed(&mut self) {
        self.current = (self.current + 1) % self.count;
    }
}

/// What the dialer does after a connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// TCP connect or the handshake failed.
    Failed,
    /// The link was up for `up_ms`, then ended.
    LinkEnded { up_ms: u64 },
    /// The connection lost the crossed-connect tie-break or was refused as a duplicate:
    /// the other connection is the link, nothing is wrong with the path.
    Duplicate,
}

/// Applies an outcome to the backoff and the path; returns the delay before the next
/// attempt.
pub fn after(
    outcome: Outcome,
    backoff: &mut Backoff,
    path: &mut PathSelector,
    stable_ms: u64,
) -> u64 {
    match outcome {
        Outcome::Failed => path.failed(),
        Outcome::LinkEnded { up_ms } => {
            if up_ms >= stable_ms {
                backoff.reset();
            }
            path.failed();
        }
        Outcome::Duplicate => {}
    }
    backoff.next_delay_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut b = Backoff::new(100, 5000);
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay_ms()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000],
            "doubling, capped"
        );
        b.reset();
        assert_eq!(b.next_delay_ms(), 100);
    }

    #[test]
    fn backoff_never_overflows() {
        let mut b = Backoff::new(1, u64::MAX);
        for _ in 0..100 {
            b.next_delay_ms();
        }
        assert_eq!(b.next_delay_ms(), u64::MAX);
    }

    #[test]
    fn path_zero_first_then_the_other_after_a_failure() {
        let mut p = PathSelector::new(2);
        assert_eq!(p.current(), 0);
        p.failed();
        assert_eq!(p.current(), 1);
        p.failed();
        assert_eq!(p.current(), 0, "wraps back to path 0");
    }

    #[test]
    fn one_path_stays_on_it() {
        let mut p = PathSelector::new(1);
        p.failed();
        assert_eq!(p.current(), 0);
    }

    #[test]
    fn a_stable_link_resets_the_backoff_and_a_flapping_one_does_not() {
        let mut b = Backoff::new(100, 5000);
        let mut p = PathSelector::new(2);
        assert_eq!(after(Outcome::Failed, &mut b, &mut p, 5000), 100);
        assert_eq!(p.current(), 1);
        assert_eq!(after(Outcome::Failed, &mut b, &mut p, 5000), 200);
        assert_eq!(p.current(), 0);
        // Up for a moment only (split brain drops it at once): keep backing off.
        assert_eq!(
            after(Outcome::LinkEnded { up_ms: 10 }, &mut b, &mut p, 5000),
            400
        );
        // Up for a minute: the next attempt comes quickly.
        assert_eq!(
            after(Outcome::LinkEnded { up_ms: 60_000 }, &mut b, &mut p, 5000),
            100
        );
    }

    #[test]
    fn a_duplicate_keeps_the_path() {
        let mut b = Backoff::new(100, 5000);
        let mut p = PathSelector::new(2);
        after(Outcome::Duplicate, &mut b, &mut p, 5000);
        assert_eq!(p.current(), 0);
    }
}
