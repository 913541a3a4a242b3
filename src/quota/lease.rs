//! Leases: a proxy's slice of a shared bucket, held in shared data so every
//! worker of the proxy admits from it without a call to the store.
//!
//! A rule with `lease` asks the store (`store.lua`, mode `lease`) for more
//! than a request needs: up to `size` units per limit, and never more than
//! `(max − used) / (2 × proxies)`, so leases shrink as the counter fills and
//! the last units are granted one request at a time (exact mode). The
//! store's counter counts what was leased; the proxy's state counts what
//! its requests reserved and used out of that.
//!
//! Per bucket, one shared-data key (`<bucket>@lease`, JSON) holds, per
//! counter of the window: `granted` (added to the store's counter by this
//! proxy), `used` (reserved or settled here), `seen` (the counter at the
//! last answer, for headers and gauges); and the election of the worker
//! that asks for the next lease (`refill_since_ms`, stale after the
//! store's timeout plus [`STALE_MARGIN_MS`], so a lost call does not block
//! refills for good). Every write is compare-and-swapped.
//!
//! - Below the low-water mark (`size / 2` available) after a take, the
//!   worker that wins the election sends a detached call for the next lease.
//! - A request the lease cannot cover asks the store itself (and waits, as
//!   in exact mode), for its amount plus a lease when it wins the election.
//! - Settles adjust `used` here; usage past `granted` (estimates too low)
//!   reaches the store once it passes `size / 2` units (the batch bound B).
//! - Unused lease goes back (a negative settle) when the lease idles
//!   ([`IDLE_MS`] without a take). A window that ended is dropped, not
//!   returned: its counter no longer limits anything and expires.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::error::ConfigError;
use crate::host::{Host, SharedData};
use crate::quota::buckets::{Limit, Meter};
use crate::quota::store::{self, Counter, Reply, StoreConfig};

/// An election older than the store's timeout plus this is stale.
pub const STALE_MARGIN_MS: u64 = 1000;
/// A lease with no take for this long goes back to the store.
pub const IDLE_MS: u64 = 5000;
/// Compare-and-swap attempts before giving up (as `buckets.rs`).
const MAX_CAS_ATTEMPTS: u32 = 64;

/// `lease` of a shared rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasePolicy {
    /// Proxies that share the rule (P in the shrinking rule).
    pub proxies: u64,
    /// The largest lease per limit (Lmax), in the order of the rule's limits.
    pub sizes: Vec<u64>,
}

impl LeasePolicy {
    /// The store grants at most (max − used) / this.
    pub fn divisor(&self) -> u64 {
        self.proxies.saturating_mul(2).max(1)
    }

    /// A refill is asked for when less than this is left of limit `i`.
    pub fn low_water(&self, i: usize) -> u64 {
        self.sizes.get(i).map_or(0, |s| s / 2)
    }

    /// Usage past the lease of limit `i` is sent once it passes this (B).
    pub fn batch(&self, i: usize) -> u64 {
        self.sizes.get(i).map_or(0, |s| s / 2)
    }
}

