//! Per-target health and latency, shared by every Envoy worker thread.
//!
//! Routing needs to skip a provider+model target that keeps failing (for a
//! cool-down, backing off while it stays broken) and to prefer the faster of
//! the healthy ones. Each worker sees only part of the traffic, so the
//! statistics live in proxy-wasm shared data, updated with compare-and-swap.
//!
//! Shared data never expires, so each target owns exactly one key
//! (`meshllm/health/v1/<target>`) holding a fixed-size value: a ring of time
//! buckets that are reused as time advances, plus the cool-down state and the
//! latency averages. A missing or unreadable value is simply fresh state.

use crate::host::SharedData;

/// Tuning for the rolling window, the cool-down and the latency averages.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPolicy {
    /// Length of the rolling window the error rate is computed over.
    pub window_secs: u32,
    /// How many buckets the window is cut into (clamped to 1..=60).
    pub buckets: u32,
    /// Requests the window must hold before its error rate can trip a cool-down.
    pub min_requests: u32,
    /// Error rate (failures and rate limits per request) that trips a cool-down.
    pub max_error_rate: f64,
    /// Failures in a row that trip a cool-down.
    pub consecutive_failures: u32,
    /// The first cool-down; each re-entry without a success in between doubles it.
    pub cooldown_secs: u32,
    /// Upper bound for any cool-down, Retry-After included.
    pub max_cooldown_secs: u32,
    /// Weight of the newest sample in the latency averages (0..=1).
    pub ewma_alpha: f64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            window_secs: 60,
            buckets: 6,
            min_requests: 5,
            max_error_rate: 0.5,
            consecutive_failures: 3,
            cooldown_secs: 30,
            max_cooldown_secs: 300,
            ewma_alpha: 0.3,
        }
    }
}

/// How one request to a target ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Answered; `ttft_ms` is the time to the first token when streaming.
    Success {
        latency_ms: u64,
        ttft_ms: Option<u64>,
    },
    /// Failed (5xx, connection error, timeout).
    Failure,
    /// Refused for rate limiting (429), with the provider's Retry-After if given.
    RateLimited { retry_after_secs: Option<u64> },
}

/// What routing needs to know about a target right now.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetHealth {
    /// False while the target is cooling down.
    pub available: bool,
    pub cooldown_remaining_ms: u64,
    /// Counts over the rolling window.
    pub requests: u32,
    pub failures: u32,
    pub rate_limited: u32,
    /// `(failures + rate_limited) / requests` over the window; 0 without requests.
    pub error_rate: f64,
    /// Averages over successes; `None` until one was recorded.
    pub latency_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    /// Successes folded into `latency_ms` (saturating).
    pub samples: u32,
    /// Failures and rate limits since the last success.
    pub consecutive_failures: u32,
}

/// Read-modify-write attempts before an update is dropped; losing a sample
/// under heavy contention is better than stalling a worker.
const MAX_CAS_ATTEMPTS: u32 = 8;

/// The bucket count is stored in one byte.
const MAX_BUCKETS: u32 = 60;

/// Bumped whenever the layout below changes; other versions read as fresh.
const VERSION: u8 = 1;

const KEY_PREFIX: &str = "meshllm/health/v1/";

/// Folds `outcome` into the target's shared statistics and cool-down state.
/// Gives up silently after a few lost compare-and-swap races or a host error.
pub fn record(
    store: &mut dyn SharedData,
    target: &str,
    outcome: &Outcome,
    now_ms: u64,
    policy: &HealthPolicy,
) {
    let key = key(target);
    let layout = Layout::of(policy);
    for _ in 0..MAX_CAS_ATTEMPTS {
        // Envoy ignores the token when the key is absent, so a first write
        // can race another first write; one lost sample is acceptable.
        let (mut state, cas) = match store.shared_get(&key) {
            Some((bytes, cas)) => (
                State::decode(&bytes, layout).unwrap_or_else(|| State::fresh(layout)),
                Some(cas),
            ),
            None => (State::fresh(layout), None),
        };
        state.apply(outcome, now_ms, layout, policy);
        match store.shared_set(&key, &state.encode(layout), cas) {
            Ok(true) => return,
            Ok(false) => continue,
            Err(err) => {
                log::debug!("health: not recorded for {target}: {err}");
                return;
            }
        }
    }
    log::debug!("health: not recorded for {target}: {MAX_CAS_ATTEMPTS} CAS conflicts");
}

