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
//!   worker that wins the election sends a detached call for what tops the
//!   lease up to `size` (so no proxy holds more than `size` unused).
//! - A request the lease cannot cover asks the store itself (and waits, as
//!   in exact mode), for its amount plus the top-up when it wins the
//!   election. After the store refused one, requests that cannot fit the
//!   counts it refused at are refused here for [`FULL_HOLD_MS`].
//! - Settles adjust `used` here; usage past `granted` (estimates too low)
//!   reaches the store once it passes `size / 2` units (the batch bound B).
//! - An idle lease ([`IDLE_MS`] without a take) is squared with the store by
//!   the root context's timer: unused units back (a negative settle),
//!   unsent usage forward. A window that ended is dropped, not returned:
//!   its counter no longer limits anything and expires.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

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
/// How often a worker holding leases checks them for idling.
pub const IDLE_CHECK_MS: u64 = 1000;
/// After the store refused a lease's request, requests that would not fit
/// its count then are refused locally for this long, without a call (the
/// count only falls when a lease is returned).
pub const FULL_HOLD_MS: u64 = 1000;
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
    /// When the store last refused, with `seen` its count then; 0: never.
    #[serde(default)]
    refused_at_ms: u64,
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

/// What a take from the lease found. `refill`: this worker was elected to
/// ask for the next lease, this much per counter (what tops the lease up
/// to its size, so no proxy holds more than `size` unused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Reserved in the lease; `seen` per counter for headers.
    Taken {
        refill: Option<Vec<u64>>,
        seen: Vec<u64>,
    },
    /// The lease cannot cover it: ask the store (with a lease when elected).
    Short { refill: Option<Vec<u64>> },
    /// The store refused counter `index` at `seen` less than
    /// [`FULL_HOLD_MS`] ago and this would not fit either: refuse, no call.
    Full { index: usize, seen: u64 },
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
        let mut lefts = Vec::with_capacity(counters.len());
        for (i, c) in counters.iter().enumerate() {
            let slot = state.slot(&c.key).cloned().unwrap_or_default();
            let left = slot.granted.saturating_sub(slot.used);
            fits &= c.reserved <= left;
            low |= left.saturating_sub(c.reserved) < policy.low_water(i).max(1);
            lefts.push(left);
        }
        if !fits {
            let full = counters.iter().enumerate().find_map(|(i, c)| {
                let slot = state.slot(&c.key)?;
                let recent = slot.refused_at_ms > 0
                    && now_ms.saturating_sub(slot.refused_at_ms) < FULL_HOLD_MS;
                let over = c.reserved > 0
                    && slot.seen.saturating_add(c.reserved) > c.limit.max
                    && c.reserved > lefts.get(i).copied().unwrap_or(0);
                (recent && over).then_some(Take::Full {
                    index: i,
                    seen: slot.seen,
                })
            });
            if let Some(full) = full {
                return full;
            }
        }
        let free =
            state.refill_since_ms == 0 || now_ms.saturating_sub(state.refill_since_ms) > stale_ms;
        let refill = (low && free).then(|| {
            state.refill_since_ms = now_ms;
            counters
                .iter()
                .zip(&lefts)
                .enumerate()
                .map(|(i, (c, left))| {
                    let after = if fits { left - c.reserved } else { *left };
                    policy.sizes.get(i).map_or(0, |s| s.saturating_sub(after))
                })
                .collect::<Vec<u64>>()
        });
        if !fits {
            return Take::Short { refill };
        }
        state.last_take_ms = now_ms;
        let mut seen = Vec::with_capacity(counters.len());
        for c in counters {
            let slot = state.slot_mut(&c.key);
            slot.used = slot.used.saturating_add(c.reserved);
            seen.push(slot.seen);
        }
        Take::Taken { refill, seen }
    });
    // A host that fails is asked through the store, as in exact mode.
    taken.unwrap_or(Take::Short { refill: None })
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