/// Compiles a rule's `lease`: `{"proxies": P, "requests": n, "tokens": n,
/// "usd": d}`; a size left out is a tenth of the limit's share,
/// `max / (10 × P)` (at least 1).
pub fn compile(at: &str, value: &Value, limits: &[Limit]) -> Result<LeasePolicy, ConfigError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object, e.g. {\"proxies\": 3}"))?;
    let mut proxies = None;
    let mut given: Vec<(Meter, u64)> = Vec::new();
    for (field, v) in obj {
        let fat = format!("{at}.{field}");
        let meter = match field.as_str() {
            "proxies" => {
                let p = v
                    .as_u64()
                    .filter(|p| (1..=10_000).contains(p))
                    .ok_or_else(|| {
                        ConfigError::new(&fat, "must be a whole number from 1 to 10000")
                    })?;
                proxies = Some(p);
                continue;
            }
            "requests" => Meter::Requests,
            "tokens" => Meter::Tokens,
            "usd" => Meter::MicroUsd,
            _ => {
                return Err(ConfigError::new(
                    &fat,
                    "unknown field (expected proxies, requests, tokens or usd)",
                ))
            }
        };
        let size = match meter {
            Meter::MicroUsd => v
                .as_f64()
                .filter(|d| d.is_finite() && *d > 0.0 && *d <= 1e9)
                .map(|d| (d * 1e6).round() as u64),
            _ => v.as_u64().filter(|n| *n >= 1),
        }
        .ok_or_else(|| {
            ConfigError::new(
                &fat,
                if meter == Meter::MicroUsd {
                    "must be an amount in dollars above 0"
                } else {
                    "must be a whole number of at least 1"
                },
            )
        })?;
        if !limits.iter().any(|l| l.meter == meter) {
            return Err(ConfigError::new(
                &fat,
                "the rule sets no limit on this meter",
            ));
        }
        given.push((meter, size.max(1)));
    }
    let proxies = proxies.ok_or_else(|| {
        ConfigError::new(
            format!("{at}.proxies"),
            "is required: how many proxies share the rule (it bounds what leases strand)",
        )
    })?;
    let sizes = limits
        .iter()
        .map(|l| {
            given
                .iter()
                .find(|(m, _)| *m == l.meter)
                .map_or((l.max / proxies.saturating_mul(10)).max(1), |(_, s)| *s)
        })
        .collect();
    Ok(LeasePolicy { proxies, sizes })
}

/// One counter's lease in this proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    /// The store's counter key (its window is in it).
    key: String,
    granted: u64,
    used: u64,
    seen: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    slots: Vec<Slot>,
    /// When a worker was elected to ask for the next lease; 0: none is.
    #[serde(default)]
    refill_since_ms: u64,
    #[serde(default)]
    last_take_ms: u64,
}

impl State {
    fn slot(&self, key: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.key == key)
    }

    fn slot_mut(&mut self, key: &str) -> &mut Slot {
        let i = match self.slots.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    key: key.to_string(),
                    ..Slot::default()
                });
                self.slots.len() - 1
            }
        };
        &mut self.slots[i]
    }
}

/// The shared-data key of bucket `bucket`'s lease.
pub fn state_key(bucket: &str) -> String {
    format!("{bucket}@lease")
}

/// Creates the lease state of `bucket`, empty, unless it exists, so later
/// writes are compare-and-swapped (as `buckets::ensure`).
pub fn ensure(store: &mut dyn SharedData, bucket: &str) {
    let key = state_key(bucket);
    if store.shared_get(&key).is_some() {
        return;
    }
    let empty = serde_json::to_vec(&State::default()).unwrap_or_default();
    if let Err(err) = store.shared_set(&key, &empty, None) {
        log::warn!("quota lease: {key}: not created: {err}");
    }
}

/// Reads, changes with `f` and writes back the lease state of `bucket`,
/// retrying when another worker wrote in between; `f` may run several
/// times. None when the host failed or kept conflicting.
fn update<R>(
    store: &mut dyn SharedData,
    bucket: &str,
    mut f: impl FnMut(&mut State) -> R,
) -> Option<R> {
    let key = state_key(bucket);
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (state, cas) = match store.shared_get(&key) {
            Some((bytes, cas)) => (
                serde_json::from_slice::<State>(&bytes).unwrap_or_default(),
                Some(cas),
            ),
            None => (State::default(), None),
        };
        let mut next = state.clone();
        let out = f(&mut next);
        if next == state {
            return Some(out);
        }
        let bytes = serde_json::to_vec(&next).ok()?;
        match store.shared_set(&key, &bytes, cas) {
            Ok(true) => return Some(out),
            Ok(false) => continue,
            Err(err) => {
                log::warn!("quota lease: {key}: not written: {err}");
                return None;
            }
        }
    }
    log::warn!("quota lease: {key}: not written: {MAX_CAS_ATTEMPTS} CAS conflicts");
    None
}