/// The target's health at `now_ms`; a target never recorded is available.
pub fn snapshot(
    store: &dyn SharedData,
    target: &str,
    now_ms: u64,
    policy: &HealthPolicy,
) -> TargetHealth {
    let layout = Layout::of(policy);
    let state = store
        .shared_get(&key(target))
        .and_then(|(bytes, _)| State::decode(&bytes, layout))
        .unwrap_or_else(|| State::fresh(layout));
    let window = state.window_counts(now_ms, layout);
    TargetHealth {
        available: now_ms >= state.cooldown_until_ms,
        cooldown_remaining_ms: state.cooldown_until_ms.saturating_sub(now_ms),
        requests: window.requests,
        failures: window.failures,
        rate_limited: window.rate_limited,
        error_rate: window.error_rate(),
        latency_ms: (state.samples > 0).then_some(state.latency_ewma),
        ttft_ms: (state.ttft_samples > 0).then_some(state.ttft_ewma),
        samples: state.samples,
        consecutive_failures: state.consecutive_failures,
    }
}

fn key(target: &str) -> String {
    format!("{KEY_PREFIX}{target}")
}

/// The bucket geometry a policy implies. Stored values record it, so a
/// policy change makes old values read as fresh instead of misread.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Layout {
    buckets: u8,
    bucket_ms: u32,
}

impl Layout {
    fn of(policy: &HealthPolicy) -> Self {
        let buckets = policy.buckets.clamp(1, MAX_BUCKETS);
        let window_ms = u64::from(policy.window_secs).saturating_mul(1000);
        let bucket_ms = (window_ms / u64::from(buckets)).max(1);
        Layout {
            buckets: u8::try_from(buckets).unwrap_or(u8::MAX),
            bucket_ms: u32::try_from(bucket_ms).unwrap_or(u32::MAX),
        }
    }

    fn epoch(self, now_ms: u64) -> u64 {
        now_ms / u64::from(self.bucket_ms)
    }

    fn slot(self, epoch: u64) -> usize {
        usize::try_from(epoch % u64::from(self.buckets)).unwrap_or(0)
    }

    /// Whether a bucket started at `epoch` still lies inside the window
    /// ending in `current`.
    fn is_live(self, epoch: u64, current: u64) -> bool {
        epoch <= current && current - epoch < u64::from(self.buckets)
    }

    fn encoded_len(self) -> usize {
        HEADER_LEN + usize::from(self.buckets) * BUCKET_LEN
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bucket {
    /// Start of the bucket, in bucket widths since the Unix epoch.
    epoch: u64,
    requests: u32,
    failures: u32,
    rate_limited: u32,
}

impl Bucket {
    fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        f64::from(self.failures.saturating_add(self.rate_limited)) / f64::from(self.requests)
    }
}

/// Encoded layout, version 1, all integers little-endian:
///
/// | offset | size | field                                          |
/// |--------|------|------------------------------------------------|
/// | 0      | 1    | version (1)                                    |
/// | 1      | 1    | bucket count `n`                               |
/// | 2      | 4    | bucket width in ms (u32)                       |
/// | 6      | 4    | consecutive failures (u32)                     |
/// | 10     | 4    | backoff level: cool-downs since last success   |
/// | 14     | 8    | cool-down end, Unix ms (u64)                   |
/// | 22     | 4    | latency samples (u32)                          |
/// | 26     | 4    | time-to-first-token samples (u32)              |
/// | 30     | 8    | latency EWMA, ms (f64)                         |
/// | 38     | 8    | time-to-first-token EWMA, ms (f64)             |
/// | 46     | 20n  | buckets: epoch u64, requests u32, failures u32, rate_limited u32 |
///
/// Bucket `i` holds the epoch with `epoch % n == i`.
const HEADER_LEN: usize = 46;
const BUCKET_LEN: usize = 20;

#[derive(Debug, Clone, PartialEq)]
struct State {
    consecutive_failures: u32,
    backoff_level: u32,
    cooldown_until_ms: u64,
    samples: u32,
    ttft_samples: u32,
    latency_ewma: f64,
    ttft_ewma: f64,
    buckets: Vec<Bucket>,
}

impl State {
    fn fresh(layout: Layout) -> Self {
        State {
            consecutive_failures: 0,
            backoff_level: 0,
            cooldown_until_ms: 0,
            samples: 0,
            ttft_samples: 0,
            latency_ewma: 0.0,
            ttft_ewma: 0.0,
            buckets: vec![Bucket::default(); usize::from(layout.buckets)],
        }
    }