/// The store refused a request of this lease: its counts (`seen`) are
/// kept, so requests that cannot fit them are refused locally for
/// [`FULL_HOLD_MS`].
pub fn note_refusal(
    store: &mut dyn SharedData,
    bucket: &str,
    counters: &[Counter],
    seen: &[u64],
    now_ms: u64,
) {
    let noted = update(store, bucket, |state| {
        for (c, s) in counters.iter().zip(seen) {
            let slot = state.slot_mut(&c.key);
            slot.seen = *s;
            slot.refused_at_ms = now_ms;
        }
    });
    if noted.is_none() {
        log::warn!("quota lease: {bucket}: a refusal was not noted");
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

/// Squares the lease of `bucket` with the store when no take came for
/// `idle_ms` (0: whatever its age): what it holds unused goes back
/// (negative deltas), usage past it not sent yet goes too (positive).
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
            let delta = store::delta(slot.granted, slot.used);
            if delta != 0 {
                slot.granted = slot.used;
                out.push((slot.key.clone(), delta));
            }
        }
        out
    });
    back.unwrap_or_default()
}

/// Whether the lease of `bucket` is not square with the store (unused
/// units, or usage not sent yet).
pub fn holds_unused(store: &dyn SharedData, bucket: &str) -> bool {
    store
        .shared_get(&state_key(bucket))
        .and_then(|(bytes, _)| serde_json::from_slice::<State>(&bytes).ok())
        .is_some_and(|s| s.slots.iter().any(|slot| slot.granted != slot.used))
}

/// Buckets whose leases were taken from, for [`return_idle`]. Per worker
/// in the Wasm build (each VM has its own statics); per process in the
/// native build, where the root's timer runs on the main thread.
static HELD: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn held() -> MutexGuard<'static, BTreeSet<String>> {
    HELD.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Notes that this worker holds a lease of `bucket`; the first time, arms
/// the root context's timer that returns it once idle.
pub fn remember(host: &mut dyn Host, bucket: &str) {
    let new = {
        let mut h = held();
        !h.contains(bucket) && h.insert(bucket.to_string())
    };
    if new {
        if let Err(e) = host.wake_root_in(IDLE_CHECK_MS) {
            log::warn!("quota lease: {bucket}: idle return not scheduled: {e}");
        }
    }
}

/// Sends back the unused part of every lease this worker knows that idled
/// for [`IDLE_MS`]; true while some lease still holds unused units.
pub fn return_idle(host: &mut dyn Host, store_config: &StoreConfig) -> bool {
    let now = host.now_unix_millis();
    let buckets: Vec<String> = held().iter().cloned().collect();
    let mut holding = false;
    for bucket in buckets {
        let back = reclaim(host, &bucket, now, IDLE_MS);
        send_return(host, store_config, &back);
        // Checked and dropped under the lock `remember` takes after every
        // grant: in the native build a worker may take from the lease while
        // the main thread runs this, and a grant between the check and the
        // removal would otherwise be left with no timer to return it.
        let mut held = held();
        if holds_unused(host, &bucket) {
            holding = true;
        } else {
            held.remove(&bucket);
        }
    }
    holding
}