/// What a take from the lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Reserved in the lease; `seen` per counter for headers.
    Taken { elected: bool, seen: Vec<u64> },
    /// The lease cannot cover it: ask the store (with a lease when elected).
    Short { elected: bool },
}

/// Reserves each counter's `reserved` from the lease, all or nothing, and
/// elects this worker to ask for the next lease when one is needed and no
/// other worker is asking (or its election is older than `stale_ms`).
pub fn take(
    store: &mut dyn SharedData,
    bucket: &str,
    policy: &LeasePolicy,
    counters: &[Counter],
    now_ms: u64,
    stale_ms: u64,
) -> Take {
    let taken = update(store, bucket, |state| {
        // Slots of ended windows are dropped (see the module doc).
        state
            .slots
            .retain(|s| counters.iter().any(|c| c.key == s.key));
        let mut fits = true;
        let mut low = false;
        for (i, c) in counters.iter().enumerate() {
            let slot = state.slot(&c.key).cloned().unwrap_or_default();
            let left = slot.granted.saturating_sub(slot.used);
            fits &= c.reserved <= left;
            low |= left.saturating_sub(c.reserved) < policy.low_water(i).max(1);
        }
        let free =
            state.refill_since_ms == 0 || now_ms.saturating_sub(state.refill_since_ms) > stale_ms;
        let elected = low && free;
        if elected {
            state.refill_since_ms = now_ms;
        }
        if !fits {
            return Take::Short { elected };
        }
        state.last_take_ms = now_ms;
        let mut seen = Vec::with_capacity(counters.len());
        for c in counters {
            let slot = state.slot_mut(&c.key);
            slot.used = slot.used.saturating_add(c.reserved);
            seen.push(slot.seen);
        }
        Take::Taken { elected, seen }
    });
    // A host that fails is asked through the store, as in exact mode.
    taken.unwrap_or(Take::Short { elected: false })
}

/// Gives back what a take reserved (the request was refused elsewhere or
/// abandoned).
pub fn give_back(store: &mut dyn SharedData, bucket: &str, counters: &[Counter]) {
    let deltas: Vec<(&str, i64)> = counters
        .iter()
        .map(|c| {
            (
                c.key.as_str(),
                -i64::try_from(c.reserved).unwrap_or(i64::MAX),
            )
        })
        .collect();
    if update(store, bucket, |state| adjust(state, &deltas)).is_none() {
        log::warn!("quota lease: {bucket}: a reservation was not given back");
    }
}

fn adjust(state: &mut State, deltas: &[(&str, i64)]) {
    for (key, d) in deltas {
        if let Some(slot) = state.slots.iter_mut().find(|s| s.key == *key) {
            slot.used = if *d >= 0 {
                slot.used.saturating_add(d.unsigned_abs())
            } else {
                slot.used.saturating_sub(d.unsigned_abs())
            };
        }
    }
}

/// The store granted: per counter, `granted[i]` more leased of which
/// `used[i]` reserved by the request that asked; `seen[i]` is the counter
/// after. Ends this worker's election when it held one.
pub fn apply_grant(
    store: &mut dyn SharedData,
    bucket: &str,
    counters: &[Counter],
    granted: &[u64],
    used: &[u64],
    seen: &[u64],
    elected: bool,
) {
    let applied = update(store, bucket, |state| {
        for (i, c) in counters.iter().enumerate() {
            let slot = state.slot_mut(&c.key);
            slot.granted = slot
                .granted
                .saturating_add(granted.get(i).copied().unwrap_or(0));
            slot.used = slot.used.saturating_add(used.get(i).copied().unwrap_or(0));
            slot.seen = seen.get(i).copied().unwrap_or(slot.seen);
        }
        if elected {
            state.refill_since_ms = 0;
        }
    });
    if applied.is_none() {
        log::warn!(
            "quota lease: {bucket}: a grant was not recorded (stranded until its window ends)"
        );
    }
}