    fn apply(&mut self, outcome: &Outcome, now_ms: u64, layout: Layout, policy: &HealthPolicy) {
        let current = layout.epoch(now_ms);
        if let Some(bucket) = self.buckets.get_mut(layout.slot(current)) {
            if bucket.epoch != current {
                *bucket = Bucket {
                    epoch: current,
                    ..Bucket::default()
                };
            }
            bucket.requests = bucket.requests.saturating_add(1);
            match outcome {
                Outcome::Success { .. } => {}
                Outcome::Failure => bucket.failures = bucket.failures.saturating_add(1),
                Outcome::RateLimited { .. } => {
                    bucket.rate_limited = bucket.rate_limited.saturating_add(1)
                }
            }
        }

        match *outcome {
            Outcome::Success {
                latency_ms,
                ttft_ms,
            } => {
                // A success ends the backoff but not a running cool-down: it
                // may be an old in-flight request, and a Retry-After stands.
                self.consecutive_failures = 0;
                self.backoff_level = 0;
                let alpha = ewma_alpha(policy);
                self.latency_ewma = ewma(self.latency_ewma, self.samples, latency_ms as f64, alpha);
                self.samples = self.samples.saturating_add(1);
                if let Some(ttft_ms) = ttft_ms {
                    self.ttft_ewma = ewma(self.ttft_ewma, self.ttft_samples, ttft_ms as f64, alpha);
                    self.ttft_samples = self.ttft_samples.saturating_add(1);
                }
            }
            Outcome::Failure | Outcome::RateLimited { .. } => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if let Outcome::RateLimited {
                    retry_after_secs: Some(secs),
                } = *outcome
                {
                    let secs = secs.min(u64::from(policy.max_cooldown_secs));
                    let until = now_ms.saturating_add(secs.saturating_mul(1000));
                    self.cooldown_until_ms = self.cooldown_until_ms.max(until);
                }
                // Failures of requests sent before the cool-down began must
                // not extend or double it; only failed probes after it do.
                if now_ms >= self.cooldown_until_ms && self.trips(now_ms, layout, policy) {
                    let secs = backoff_secs(policy, self.backoff_level);
                    self.cooldown_until_ms = now_ms.saturating_add(secs.saturating_mul(1000));
                    self.backoff_level = self.backoff_level.saturating_add(1);
                }
            }
        }
    }

    fn trips(&self, now_ms: u64, layout: Layout, policy: &HealthPolicy) -> bool {
        if self.consecutive_failures >= policy.consecutive_failures {
            return true;
        }
        let window = self.window_counts(now_ms, layout);
        window.requests >= policy.min_requests && window.error_rate() >= policy.max_error_rate
    }

    /// Sums of the buckets inside the window; `epoch` is meaningless here.
    fn window_counts(&self, now_ms: u64, layout: Layout) -> Bucket {
        let current = layout.epoch(now_ms);
        self.buckets
            .iter()
            .filter(|bucket| layout.is_live(bucket.epoch, current))
            .fold(Bucket::default(), |sum, bucket| Bucket {
                epoch: 0,
                requests: sum.requests.saturating_add(bucket.requests),
                failures: sum.failures.saturating_add(bucket.failures),
                rate_limited: sum.rate_limited.saturating_add(bucket.rate_limited),
            })
    }

    fn encode(&self, layout: Layout) -> Vec<u8> {
        let mut out = Vec::with_capacity(layout.encoded_len());
        out.push(VERSION);
        out.push(layout.buckets);
        out.extend_from_slice(&layout.bucket_ms.to_le_bytes());
        out.extend_from_slice(&self.consecutive_failures.to_le_bytes());
        out.extend_from_slice(&self.backoff_level.to_le_bytes());
        out.extend_from_slice(&self.cooldown_until_ms.to_le_bytes());
        out.extend_from_slice(&self.samples.to_le_bytes());
        out.extend_from_slice(&self.ttft_samples.to_le_bytes());
        out.extend_from_slice(&self.latency_ewma.to_le_bytes());
        out.extend_from_slice(&self.ttft_ewma.to_le_bytes());
        for bucket in &self.buckets {
            out.extend_from_slice(&bucket.epoch.to_le_bytes());
            out.extend_from_slice(&bucket.requests.to_le_bytes());
            out.extend_from_slice(&bucket.failures.to_le_bytes());
            out.extend_from_slice(&bucket.rate_limited.to_le_bytes());
        }
        out
    }