/// Sends returned units (negative) to the store, detached.
pub fn send_return(host: &mut dyn Host, store_config: &StoreConfig, back: &[(String, i64)]) {
    if back.is_empty() {
        return;
    }
    for (key, d) in back.iter().filter(|(_, d)| *d < 0) {
        if let Some(meter) = meter_of_key(key) {
            count_units(host, meter, "returned", d.unsigned_abs());
        }
    }
    let deltas: Vec<(&str, i64)> = back.iter().map(|(k, d)| (k.as_str(), *d)).collect();
    store::settle(host, store_config, &deltas, false, "return");
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
/// root context (this worker won the election): `wanted` per counter,
/// nothing reserved for a request.
pub fn refill(
    host: &mut dyn Host,
    store_config: &StoreConfig,
    bucket: &str,
    policy: &LeasePolicy,
    counters: &[Counter],
    wanted: &[u64],
    whole_script: bool,
) {
    let asked: Vec<Counter> = counters
        .iter()
        .map(|c| Counter {
            reserved: 0,
            ..c.clone()
        })
        .collect();
    let leases: Vec<(u64, u64)> = wanted.iter().map(|w| (*w, policy.divisor())).collect();
    let command = store::lease_command(&asked, &leases, whole_script);
    let owned_bucket = bucket.to_string();
    let owned_policy = policy.clone();
    let owned_wanted = wanted.to_vec();
    let owned_store = store_config.clone();
    let then: crate::host::DetachedHandler = Box::new(move |host, answer| {
        let n = asked.len();
        match store::parse_reply(&answer, 2 * n) {
            Reply::Done {
                admitted: true,
                used,
            } => {
                count_call(host, "lease", "ok");
                let number = |u: &i64| u64::try_from(*u).unwrap_or(0);
                let seen: Vec<u64> = used.iter().take(n).map(number).collect();
                let granted: Vec<u64> = used.iter().skip(n).map(number).collect();
                for (c, g) in asked.iter().zip(&granted) {
                    count_units(host, store::meter_name(c.limit.meter), "granted", *g);
                }
                apply_grant(host, &owned_bucket, &asked, &granted, &[], &seen, true);
                remember(host, &owned_bucket);
            }
            Reply::NoScript if !whole_script => {
                refill(
                    host,
                    &owned_store,
                    &owned_bucket,
                    &owned_policy,
                    &asked,
                    &owned_wanted,
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

/// (granted, used) per slot and the election time, for tests.
#[cfg(test)]
pub(crate) fn view(store: &dyn SharedData, bucket: &str) -> (Vec<(u64, u64)>, u64) {
    let state = store
        .shared_get(&state_key(bucket))
        .and_then(|(bytes, _)| serde_json::from_slice::<State>(&bytes).ok())
        .unwrap_or_default();
    (
        state.slots.iter().map(|s| (s.granted, s.used)).collect(),
        state.refill_since_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::MockHost;
    use crate::quota::buckets::Window;
    use serde_json::json;

    const NOW: u64 = 1_772_323_230_000;

    fn limits() -> Vec<Limit> {
        vec![
            Limit {
                meter: Meter::Requests,
                window: Window::Day,
                max: 100,
            },
            Limit {
                meter: Meter::Tokens,
                window: Window::Day,
                max: 10_000,
            },
        ]
    }

    fn policy() -> LeasePolicy {
        LeasePolicy {
            proxies: 2,
            sizes: vec![10, 100],
        }
    }

    fn counters(tokens: u64, now: u64) -> Vec<Counter> {
        store::counters(
            "b",
            &limits(),
            |m| if m == Meter::Requests { 1 } else { tokens },
            now,
        )
    }

    /// A lease of 10 requests and 100 tokens, as the store would grant it.
    fn granted(host: &mut MockHost) {
        let c = counters(0, NOW);
        apply_grant(host, "b", &c, &[10, 100], &[0, 0], &[10, 100], false);
    }

    #[test]
    fn takes_from_the_lease_until_it_is_short() {
        let mut host = MockHost::default();
        ensure(&mut host, "b");
        assert_eq!(
            take(&mut host, "b", &policy(), &counters(10, NOW), NOW, 1000),
            Take::Short {
                refill: Some(vec![10, 100])
            },
            "an empty lease: ask, and this worker is elected for a whole lease"
        );
        end_election(&mut host, "b");
        granted(&mut host);
        for i in 0..5 {
            let t = take(&mut host, "b", &policy(), &counters(10, NOW), NOW, 1000);
            assert_eq!(
                t,
                Take::Taken {
                    refill: None,
                    seen: vec![10, 100]
                },
                "take {i}"
            );
        }
        // The sixth leaves 4 requests, below the low-water mark (5): elected
        // to top the lease up to its size.
        assert_eq!(
            take(&mut host, "b", &policy(), &counters(10, NOW), NOW, 1000),
            Take::Taken {
                refill: Some(vec![6, 60]),
                seen: vec![10, 100]
            }
        );
        assert_eq!(view(&host, "b"), (vec![(10, 6), (100, 60)], NOW));
        // Elected already: the next worker is not.
        assert!(matches!(
            take(
                &mut host,
                "b",
                &policy(),
                &counters(10, NOW),
                NOW + 500,
                1000
            ),
            Take::Taken { refill: None, .. }
        ));
        // Tokens run short first (70 of 100 used): all or nothing.
        assert_eq!(
            take(
                &mut host,
                "b",
                &policy(),
                &counters(40, NOW),
                NOW + 600,
                1000
            ),
            Take::Short { refill: None }
        );
        assert_eq!(view(&host, "b").0, vec![(10, 7), (100, 70)]);
        // A stale election (older than the timeout given) is taken over.
        assert_eq!(
            take(
                &mut host,
                "b",
                &policy(),
                &counters(40, NOW),
                NOW + 1001,
                1000
            ),
            Take::Short {
                refill: Some(vec![7, 70])
            }
        );
        assert_eq!(view(&host, "b").1, NOW + 1001);
        give_back(&mut host, "b", &counters(10, NOW));
        assert_eq!(view(&host, "b").0, vec![(10, 6), (100, 60)]);
    }

    #[test]
    fn a_new_window_drops_the_old_lease() {
        let mut host = MockHost::default();
        granted(&mut host);
        let tomorrow = NOW + 86_400_000;
        assert_eq!(
            take(
                &mut host,
                "b",
                &policy(),
                &counters(1, tomorrow),
                tomorrow,
                1000
            ),
            Take::Short {
                refill: Some(vec![10, 100])
            }
        );
        // Nothing of yesterday's lease is left to return.
        assert_eq!(view(&host, "b").0, Vec::<(u64, u64)>::new());
        assert!(reclaim(&mut host, "b", tomorrow + IDLE_MS, 0).is_empty());
    }

    #[test]
    fn usage_past_the_lease_reaches_the_store_in_batches() {
        let mut host = MockHost::default();
        granted(&mut host);
        let c = counters(50, NOW);
        assert!(matches!(
            take(&mut host, "b", &policy(), &c, NOW, 1000),
            Take::Taken { .. }
        ));
        // Used 90 of 100 tokens: 40 past the lease stays local (B = 50).
        assert!(settle(&mut host, "b", &policy(), &c, &[0, 40]).is_empty());
        assert!(settle(&mut host, "b", &policy(), &c, &[0, 50]).is_empty());
        assert_eq!(view(&host, "b").0, vec![(10, 1), (100, 140)]);
        // 60 past it: sent, and counted as leased from then on.
        let key = c[1].key.clone();
        assert_eq!(
            settle(&mut host, "b", &policy(), &c, &[0, 20]),
            vec![(key, 60)]
        );
        assert_eq!(view(&host, "b").0, vec![(10, 1), (160, 160)]);
        // A refund frees lease locally, nothing sent.
        assert!(settle(&mut host, "b", &policy(), &c, &[-1, -100]).is_empty());
        assert_eq!(view(&host, "b").0, vec![(10, 0), (160, 60)]);
    }

    #[test]
    fn an_idle_lease_goes_back() {
        let mut host = MockHost::default();
        granted(&mut host);
        let c = counters(30, NOW);
        assert!(matches!(
            take(&mut host, "b", &policy(), &c, NOW, 1000),
            Take::Taken { .. }
        ));
        assert!(reclaim(&mut host, "b", NOW + IDLE_MS - 1, IDLE_MS).is_empty());
        let back = reclaim(&mut host, "b", NOW + IDLE_MS, IDLE_MS);
        assert_eq!(back, vec![(c[0].key.clone(), -9), (c[1].key.clone(), -70)]);
        assert_eq!(view(&host, "b").0, vec![(1, 1), (30, 30)]);
        assert!(!holds_unused(&host, "b"));
        // Usage past the lease, under the batch bound, goes when idle too.
        assert!(settle(&mut host, "b", &policy(), &c, &[0, 20]).is_empty());
        assert!(holds_unused(&host, "b"));
        assert_eq!(
            reclaim(&mut host, "b", NOW + IDLE_MS, IDLE_MS),
            vec![(c[1].key.clone(), 20)]
        );
    }

    #[test]
    fn a_host_that_fails_sends_the_request_to_the_store() {
        let mut host = MockHost::default();
        granted(&mut host);
        host.shared.refuse_sets = true;
        assert_eq!(
            take(&mut host, "b", &policy(), &counters(1, NOW), NOW, 1000),
            Take::Short { refill: None }
        );
    }

    #[test]
    fn lease_config_is_checked_with_its_path() {
        let l = limits();
        let p = compile("r.lease", &json!({"proxies": 3, "tokens": 500}), &l).unwrap();
        // Requests: a tenth of a proxy's share, 100 / 30.
        assert_eq!(p.sizes, vec![3, 500]);
        assert_eq!((p.divisor(), p.low_water(1), p.batch(1)), (6, 250, 250));
        let p = compile("r.lease", &json!({"proxies": 1000}), &l).unwrap();
        assert_eq!(p.sizes, vec![1, 1], "at least one unit");
        for (doc, path) in [
            (json!({"tokens": 5}), "r.lease.proxies"),
            (json!({"proxies": 0}), "r.lease.proxies"),
            (json!({"proxies": 2, "requests": 0}), "r.lease.requests"),
            (json!({"proxies": 2, "usd": 1.5}), "r.lease.usd"),
            (json!({"proxies": 2, "size": 1}), "r.lease.size"),
            (json!(true), "r.lease"),
        ] {
            let e = compile("r.lease", &doc, &l).unwrap_err();
            assert_eq!(e.path, path, "{doc}");
        }
    }
}