/// Ends this worker's election without a grant.
pub fn end_election(store: &mut dyn SharedData, bucket: &str) {
    if update(store, bucket, |state| state.refill_since_ms = 0).is_none() {
        log::warn!("quota lease: {bucket}: the refill election was not cleared (it goes stale)");
    }
}

/// Settles a request locally: `deltas[i]` (actual − reserved in counter
/// i, counters in the order of the rule's limits) adjust what the lease
/// used. Returns what must reach the store now: per counter, the usage past
/// the lease once it passes the batch bound (that much then counts as
/// leased).
pub fn settle(
    store: &mut dyn SharedData,
    bucket: &str,
    policy: &LeasePolicy,
    counters: &[Counter],
    deltas: &[i64],
) -> Vec<(String, i64)> {
    let pairs: Vec<(&str, i64)> = counters
        .iter()
        .zip(deltas)
        .map(|(c, d)| (c.key.as_str(), *d))
        .collect();
    let flushed = update(store, bucket, |state| {
        adjust(state, &pairs);
        let mut out = Vec::new();
        for (i, c) in counters.iter().enumerate() {
            let Some(slot) = state.slots.iter_mut().find(|s| s.key == c.key) else {
                continue;
            };
            let over = slot.used.saturating_sub(slot.granted);
            if over > policy.batch(i) {
                slot.granted = slot.used;
                out.push((slot.key.clone(), i64::try_from(over).unwrap_or(i64::MAX)));
            }
        }
        out
    });
    flushed.unwrap_or_else(|| {
        log::warn!("quota lease: {bucket}: a settle was not recorded");
        Vec::new()
    })
}

/// Takes back what the lease of `bucket` holds unused when no take came for
/// `idle_ms` (0: whatever its age); the negative deltas to send.
pub fn reclaim(
    store: &mut dyn SharedData,
    bucket: &str,
    now_ms: u64,
    idle_ms: u64,
) -> Vec<(String, i64)> {
    let back = update(store, bucket, |state| {
        if now_ms.saturating_sub(state.last_take_ms) < idle_ms {
            return Vec::new();
        }
        let mut out = Vec::new();
        for slot in &mut state.slots {
            let unused = slot.granted.saturating_sub(slot.used);
            if unused > 0 {
                slot.granted = slot.used;
                out.push((slot.key.clone(), -i64::try_from(unused).unwrap_or(i64::MAX)));
            }
        }
        out
    });
    back.unwrap_or_default()
}

/// Whether the lease of `bucket` still holds anything unused.
pub fn holds_unused(store: &dyn SharedData, bucket: &str) -> bool {
    store
        .shared_get(&state_key(bucket))
        .and_then(|(bytes, _)| serde_json::from_slice::<State>(&bytes).ok())
        .is_some_and(|s| s.slots.iter().any(|slot| slot.granted > slot.used))
}

thread_local! {
    /// Buckets whose leases this worker took from, for [`return_idle`].
    static HELD: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

/// Notes that this worker holds a lease of `bucket`.
pub fn remember(bucket: &str) {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if !h.contains(bucket) {
            h.insert(bucket.to_string());
        }
    });
}

/// Sends back the unused part of every lease this worker knows that idled
/// for [`IDLE_MS`]; true while some lease still holds unused units.
pub fn return_idle(host: &mut dyn Host, store_config: &StoreConfig) -> bool {
    let now = host.now_unix_millis();
    let buckets: Vec<String> = HELD.with(|h| h.borrow().iter().cloned().collect());
    let mut holding = false;
    for bucket in buckets {
        let back = reclaim(host, &bucket, now, IDLE_MS);
        send_return(host, store_config, &back);
        if holds_unused(host, &bucket) {
            holding = true;
        } else {
            HELD.with(|h| h.borrow_mut().remove(&bucket));
        }
    }
    holding
}