    /// `None` for anything but a well-formed value written with `layout`.
    fn decode(bytes: &[u8], layout: Layout) -> Option<Self> {
        if bytes.len() != layout.encoded_len() {
            return None;
        }
        let mut reader = Reader(bytes);
        if reader.bytes::<1>()? != [VERSION]
            || reader.bytes::<1>()? != [layout.buckets]
            || reader.u32()? != layout.bucket_ms
        {
            return None;
        }
        let mut state = State {
            consecutive_failures: reader.u32()?,
            backoff_level: reader.u32()?,
            cooldown_until_ms: reader.u64()?,
            samples: reader.u32()?,
            ttft_samples: reader.u32()?,
            latency_ewma: reader.f64()?,
            ttft_ewma: reader.f64()?,
            buckets: Vec::with_capacity(usize::from(layout.buckets)),
        };
        if !state.latency_ewma.is_finite() || !state.ttft_ewma.is_finite() {
            return None;
        }
        for _ in 0..layout.buckets {
            state.buckets.push(Bucket {
                epoch: reader.u64()?,
                requests: reader.u32()?,
                failures: reader.u32()?,
                rate_limited: reader.u32()?,
            });
        }
        Some(state)
    }
}

/// Reads fixed-size fields off the front of a slice; `None` past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    fn f64(&mut self) -> Option<f64> {
        self.bytes().map(f64::from_le_bytes)
    }
}

fn ewma_alpha(policy: &HealthPolicy) -> f64 {
    if policy.ewma_alpha.is_nan() {
        return 1.0;
    }
    policy.ewma_alpha.clamp(0.0, 1.0)
}

/// The first sample is taken as is, so a new target is not dragged toward 0.
fn ewma(average: f64, samples: u32, sample: f64, alpha: f64) -> f64 {
    if samples == 0 {
        sample
    } else {
        alpha * sample + (1.0 - alpha) * average
    }
}

/// `cooldown_secs * 2^level`, capped at `max_cooldown_secs`.
fn backoff_secs(policy: &HealthPolicy, level: u32) -> u64 {
    let factor = 1u64.checked_shl(level).unwrap_or(u64::MAX);
    u64::from(policy.cooldown_secs)
        .saturating_mul(factor)
        .min(u64::from(policy.max_cooldown_secs))
}

/// Seconds to wait from a Retry-After header: delta-seconds or an IMF-fixdate
/// (`Wed, 21 Oct 2015 07:28:00 GMT`); dates in the past give 0.
pub fn parse_retry_after(value: &str, now_unix_secs: u64) -> Option<u64> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long delays saturate; the cool-down caps them anyway.
        return Some(value.bytes().fold(0u64, |n, digit| {
            n.saturating_mul(10).saturating_add(u64::from(digit - b'0'))
        }));
    }
    parse_imf_fixdate(value).map(|date| date.saturating_sub(now_unix_secs))
}

const DAY_NAMES: [&str; 7] = ["Mon,", "Tue,", "Wed,", "Thu,", "Fri,", "Sat,", "Sun,"];
const MONTH_NAMES: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Unix seconds of an IMF-fixdate (RFC 9110 §5.6.7). The day name is checked
/// for form only; dates before 1970 read as the epoch (they are past anyway).
fn parse_imf_fixdate(value: &str) -> Option<u64> {
    let mut fields = value.split(' ');
    let day_name = fields.next()?;
    let day = fixed_digits(fields.next()?, 2)?;
    let month_name = fields.next()?;
    let year = fixed_digits(fields.next()?, 4)?;
    let mut clock = fields.next()?.split(':');
    let hour = fixed_digits(clock.next()?, 2)?;
    let minute = fixed_digits(clock.next()?, 2)?;
    let second = fixed_digits(clock.next()?, 2)?;
    if !DAY_NAMES.contains(&day_name)
        || fields.next()? != "GMT"
        || fields.next().is_some()
        || clock.next().is_some()
    {
        return None;
    }
    let month = MONTH_NAMES.iter().position(|&name| name == month_name)?;
    let month = u64::try_from(month).ok()?.saturating_add(1);
    // 60 admits a leap second.
    if day == 0 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_since_epoch(year, month, day)?;
    Some(
        days.saturating_mul(86_400)
            .saturating_add(hour.saturating_mul(3600))
            .saturating_add(minute.saturating_mul(60))
            .saturating_add(second),
    )
}

/// Exactly `len` ASCII digits.
fn fixed_digits(field: &str, len: usize) -> Option<u64> {
    if field.len() != len || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

fn is_leap_year(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a valid date; 0 for dates before it.
fn days_since_epoch(year: u64, month: u64, day: u64) -> Option<u64> {
    if year < 1970 {
        return Some(0);
    }
    // Leap years in 1..=y.
    let leaps = |y: u64| y / 4 - y / 100 + y / 400;
    let before_year = (year - 1970)
        .checked_mul(365)?
        .checked_add(leaps(year - 1) - leaps(1969))?;
    let before_month = (1..month).map(|m| days_in_month(year, m)).sum::<u64>();
    before_year.checked_add(before_month)?.checked_add(day - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::{MockShared, Rival};
    use std::collections::HashMap;

    const T: &str = "gpt-4o";
    const SEC: u64 = 1000;
    const OK: Outcome = Outcome::Success {
        latency_ms: 100,
        ttft_ms: None,
    };
    const FAIL: Outcome = Outcome::Failure;

    fn record_all(
        store: &mut MockShared,
        outcomes: &[Outcome],
        now_ms: u64,
        policy: &HealthPolicy,
    ) {
        for outcome in outcomes {
            record(store, T, outcome, now_ms, policy);
        }
    }

    fn health(store: &MockShared, now_ms: u64) -> TargetHealth {
        snapshot(store, T, now_ms, &HealthPolicy::default())
    }

    #[test]
    fn unknown_target_is_available_and_empty() {
        let store = MockShared::default();
        let h = health(&store, 5 * SEC);
        assert!(h.available);
        assert_eq!(h.cooldown_remaining_ms, 0);
        assert_eq!(
            (h.requests, h.failures, h.rate_limited, h.samples),
            (0, 0, 0, 0)
        );
        assert_eq!(h.error_rate, 0.0);
        assert_eq!((h.latency_ms, h.ttft_ms), (None, None));
    }

    #[test]
    fn window_rolls_over_and_ignores_stale_buckets() {
        // Default window: 6 buckets of 10 s. t0 is an arbitrary bucket start.
        let t0 = 1_700_000_000 * SEC;
        let policy = HealthPolicy::default();
        let mut store = MockShared::default();
        record_all(&mut store, &[OK, FAIL], t0, &policy);
        record_all(&mut store, &[OK], t0 + 15 * SEC, &policy);

        // (at, requests, failures): the first bucket leaves the window at
        // t0+60 s, the second at t0+70 s.
        let cases = [
            (t0, 2, 1),
            (t0 + 59 * SEC, 3, 1),
            (t0 + 60 * SEC, 1, 0),
            (t0 + 69 * SEC, 1, 0),
            (t0 + 70 * SEC, 0, 0),
            (t0 + 10_000 * SEC, 0, 0),
        ];
        for (at, requests, failures) in cases {
            let h = health(&store, at);
            assert_eq!(
                (h.requests, h.failures),
                (requests, failures),
                "at +{}",
                at - t0
            );
        }

        // Reusing the first bucket's slot one window later resets it.
        record_all(&mut store, &[FAIL], t0 + 61 * SEC, &policy);
        let h = health(&store, t0 + 61 * SEC);
        assert_eq!((h.requests, h.failures), (2, 1));
        assert_eq!(h.error_rate, 0.5);
    }

    #[test]
    fn error_rate_trips_cooldown_once_enough_requests() {
        // Consecutive failures set out of reach to isolate the error rate.
        let policy = HealthPolicy {
            consecutive_failures: 100,
            ..HealthPolicy::default()
        };
        let limited = Outcome::RateLimited {
            retry_after_secs: None,
        };
        let cases: [(&str, &[Outcome], bool); 5] = [
            ("2 of 5 failed", &[OK, FAIL, OK, FAIL, OK], true),
            ("3 of 4: below min_requests", &[FAIL, OK, FAIL, FAIL], true),
            ("3 of 5 failed", &[OK, FAIL, OK, FAIL, FAIL], false),
            (
                "rate limits count as errors",
                &[OK, limited, OK, FAIL, limited],
                false,
            ),
            // Only a failure trips it: a success never starts a cool-down.
            (
                "rate reached, last a success",
                &[FAIL, OK, FAIL, OK, FAIL, OK],
                false,
            ),
        ];
        for (name, outcomes, available) in cases {
            let mut store = MockShared::default();
            record_all(&mut store, outcomes, 0, &policy);
            let h = snapshot(&store, T, 0, &policy);
            assert_eq!(h.available, available, "{name}");
            let expected_remaining = if available { 0 } else { 30 * SEC };
            assert_eq!(h.cooldown_remaining_ms, expected_remaining, "{name}");
        }
    }

    #[test]
    fn consecutive_failures_trip_cooldown() {
        let limited = Outcome::RateLimited {
            retry_after_secs: None,
        };
        // Large min_requests isolates the consecutive-failure rule.
        let policy = HealthPolicy {
            min_requests: 100,
            ..HealthPolicy::default()
        };
        let cases: [(&[Outcome], bool); 5] = [
            (&[FAIL, FAIL], true),
            (&[FAIL, FAIL, FAIL], false),
            (&[FAIL, limited, FAIL], false),
            (&[FAIL, FAIL, OK, FAIL], true),
            (&[FAIL, FAIL, OK, FAIL, FAIL, FAIL], false),
        ];
        for (outcomes, available) in cases {
            let mut store = MockShared::default();
            record_all(&mut store, outcomes, 0, &policy);
            let h = snapshot(&store, T, 0, &policy);
            assert_eq!(h.available, available, "{outcomes:?}");
        }
    }

    #[test]
    fn cooldown_doubles_on_failed_probes_and_resets_on_success() {
        let policy = HealthPolicy::default();
        let mut store = MockShared::default();
        record_all(&mut store, &[FAIL, FAIL, FAIL], 0, &policy);
        assert_eq!(health(&store, 0).cooldown_remaining_ms, 30 * SEC);

        // Late failures of requests already in flight neither extend nor double it.
        record_all(&mut store, &[FAIL], 10 * SEC, &policy);
        assert_eq!(health(&store, 10 * SEC).cooldown_remaining_ms, 20 * SEC);

        // Each failed probe after a cool-down re-enters with twice the time,
        // capped at 300 s.
        let mut now = 30 * SEC;
        for expected_secs in [60, 120, 240, 300, 300] {
            assert!(
                health(&store, now).available,
                "before the {expected_secs} s probe"
            );
            record_all(&mut store, &[FAIL], now, &policy);
            let h = health(&store, now);
            assert!(!h.available);
            assert_eq!(h.cooldown_remaining_ms, expected_secs * SEC);
            now += expected_secs * SEC;
        }

        // A successful probe resets the backoff: the next trip is 30 s again.
        record_all(&mut store, &[OK], now, &policy);
        let h = health(&store, now);
        assert!(h.available);
        assert_eq!(h.consecutive_failures, 0);
        record_all(&mut store, &[FAIL, FAIL], now, &policy);
        assert!(health(&store, now).available);
        record_all(&mut store, &[FAIL], now, &policy);
        assert_eq!(health(&store, now).cooldown_remaining_ms, 30 * SEC);
    }

    #[test]
    fn success_during_cooldown_keeps_it() {
        let policy = HealthPolicy::default();
        let mut store = MockShared::default();
        record_all(&mut store, &[FAIL, FAIL, FAIL], 0, &policy);
        record_all(&mut store, &[OK], 5 * SEC, &policy);
        let h = health(&store, 5 * SEC);
        assert_eq!(h.cooldown_remaining_ms, 25 * SEC);
        assert_eq!(h.consecutive_failures, 0);
    }

    #[test]
    fn retry_after_sets_cooldown() {
        let now_secs = 1_445_412_480; // Wed, 21 Oct 2015 07:28:00 GMT
        let now = now_secs * SEC;
        // (Retry-After header, cool-down left): capped at 300 s; 0 and past
        // dates leave the target available after a single refusal.
        let cases = [
            ("120", 120),
            ("0", 0),
            ("3600", 300),
            ("Wed, 21 Oct 2015 07:29:30 GMT", 90),
            ("Wed, 21 Oct 2015 07:00:00 GMT", 0),
            ("Thu, 22 Oct 2015 07:28:00 GMT", 300),
        ];
        for (header, remaining_secs) in cases {
            let mut store = MockShared::default();
            let outcome = Outcome::RateLimited {
                retry_after_secs: parse_retry_after(header, now_secs),
            };
            record_all(&mut store, &[outcome], now, &HealthPolicy::default());
            let h = health(&store, now);
            assert_eq!(h.cooldown_remaining_ms, remaining_secs * SEC, "{header}");
            assert_eq!(h.available, remaining_secs == 0, "{header}");
            assert_eq!(h.rate_limited, 1, "{header}");
        }
    }

    #[test]
    fn retry_after_never_shortens_a_cooldown() {
        let policy = HealthPolicy::default();
        let mut store = MockShared::default();
        let retry = |secs| Outcome::RateLimited {
            retry_after_secs: Some(secs),
        };
        record_all(&mut store, &[retry(200)], 0, &policy);
        record_all(&mut store, &[retry(10)], 0, &policy);
        assert_eq!(health(&store, 0).cooldown_remaining_ms, 200 * SEC);
        record_all(&mut store, &[retry(250)], 0, &policy);
        assert_eq!(health(&store, 0).cooldown_remaining_ms, 250 * SEC);
    }

    #[test]
    fn parses_retry_after() {
        let cases: [(&str, u64, Option<u64>); 16] = [
            ("120", 0, Some(120)),
            (" 7 ", 0, Some(7)),
            ("0", 99, Some(0)),
            ("99999999999999999999999", 0, Some(u64::MAX)),
            ("Thu, 01 Jan 1970 00:00:00 GMT", 0, Some(0)),
            ("Tue, 29 Feb 2000 12:00:00 GMT", 0, Some(951_825_600)),
            ("Mon, 29 Feb 2016 00:00:00 GMT", 1_456_703_990, Some(10)),
            ("Fri, 31 Dec 9999 23:59:59 GMT", 0, Some(253_402_300_799)),
            ("Wed, 21 Oct 2015 07:28:00 GMT", u64::MAX, Some(0)),
            ("Sun, 01 Jan 1950 00:00:00 GMT", 0, Some(0)),
            ("", 0, None),
            ("-5", 0, None),
            ("1.5", 0, None),
            ("Sun, 29 Feb 2015 00:00:00 GMT", 0, None),
            ("Wed, 21 Oct 2015 07:28:00 UTC", 0, None),
            ("Sunday, 06-Nov-94 08:49:37 GMT", 0, None),
        ];
        for (header, now, expected) in cases {
            assert_eq!(parse_retry_after(header, now), expected, "{header:?}");
        }
        for malformed in [
            "Wed, 21 Foo 2015 07:28:00 GMT",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 00 Oct 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 24:00:00 GMT",
            "Wed, 21 Oct 2015 07:60:00 GMT",
            "Wed, 21 Oct 15 07:28:00 GMT",
            "Wed, 21 Oct 2015 07:28 GMT",
            "Wed, 21 Oct 2015 07:28:00:00 GMT",
            "Wed, 21 Oct 2015 07:28:00 GMT extra",
            "Wed,  21 Oct 2015 07:28:00 GMT",
            "Xyz, 21 Oct 2015 07:28:00 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_retry_after(malformed, 0), None, "{malformed:?}");
        }
    }

    #[test]
    fn latency_averages_match_hand_computed_ewma() {
        let policy = HealthPolicy::default();
        let mut store = MockShared::default();
        let success = |latency_ms, ttft_ms| Outcome::Success {
            latency_ms,
            ttft_ms,
        };
        // latency: 100, then .3*200 + .7*100 = 130, then .3*400 + .7*130 = 211.
        // ttft: 50, (none), then .3*80 + .7*50 = 59. Failures change neither.
        record_all(
            &mut store,
            &[
                success(100, Some(50)),
                FAIL,
                success(200, None),
                success(400, Some(80)),
            ],
            0,
            &policy,
        );
        let h = health(&store, 0);
        assert_eq!(h.samples, 3);
        assert!((h.latency_ms.unwrap_or(0.0) - 211.0).abs() < 1e-9, "{h:?}");
        assert!((h.ttft_ms.unwrap_or(0.0) - 59.0).abs() < 1e-9, "{h:?}");
    }

    #[test]
    fn latency_without_ttft_leaves_ttft_unknown() {
        let mut store = MockShared::default();
        record_all(&mut store, &[OK], 0, &HealthPolicy::default());
        let h = health(&store, 0);
        assert_eq!((h.latency_ms, h.ttft_ms, h.samples), (Some(100.0), None, 1));
    }

    #[test]
    fn cas_conflict_rereads_and_merges_the_rival_write() {
        let policy = HealthPolicy::default();
        // The rival worker's view: two failures already recorded.
        let mut rival = MockShared::default();
        record_all(&mut rival, &[FAIL, FAIL], 0, &policy);

        let mut store = MockShared::default();
        record_all(&mut store, &[OK], 0, &policy);
        let rival_value = rival.value(&key(T)).unwrap_or_default();
        store.rival = Some(Rival::writing(rival_value, 1));
        let calls_before = store.set_calls;
        record_all(&mut store, &[FAIL], 0, &policy);

        // Our failure lands on top of the rival's two: three in a row trip.
        assert_eq!(store.set_calls - calls_before, 2);
        let h = health(&store, 0);
        assert_eq!((h.requests, h.failures, h.consecutive_failures), (3, 3, 3));
        assert!(!h.available);
    }

    #[test]
    fn gives_up_after_bounded_cas_conflicts_or_host_error() {
        let policy = HealthPolicy::default();
        let mut store = MockShared::default();
        record_all(&mut store, &[OK], 0, &policy);
        let before = store.value(&key(T));
        store.rival = Some(Rival::writing(before.clone().unwrap_or_default(), u32::MAX));
        store.set_calls = 0;
        record_all(&mut store, &[FAIL], 0, &policy);
        assert_eq!(store.set_calls, MAX_CAS_ATTEMPTS);
        assert_eq!(store.shared_get(&key(T)).map(|(value, _)| value), before);

        store.rival = None;
        store.refuse_sets = true;
        store.set_calls = 0;
        record_all(&mut store, &[FAIL], 0, &policy);
        assert_eq!(store.set_calls, 1);
        assert_eq!(health(&store, 0).requests, 1);
    }

    #[test]
    fn corrupt_values_read_as_fresh_and_are_overwritten() {
        let policy = HealthPolicy::default();
        let layout = Layout::of(&policy);
        let mut good = MockShared::default();
        record_all(&mut good, &[FAIL, FAIL, FAIL], 0, &policy);
        let valid = good.shared_get(&key(T)).map(|(v, _)| v).unwrap_or_default();
        assert_eq!(valid.len(), layout.encoded_len());

        let with_byte = |at: usize, byte: u8| {
            let mut value = valid.clone();
            value[at] = byte;
            value
        };
        let with_nan_latency = {
            let mut value = valid.clone();
            value[30..38].copy_from_slice(&f64::NAN.to_le_bytes());
            value
        };
        let other_window = {
            let mut other = MockShared::default();
            let policy = HealthPolicy {
                window_secs: 120,
                ..HealthPolicy::default()
            };
            record_all(&mut other, &[FAIL, FAIL, FAIL], 0, &policy);
            other
                .shared_get(&key(T))
                .map(|(v, _)| v)
                .unwrap_or_default()
        };
        let cases = [
            ("empty", Vec::new()),
            ("truncated", valid[..valid.len() - 1].to_vec()),
            ("too long", [valid.as_slice(), &[0]].concat()),
            ("wrong version", with_byte(0, 2)),
            ("wrong bucket count", with_byte(1, 5)),
            ("NaN latency", with_nan_latency),
            ("other window width", other_window),
        ];
        for (name, value) in cases {
            let mut store = MockShared::default();
            store.write(&key(T), &value);
            let h = health(&store, 0);
            assert!(h.available && h.requests == 0, "{name}: {h:?}");
            record_all(&mut store, &[FAIL], 0, &policy);
            let h = health(&store, 0);
            assert_eq!((h.requests, h.failures), (1, 1), "{name}");
            let stored = store.shared_get(&key(T)).map(|(v, _)| v.len());
            assert_eq!(stored, Some(layout.encoded_len()), "{name}");
        }
    }

    #[test]
    fn one_fixed_size_key_per_target_over_long_spans() {
        let policy = HealthPolicy::default();
        let len = Layout::of(&policy).encoded_len();
        let mut store = MockShared::default();
        let targets = ["gpt-4o", "claude", "gemini"];
        // Ten days of irregular traffic, every outcome kind.
        let mut now = 0;
        let mut successes: HashMap<&str, u32> = HashMap::new();
        for i in 0u64..3000 {
            now += (i * 7919) % 600 * SEC;
            let outcome = match i % 4 {
                0 => FAIL,
                1 => Outcome::RateLimited {
                    retry_after_secs: Some(i % 50),
                },
                _ => Outcome::Success {
                    latency_ms: i,
                    ttft_ms: Some(i / 2),
                },
            };
            let target = targets[(i % 3) as usize];
            if matches!(outcome, Outcome::Success { .. }) {
                *successes.entry(target).or_default() += 1;
            }
            record(&mut store, target, &outcome, now, &policy);
        }
        assert!(now > 10 * 86_400 * SEC);
        assert_eq!(store.values.len(), targets.len());
        for target in targets {
            let (value, _) = &store.values[&key(target)];
            assert_eq!(value.len(), len, "{target}");
            // The value kept decoding: no sample was lost to a reset.
            let h = snapshot(&store, target, now, &policy);
            assert_eq!(h.samples, successes[target], "{target}");
        }
    }

    #[test]
    fn layout_is_clamped_for_odd_policies() {
        let cases = [
            (
                (60, 6),
                Layout {
                    buckets: 6,
                    bucket_ms: 10_000,
                },
            ),
            (
                (60, 0),
                Layout {
                    buckets: 1,
                    bucket_ms: 60_000,
                },
            ),
            (
                (60, 1000),
                Layout {
                    buckets: 60,
                    bucket_ms: 1_000,
                },
            ),
            (
                (0, 6),
                Layout {
                    buckets: 6,
                    bucket_ms: 1,
                },
            ),
            (
                (u32::MAX, 1),
                Layout {
                    buckets: 1,
                    bucket_ms: u32::MAX,
                },
            ),
        ];
        for ((window_secs, buckets), expected) in cases {
            let policy = HealthPolicy {
                window_secs,
                buckets,
                ..HealthPolicy::default()
            };
            assert_eq!(Layout::of(&policy), expected, "{window_secs} s / {buckets}");
            // Records and reads without panicking at the extremes of time.
            let mut store = MockShared::default();
            for now in [0, u64::MAX / 2, u64::MAX] {
                record(&mut store, T, &FAIL, now, &policy);
                assert_eq!(snapshot(&store, T, now, &policy).failures, 1);
            }
        }
    }
}