/// Sends returned units (negative) to the store, detached.
pub fn send_return(host: &mut dyn Host, store_config: &StoreConfig, back: &[(String, i64)]) {
    if back.is_empty() {
        return;
    }
    for (key, d) in back {
        if let Some(meter) = meter_of_key(key) {
            count_units(host, meter, "returned", d.unsigned_abs());
        }
    }
    let deltas: Vec<(&str, i64)> = back.iter().map(|(k, d)| (k.as_str(), *d)).collect();
    crate::quota::admission::settle_shared(host, store_config, &deltas, false, "return");
}

fn meter_of_key(key: &str) -> Option<&'static str> {
    let (_, rest) = key.rsplit_once('#')?;
    let (meter, _) = rest.split_once(':')?;
    ["requests", "tokens", "micro_usd"]
        .into_iter()
        .find(|m| *m == meter)
}

/// Counts units leased or returned, by meter.
pub fn count_units(host: &mut dyn Host, meter: &str, outcome: &str, units: u64) {
    let name = crate::metrics::labelled(
        crate::metrics::QUOTA_LEASE_UNITS_TOTAL,
        &[("kind", meter), ("outcome", outcome)],
    );
    host.count(&name, units);
}

/// Asks the store for the next lease of `bucket` in a call owned by the
/// root context (this worker won the election): up to each limit's size,
/// nothing reserved for a request.
pub fn refill(
    host: &mut dyn Host,
    store_config: &StoreConfig,
    bucket: &str,
    policy: &LeasePolicy,
    counters: &[Counter],
    whole_script: bool,
) {
    let asked: Vec<Counter> = counters
        .iter()
        .map(|c| Counter {
            reserved: 0,
            ..c.clone()
        })
        .collect();
    let leases: Vec<(u64, u64)> = policy
        .sizes
        .iter()
        .map(|s| (*s, policy.divisor()))
        .collect();
    let command = store::lease_command(&asked, &leases, whole_script);
    let owned_bucket = bucket.to_string();
    let owned_policy = policy.clone();
    let owned_store = store_config.clone();
    let then: crate::host::DetachedHandler = Box::new(move |host, answer| {
        let n = asked.len();
        match store::parse_reply(&answer, 2 * n) {
            Reply::Done {
                admitted: true,
                used,
            } => {
                count_call(host, "lease", "ok");
                let seen: Vec<u64> = used[..n]
                    .iter()
                    .map(|u| u64::try_from(*u).unwrap_or(0))
                    .collect();
                let granted: Vec<u64> = used[n..]
                    .iter()
                    .map(|g| u64::try_from(*g).unwrap_or(0))
                    .collect();
                for (c, g) in asked.iter().zip(&granted) {
                    count_units(host, store::meter_name(c.limit.meter), "granted", *g);
                }
                apply_grant(host, &owned_bucket, &asked, &granted, &[], &seen, true);
                remember(&owned_bucket);
            }
            Reply::NoScript if !whole_script => {
                refill(
                    host,
                    &owned_store,
                    &owned_bucket,
                    &owned_policy,
                    &asked,
                    true,
                );
            }
            other => {
                count_call(host, "lease", "failed");
                log::warn!("quota lease: {owned_bucket}: refill failed: {other:?}");
                end_election(host, &owned_bucket);
            }
        }
    });
    if let Err(e) = host.call_out_detached(&store::callout(store_config, &command), then) {
        count_call(host, "lease", "failed");
        log::warn!("quota lease: {bucket}: refill not sent: {e}");
        end_election(host, bucket);
    }
}

fn count_call(host: &mut dyn Host, kind: &str, outcome: &str) {
    let name = crate::metrics::labelled(
        crate::metrics::QUOTA_STORE_CALLS_TOTAL,
        &[("kind", kind), ("outcome", outcome)],
    );
    host.count(&name, 1);
}
