//! Quota buckets shared by every Envoy worker thread, without overshoot.
//!
//! A bucket (a consumer, a team, a route's budget, ...) counts requests,
//! tokens and spend in micro-USD over fixed UTC windows (minute, day,
//! month). Admission *reserves* an estimate with compare-and-swap, so two
//! workers can never both take the last unit; when the response ends the
//! reservation is *settled* against the real usage (or released). Only the
//! difference between estimate and actual usage can push a bucket past its
//! limit, never the race between workers.
//!
//! Shared data never expires, so each bucket is exactly one key, chosen by
//! the caller (who must keep the set of keys bounded: one per configured
//! consumer or budget, never one per request or per free-form header value).
//! The windows reuse their slot in that key: a slot whose window has passed
//! counts as zero and is reset in place by the next write.
//!
//! Value layout, version 1, integers little-endian:
//!
//! | offset     | size | field                                   |
//! |------------|------|-----------------------------------------|
//! | 0          | 1    | version (1)                             |
//! | 1 + 18 i   | 1    | slot i: meter (1 requests, 2 tokens, 3 micro-USD) |
//! | 2 + 18 i   | 1    | slot i: window (1 minute, 2 day, 3 month) |
//! | 3 + 18 i   | 8    | slot i: window id (u64, see [`window_id`]) |
//! | 11 + 18 i  | 8    | slot i: used in that window (u64)       |
//!
//! Slots are found by (meter, window), at most one each, so a configuration
//! change that adds or removes limits, or changes a `max`, keeps the counts
//! of the others. Slots nobody limits any more stay (there are at most nine)
//! and simply stop moving. Any other version or a malformed value reads as
//! an empty bucket.
//!
//! Envoy cannot compare-and-swap a key that does not exist yet, so the very
//! first write of a bucket can race another first write and lose its count.
//! [`ensure`] creates buckets known at configuration time so request-time
//! writes are always protected.

use crate::host::SharedData;

/// Fixed windows aligned to UTC: a window starts at the top of the minute,
/// at midnight, or at midnight on the first of the month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Day,
    Month,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    Requests,
    Tokens,
    /// Spend in millionths of a US dollar.
    MicroUsd,
}

/// At most `max` of `meter` per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub meter: Meter,
    pub window: Window,
    pub max: u64,
}

/// What one request consumes (an estimate at admission, the truth at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Amounts {
    pub requests: u64,
    pub tokens: u64,
    pub micro_usd: u64,
}

impl Amounts {
    pub fn of(&self, meter: Meter) -> u64 {
        match meter {
            Meter::Requests => self.requests,
            Meter::Tokens => self.tokens,
            Meter::MicroUsd => self.micro_usd,
        }
    }
}

/// How one limit of a bucket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: Limit,
    /// Used in the current window.
    pub used: u64,
    /// Unix ms at which the current window ends and `used` drops to 0.
    pub resets_at_ms: u64,
}

impl Standing {
    pub fn remaining(&self) -> u64 {
        self.limit.max.saturating_sub(self.used)
    }
}

/// One limit around a write: `used_before` is the usage this writer's CAS
/// replaced, so only the writer that moved usage across an alert threshold
/// sees the crossing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update {
    pub used_before: u64,
    pub standing: Standing,
}

impl Update {
    /// The highest of `thresholds_pct` this write crossed upward, if any.
    pub fn crossed(&self, thresholds_pct: &[u32]) -> Option<u32> {
        crossed(
            thresholds_pct,
            self.used_before,
            self.standing.used,
            self.standing.limit.max,
        )
    }
}

/// An admitted reservation: what to settle when the request ends, and one
/// [`Update`] per limit (usage before and after the reservation) for
/// rate-limit headers and alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a reservation must be settled or released"]
pub struct Admission {
    pub held: Held,
    pub updates: Vec<Update>,
}

/// A reservation held in one bucket, kept by the request until it ends and
/// then passed to [`settle`]; dropping it leaves the estimate counted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a reservation must be settled or released"]
pub struct Held {
    pub key: String,
    limits: Vec<Limit>,
    reserved: Amounts,
    /// Fixes the window each limit was reserved in.
    reserved_at_ms: u64,
}

/// Why a reservation was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Admitting would pass `standing.limit`; `standing` is that limit's
    /// state now. When several limits would be passed, this is the one that
    /// resets last, so retrying at `resets_at_ms` is not refused by another.
    Exceeded { standing: Standing },
    /// The reservation alone is larger than the limit: it can never be admitted.
    TooLarge { limit: Limit, requested: u64 },
    /// The compare-and-swap kept losing or the host failed: fail closed.
    Busy,
}

/// Read-modify-write attempts before giving up. Contention is between a few
/// worker threads, so losing this many times in a row means something is
/// wrong rather than busy.
const MAX_CAS_ATTEMPTS: u32 = 64;

/// Bumped whenever the layout changes; other versions read as empty.
const VERSION: u8 = 1;

const SLOT_LEN: usize = 18;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

/// Which window `now_ms` falls in: minutes or days since the epoch, or
/// months since January 1970 (so 1970-01 is 0 and 1971-01 is 12).
pub fn window_id(window: Window, now_ms: u64) -> u64 {
    match window {
        Window::Minute => now_ms / MINUTE_MS,
        Window::Day => now_ms / DAY_MS,
        Window::Month => {
            let (year, month, _) = civil_from_days(now_ms / DAY_MS);
            year.saturating_sub(1970)
                .saturating_mul(12)
                .saturating_add(month.saturating_sub(1))
        }
    }
}

/// Unix ms at which the window holding `now_ms` ends.
pub fn window_end_ms(window: Window, now_ms: u64) -> u64 {
    match window {
        Window::Minute => (now_ms / MINUTE_MS + 1).saturating_mul(MINUTE_MS),
        Window::Day => (now_ms / DAY_MS + 1).saturating_mul(DAY_MS),
        Window::Month => {
            let (year, month, _) = civil_from_days(now_ms / DAY_MS);
            let (year, month) = if month == 12 {
                (year.saturating_add(1), 1)
            } else {
                (year, month + 1)
            };
            days_from_civil(year, month, 1).saturating_mul(DAY_MS)
        }
    }
}

/// Reserves `amounts` in bucket `key` against every limit in `limits`, all
/// or nothing, in one compare-and-swap write.
///
/// Only meters the request consumes are checked: a limit passes when its
/// amount is 0 (even if the window is already spent), or when `used +
/// amount <= max`.
pub fn reserve(
    store: &mut dyn SharedData,
    key: &str,
    limits: &[Limit],
    amounts: &Amounts,
    now_ms: u64,
) -> Result<Admission, Refusal> {
    if let Some((limit, requested)) = limits
        .iter()
        .map(|limit| (*limit, amounts.of(limit.meter)))
        .find(|&(limit, requested)| requested > limit.max)
    {
        return Err(Refusal::TooLarge { limit, requested });
    }
    for _ in 0..MAX_CAS_ATTEMPTS {
        let read = Read::of(store, key);
        if let Some(standing) = most_lasting_excess(&read.slots, limits, amounts, now_ms) {
            return Err(Refusal::Exceeded { standing });
        }
        let mut slots = read.slots.clone();
        for_each_slot(limits, |meter, window| {
            // Slots are written even for a zero amount, so settle finds them
            // in the reserved window when the actual usage is not zero.
            add_current(&mut slots, meter, window, now_ms, amounts.of(meter));
        });
        match read.write(store, key, &slots) {
            Ok(true) => {
                let held = Held {
                    key: key.to_string(),
                    limits: limits.to_vec(),
                    reserved: *amounts,
                    reserved_at_ms: now_ms,
                };
                let updates = updates(&read.slots, &slots, limits, now_ms);
                return Ok(Admission { held, updates });
            }
            Ok(false) => continue,
            Err(err) => {
                log::warn!("quota: {key}: not reserved: {err}");
                return Err(Refusal::Busy);
            }
        }
    }
    log::warn!("quota: {key}: not reserved: {MAX_CAS_ATTEMPTS} CAS conflicts");
    Err(Refusal::Busy)
}

/// Reserves in several buckets, in order, each its own amounts. If one
/// refuses, the reservations already made are released, so nothing leaks,
/// and the index of the refusing bucket comes back with its refusal.
pub fn reserve_all(
    store: &mut dyn SharedData,
    buckets: &[(&str, &[Limit], &Amounts)],
    now_ms: u64,
) -> Result<Vec<Admission>, (usize, Refusal)> {
    let mut admitted: Vec<Admission> = Vec::with_capacity(buckets.len());
    for (index, &(key, limits, amounts)) in buckets.iter().enumerate() {
        match reserve(store, key, limits, amounts, now_ms) {
            Ok(admission) => admitted.push(admission),
            Err(refusal) => {
                for admission in &admitted {
                    settle(store, &admission.held, &Amounts::default(), now_ms);
                }
                return Err((index, refusal));
            }
        }
    }
    Ok(admitted)
}

/// The request ended: replaces the reservation with `actual`, which may be
/// larger (usage may then pass a limit: the estimate was low), smaller, or
/// zero to release it. Only slots still in the window they were reserved in
/// are adjusted: a closed window was reset already and its difference is
/// dropped. Usage never goes below 0.
///
/// Returns one [`Update`] per limit of the reservation. When the write keeps
/// losing or the host fails, it logs a warning and reports the bucket as it
/// stands, unchanged (so no alert threshold is crossed).
pub fn settle(
    store: &mut dyn SharedData,
    held: &Held,
    actual: &Amounts,
    now_ms: u64,
) -> Vec<Update> {
    let key = held.key.as_str();
    let mut last_read = Vec::new();
    for _ in 0..MAX_CAS_ATTEMPTS {
        let read = Read::of(store, key);
        let mut slots = read.slots.clone();
        for_each_slot(&held.limits, |meter, window| {
            let reserved_in = window_id(window, held.reserved_at_ms);
            let slot = slots
                .iter_mut()
                .find(|slot| slot.meter == meter && slot.window == window);
            if let Some(slot) = slot.filter(|slot| slot.window_id == reserved_in) {
                let (reserved, actual) = (held.reserved.of(meter), actual.of(meter));
                slot.used = if actual >= reserved {
                    slot.used.saturating_add(actual - reserved)
                } else {
                    slot.used.saturating_sub(reserved - actual)
                };
            }
        });
        match read.write(store, key, &slots) {
            Ok(true) => return updates(&read.slots, &slots, &held.limits, now_ms),
            Ok(false) => last_read = read.slots,
            Err(err) => {
                log::warn!("quota: {key}: not settled: {err}");
                return updates(&read.slots, &read.slots, &held.limits, now_ms);
            }
        }
    }
    log::warn!("quota: {key}: not settled: {MAX_CAS_ATTEMPTS} CAS conflicts");
    updates(&last_read, &last_read, &held.limits, now_ms)
}

/// How each limit of bucket `key` stands at `now_ms`, without writing
/// (e.g. a budget threshold deciding the route before admission).
pub fn standings(
    store: &dyn SharedData,
    key: &str,
    limits: &[Limit],
    now_ms: u64,
) -> Vec<Standing> {
    let slots = Read::of(store, key).slots;
    limits
        .iter()
        .map(|limit| standing(&slots, *limit, now_ms))
        .collect()
}

/// Creates bucket `key`, empty, unless a value is there already (even one
/// that does not decode: it is repaired by the next CAS write). Called at
/// configuration time for the buckets known in advance, so request-time
/// writes are always compare-and-swap protected.
pub fn ensure(store: &mut dyn SharedData, key: &str) {
    if store.shared_get(key).is_some() {
        return;
    }
    if let Err(err) = store.shared_set(key, &encode(&[]), None) {
        log::warn!("quota: {key}: not created: {err}");
    }
}

/// The highest of `thresholds_pct` crossed upward when usage moved from
/// `before` to `after` against `max`, if any. A threshold already reached
/// before is not crossed again, which is what makes "alert once per window"
/// work: only the writer whose CAS moved usage across the line sees it.
/// (A settle that lowers usage below the line lets a later write cross it
/// again.)
pub fn crossed(thresholds_pct: &[u32], before: u64, after: u64, max: u64) -> Option<u32> {
    let (before, after) = (percent(before, max), percent(after, max));
    thresholds_pct
        .iter()
        .copied()
        .filter(|&threshold| before < threshold && threshold <= after)
        .max()
}

/// Usage in whole percent of `max`, rounded down; past 100 when over the
/// limit. A zero limit is 100 % used as soon as anything is used.
pub fn percent(used: u64, max: u64) -> u32 {
    if max == 0 {
        return if used > 0 { 100 } else { 0 };
    }
    let pct = u128::from(used) * 100 / u128::from(max);
    u32::try_from(pct).unwrap_or(u32::MAX)
}

/// A duration the way OpenAI's `x-ratelimit-reset-*` headers write it (Go's
/// duration format at millisecond precision): "20ms", "1.5s", "6m0s",
/// "1h2m3s", "0s".
pub fn openai_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (hours, minutes, seconds) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&seconds.to_string());
    if millis > 0 {
        let fraction = format!("{millis:03}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// One counter of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    meter: Meter,
    window: Window,
    window_id: u64,
    used: u64,
}

/// A bucket as read, with what a compare-and-swap write back needs.
struct Read {
    slots: Vec<Slot>,
    /// Raw value, to skip writes that change nothing.
    bytes: Option<Vec<u8>>,
    cas: Option<u32>,
}

impl Read {
    fn of(store: &dyn SharedData, key: &str) -> Self {
        match store.shared_get(key) {
            Some((bytes, cas)) => Read {
                slots: decode(&bytes).unwrap_or_else(|| {
                    log::debug!("quota: {key}: unreadable value, counted as empty");
                    Vec::new()
                }),
                bytes: Some(bytes),
                cas: Some(cas),
            },
            None => Read {
                slots: Vec::new(),
                bytes: None,
                cas: None,
            },
        }
    }

    /// Writes `slots` if anything changed; `Ok(false)` when another writer
    /// got in since the read. Without a token (absent key) Envoy writes
    /// unconditionally: the first-write race the module doc describes.
    fn write(&self, store: &mut dyn SharedData, key: &str, slots: &[Slot]) -> Result<bool, String> {
        let value = encode(slots);
        if self.bytes.as_deref() == Some(value.as_slice()) {
            return Ok(true);
        }
        store
            .shared_set(key, &value, self.cas)
            .map_err(|err| err.to_string())
    }
}

/// Calls `f` once per distinct (meter, window) among `limits`: two limits on
/// the same slot (say, two maxima for requests per minute) share one count.
fn for_each_slot(limits: &[Limit], mut f: impl FnMut(Meter, Window)) {
    for (index, limit) in limits.iter().enumerate() {
        let seen = limits
            .iter()
            .take(index)
            .any(|earlier| earlier.meter == limit.meter && earlier.window == limit.window);
        if !seen {
            f(limit.meter, limit.window);
        }
    }
}

/// Usage of (meter, window) in the window holding `now_ms`; 0 for a slot
/// that is absent or still holds an older window.
fn used(slots: &[Slot], meter: Meter, window: Window, now_ms: u64) -> u64 {
    let current = window_id(window, now_ms);
    slots
        .iter()
        .find(|slot| slot.meter == meter && slot.window == window && slot.window_id == current)
        .map_or(0, |slot| slot.used)
}

/// Adds `amount` to (meter, window) in the window holding `now_ms`: the
/// slot is created if absent and reset in place if it holds an older window.
fn add_current(slots: &mut Vec<Slot>, meter: Meter, window: Window, now_ms: u64, amount: u64) {
    let fresh = Slot {
        meter,
        window,
        window_id: window_id(window, now_ms),
        used: 0,
    };
    match slots
        .iter_mut()
        .find(|slot| slot.meter == meter && slot.window == window)
    {
        Some(slot) => {
            if slot.window_id != fresh.window_id {
                *slot = fresh;
            }
            slot.used = slot.used.saturating_add(amount);
        }
        None => slots.push(Slot {
            used: amount,
            ..fresh
        }),
    }
}

fn standing(slots: &[Slot], limit: Limit, now_ms: u64) -> Standing {
    Standing {
        limit,
        used: used(slots, limit.meter, limit.window, now_ms),
        resets_at_ms: window_end_ms(limit.window, now_ms),
    }
}

/// Of the limits `amounts` would pass, the one whose window ends last.
fn most_lasting_excess(
    slots: &[Slot],
    limits: &[Limit],
    amounts: &Amounts,
    now_ms: u64,
) -> Option<Standing> {
    limits
        .iter()
        .map(|limit| standing(slots, *limit, now_ms))
        .filter(|standing| {
            let amount = amounts.of(standing.limit.meter);
            amount > 0 && standing.used.saturating_add(amount) > standing.limit.max
        })
        .fold(None, |latest: Option<Standing>, standing| match latest {
            Some(latest) if latest.resets_at_ms >= standing.resets_at_ms => Some(latest),
            _ => Some(standing),
        })
}

fn updates(before: &[Slot], after: &[Slot], limits: &[Limit], now_ms: u64) -> Vec<Update> {
    limits
        .iter()
        .map(|limit| Update {
            used_before: used(before, limit.meter, limit.window, now_ms),
            standing: standing(after, *limit, now_ms),
        })
        .collect()
}

fn encode(slots: &[Slot]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + slots.len() * SLOT_LEN);
    out.push(VERSION);
    for slot in slots {
        out.push(meter_code(slot.meter));
        out.push(window_code(slot.window));
        out.extend_from_slice(&slot.window_id.to_le_bytes());
        out.extend_from_slice(&slot.used.to_le_bytes());
    }
    out
}

/// `None` for anything but a well-formed version-1 value.
fn decode(bytes: &[u8]) -> Option<Vec<Slot>> {
    let (&version, records) = bytes.split_first()?;
    if version != VERSION || records.len() % SLOT_LEN != 0 {
        return None;
    }
    let mut slots: Vec<Slot> = Vec::with_capacity(records.len() / SLOT_LEN);
    for record in records.chunks_exact(SLOT_LEN) {
        let (&[meter, window], numbers) = record.split_first_chunk::<2>()?;
        let (window_id, rest) = numbers.split_first_chunk::<8>()?;
        let (used, _) = rest.split_first_chunk::<8>()?;
        let slot = Slot {
            meter: meter_from_code(meter)?,
            window: window_from_code(window)?,
            window_id: u64::from_le_bytes(*window_id),
            used: u64::from_le_bytes(*used),
        };
        if slots
            .iter()
            .any(|other| other.meter == slot.meter && other.window == slot.window)
        {
            return None;
        }
        slots.push(slot);
    }
    Some(slots)
}

// Codes start at 1 so zeroed memory never decodes as a slot.
fn meter_code(meter: Meter) -> u8 {
    match meter {
        Meter::Requests => 1,
        Meter::Tokens => 2,
        Meter::MicroUsd => 3,
    }
}

fn meter_from_code(code: u8) -> Option<Meter> {
    [Meter::Requests, Meter::Tokens, Meter::MicroUsd]
        .into_iter()
        .find(|&meter| meter_code(meter) == code)
}

fn window_code(window: Window) -> u8 {
    match window {
        Window::Minute => 1,
        Window::Day => 2,
        Window::Month => 3,
    }
}

fn window_from_code(code: u8) -> Option<Window> {
    [Window::Minute, Window::Day, Window::Month]
        .into_iter()
        .find(|&window| window_code(window) == code)
}

/// (year, month 1..=12, day 1..=31) of a day counted from 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`, shifted
/// so the year starts in March and the leap day comes last).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Days from 0000-03-01 to 1970-01-01.
    let z = days.saturating_add(719_468);
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_based_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_based_month + 2) / 5 + 1;
    let month = if march_based_month < 10 {
        march_based_month + 3
    } else {
        march_based_month - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to a date on or after it (the inverse of
/// `civil_from_days`).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = year.saturating_sub(u64::from(month <= 2));
    let era = year / 400;
    let year_of_era = year % 400;
    let march_based_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * march_based_month + 2) / 5 + day.saturating_sub(1);
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era.saturating_mul(146_097)
        .saturating_add(day_of_era)
        .saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::{MockShared, Rival};
    use std::cell::Cell;
    use std::rc::Rc;

    /// A second worker on the same store: before each of our CAS writes,
    /// while it has turns left, it runs a whole `reserve` of `amounts` in
    /// bucket `K`, so our write loses and must re-read. The cell counts the
    /// reservations it got.
    fn rival_reserving(limits: &[Limit], amounts: Amounts, turns: u32) -> (Rival, Rc<Cell<u64>>) {
        let admitted = Rc::new(Cell::new(0));
        let counted = Rc::clone(&admitted);
        let limits = limits.to_vec();
        let act = move |store: &mut MockShared, _: &str| {
            if reserve(store, K, &limits, &amounts, NOW).is_ok() {
                counted.set(counted.get() + 1);
            }
        };
        let rival = Rival {
            turns,
            act: Box::new(act),
        };
        (rival, admitted)
    }

    const K: &str = "meshllm/quota/team-a";
    const SEC: u64 = 1000;
    const MIN: u64 = 60 * SEC;
    const DAY: u64 = 86_400 * SEC;
    /// 2024-02-29 12:00:00 UTC, the middle of a minute's first millisecond.
    const NOW: u64 = 1_709_208_000_000;

    fn limit(meter: Meter, window: Window, max: u64) -> Limit {
        Limit { meter, window, max }
    }

    fn requests(n: u64) -> Amounts {
        Amounts {
            requests: n,
            ..Amounts::default()
        }
    }

    fn tokens(n: u64) -> Amounts {
        Amounts {
            requests: 1,
            tokens: n,
            micro_usd: 0,
        }
    }

    fn used(store: &MockShared, key: &str, limits: &[Limit], now_ms: u64) -> Vec<u64> {
        standings(store, key, limits, now_ms)
            .iter()
            .map(|standing| standing.used)
            .collect()
    }

    fn admit(store: &mut MockShared, limits: &[Limit], amounts: Amounts, now_ms: u64) -> Held {
        match reserve(store, K, limits, &amounts, now_ms) {
            Ok(admission) => admission.held,
            Err(refusal) => panic!("refused {amounts:?}: {refusal:?}"),
        }
    }

    /// Reserves and keeps the reservation for the rest of the test.
    fn fill(store: &mut MockShared, limits: &[Limit], amounts: Amounts, now_ms: u64) {
        let _kept = admit(store, limits, amounts, now_ms);
    }

    #[test]
    fn window_ids_and_ends() {
        let s = |unix_secs: u64| unix_secs * SEC;
        // (window, now, id, end)
        let cases = [
            (Window::Minute, 0, 0, MIN),
            (Window::Day, 0, 0, DAY),
            (Window::Month, 0, 0, 31 * DAY),
            (Window::Minute, MIN - 1, 0, MIN),
            (Window::Minute, MIN, 1, 2 * MIN),
            (Window::Day, DAY - 1, 0, DAY),
            (Window::Day, DAY, 1, 2 * DAY),
            (Window::Minute, NOW, NOW / MIN, NOW + MIN),
            (Window::Day, NOW, 19_782, s(1_709_251_200)),
            // Leap day 2024: February has 29 days.
            (Window::Month, NOW, 649, s(1_709_251_200)),
            (Window::Month, s(1_709_251_200) - 1, 649, s(1_709_251_200)),
            (Window::Month, s(1_709_251_200), 650, s(1_711_929_600)),
            (Window::Month, s(1_706_745_600), 649, s(1_709_251_200)),
            // December to January.
            (Window::Month, s(1_704_067_199), 647, s(1_704_067_200)),
            (Window::Month, s(1_704_067_200), 648, s(1_706_745_600)),
            // 2023 is not a leap year, 2000 is (divisible by 400), 2100 is not.
            (Window::Month, s(1_677_542_400), 637, s(1_677_628_800)),
            (Window::Month, s(951_782_400), 361, s(951_868_800)),
            (Window::Month, s(4_107_499_200), 1561, s(4_107_542_400)),
            (Window::Month, s(4_107_542_400), 1562, s(4_110_220_800)),
            // April has 30 days.
            (Window::Month, s(1_714_521_599), 651, s(1_714_521_600)),
            (Window::Month, s(1_714_521_600), 652, s(1_717_200_000)),
            (Window::Month, s(2_678_400), 1, s(5_097_600)),
        ];
        for (window, now, id, end) in cases {
            assert_eq!(window_id(window, now), id, "{window:?} id at {now}");
            assert_eq!(window_end_ms(window, now), end, "{window:?} end at {now}");
        }
        // The far future saturates instead of overflowing.
        for window in [Window::Minute, Window::Day, Window::Month] {
            assert!(window_end_ms(window, u64::MAX) >= window_id(window, u64::MAX));
        }
    }

    #[test]
    fn month_windows_follow_the_calendar_day_by_day() {
        // Every day from 1970 through 2400: the calendar round-trips, each
        // month ends on the first of the next, and ids advance one at a time.
        let last_day = days_from_civil(2401, 1, 1);
        let mut previous_id = 0;
        for day in 0..last_day {
            let (year, month, day_of_month) = civil_from_days(day);
            assert_eq!(days_from_civil(year, month, day_of_month), day);
            let now = day * DAY + DAY / 2;
            let id = window_id(Window::Month, now);
            assert_eq!(id, (year - 1970) * 12 + month - 1, "{year}-{month}");
            assert!(id == previous_id || id == previous_id + 1, "{year}-{month}");
            previous_id = id;
            let end = window_end_ms(Window::Month, now);
            assert_eq!(civil_from_days(end / DAY).2, 1, "{year}-{month}");
            assert_eq!(window_id(Window::Month, end), id + 1, "{year}-{month}");
            assert_eq!(window_id(Window::Month, end - 1), id, "{year}-{month}");
        }
        // (year, month, days in it)
        let lengths = [
            (2024, 1, 31),
            (2024, 2, 29),
            (2023, 2, 28),
            (2000, 2, 29),
            (2100, 2, 28),
            (2024, 4, 30),
            (2024, 6, 30),
            (2024, 9, 30),
            (2024, 11, 30),
            (2024, 12, 31),
        ];
        for (year, month, days) in lengths {
            let start = days_from_civil(year, month, 1) * DAY;
            assert_eq!(
                window_end_ms(Window::Month, start) - start,
                days * DAY,
                "{year}-{month}"
            );
        }
    }

    #[test]
    fn formats_openai_durations() {
        let cases = [
            (0, "0s"),
            (1, "1ms"),
            (20, "20ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (7660, "7.66s"),
            (1001, "1.001s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (90_250, "1m30.25s"),
            (3_600_000, "1h0m0s"),
            (3_723_000, "1h2m3s"),
            (30 * DAY, "720h0m0s"),
        ];
        for (ms, expected) in cases {
            assert_eq!(openai_duration(ms), expected, "{ms}");
        }
    }

    #[test]
    fn reserve_admits_up_to_the_max_exactly() {
        let limits = [
            limit(Meter::Requests, Window::Minute, 3),
            limit(Meter::Tokens, Window::Day, 100),
        ];
        let mut store = MockShared::default();
        // (tokens, admitted, requests used after, tokens used after)
        let steps = [
            (60, true, 1, 60),
            (41, false, 1, 60),
            (40, true, 2, 100),
            (1, false, 2, 100),
            (0, true, 3, 100),
            (0, false, 3, 100),
        ];
        for (index, (amount, admitted, requests_used, tokens_used)) in steps.into_iter().enumerate()
        {
            let result = reserve(&mut store, K, &limits, &tokens(amount), NOW);
            assert_eq!(result.is_ok(), admitted, "step {index}: {result:?}");
            if let Ok(admission) = &result {
                let after: Vec<u64> = admission.updates.iter().map(|u| u.standing.used).collect();
                assert_eq!(after, [requests_used, tokens_used], "step {index}");
            }
            assert_eq!(
                used(&store, K, &limits, NOW),
                [requests_used, tokens_used],
                "step {index}"
            );
        }
        let refusal = reserve(&mut store, K, &limits, &tokens(0), NOW);
        let expected = Standing {
            limit: limits[0],
            used: 3,
            resets_at_ms: NOW + MIN,
        };
        assert_eq!(refusal, Err(Refusal::Exceeded { standing: expected }));
        assert_eq!(expected.remaining(), 0);
    }

    #[test]
    fn a_reservation_larger_than_the_limit_is_too_large() {
        let limits = [
            limit(Meter::Requests, Window::Minute, 10),
            limit(Meter::Tokens, Window::Minute, 100),
        ];
        let mut store = MockShared::default();
        assert_eq!(
            reserve(&mut store, K, &limits, &tokens(101), NOW),
            Err(Refusal::TooLarge {
                limit: limits[1],
                requested: 101
            })
        );
        // Refused before touching the store.
        assert_eq!(store.set_calls, 0);
        assert!(store.values.is_empty());
        // A zero limit refuses anything it meters, and nothing else.
        let zero = [limit(Meter::MicroUsd, Window::Month, 0)];
        let paid = Amounts {
            micro_usd: 1,
            ..requests(1)
        };
        assert!(matches!(
            reserve(&mut store, K, &zero, &paid, NOW),
            Err(Refusal::TooLarge { requested: 1, .. })
        ));
        assert!(reserve(&mut store, K, &zero, &requests(1), NOW).is_ok());
    }

    #[test]
    fn a_spent_meter_does_not_refuse_requests_that_do_not_use_it() {
        let budget = limit(Meter::MicroUsd, Window::Month, 1_000);
        let limits = [budget, limit(Meter::Requests, Window::Minute, 5)];
        let mut store = MockShared::default();
        let held = admit(&mut store, &limits, requests(1), NOW);
        let spent = Amounts {
            micro_usd: 1_500,
            ..requests(1)
        };
        let _ = settle(&mut store, &held, &spent, NOW);
        assert_eq!(used(&store, K, &limits, NOW), [1_500, 1]);
        assert!(reserve(&mut store, K, &limits, &requests(1), NOW).is_ok());
        let estimate = Amounts {
            micro_usd: 1,
            ..requests(1)
        };
        let refusal = reserve(&mut store, K, &limits, &estimate, NOW);
        assert!(
            matches!(refusal, Err(Refusal::Exceeded { standing }) if standing.limit == budget && standing.remaining() == 0),
            "{refusal:?}"
        );
    }

    #[test]
    fn several_limits_are_all_or_nothing() {
        let limits = [
            limit(Meter::Requests, Window::Minute, 10),
            limit(Meter::Tokens, Window::Minute, 1_000),
            limit(Meter::Tokens, Window::Day, 100),
        ];
        let mut store = MockShared::default();
        fill(&mut store, &limits, tokens(90), NOW);
        let before = store.value(K);

        // Only the daily token limit refuses; nothing at all is counted.
        let refusal = reserve(&mut store, K, &limits, &tokens(20), NOW);
        assert_eq!(
            refusal,
            Err(Refusal::Exceeded {
                standing: Standing {
                    limit: limits[2],
                    used: 90,
                    resets_at_ms: window_end_ms(Window::Day, NOW),
                }
            })
        );
        assert_eq!(store.value(K), before);
        assert_eq!(used(&store, K, &limits, NOW), [1, 90, 90]);

        // When several refuse, the one resetting last is reported.
        let tight = [
            limit(Meter::Tokens, Window::Minute, 95),
            limit(Meter::Tokens, Window::Day, 95),
            limit(Meter::Tokens, Window::Month, 95),
        ];
        let refusal = reserve(&mut store, K, &tight, &tokens(10), NOW);
        assert!(
            matches!(refusal, Err(Refusal::Exceeded { standing }) if standing.limit == tight[1] && standing.used == 90),
            "{refusal:?}"
        );
    }

    #[test]
    fn limits_on_the_same_slot_share_one_count() {
        let limits = [
            limit(Meter::Requests, Window::Minute, 5),
            limit(Meter::Requests, Window::Minute, 2),
        ];
        let mut store = MockShared::default();
        let held = admit(&mut store, &limits, requests(1), NOW);
        fill(&mut store, &limits, requests(1), NOW);
        assert_eq!(used(&store, K, &limits, NOW), [2, 2]);
        assert!(reserve(&mut store, K, &limits, &requests(1), NOW).is_err());
        let updates = settle(&mut store, &held, &requests(0), NOW);
        let after: Vec<u64> = updates.iter().map(|u| u.standing.used).collect();
        assert_eq!(after, [1, 1]);
    }

    #[test]
    fn reserve_all_releases_earlier_buckets_when_one_refuses() {
        let per_minute: &[Limit] = &[limit(Meter::Requests, Window::Minute, 10)];
        let daily_tokens: &[Limit] = &[limit(Meter::Tokens, Window::Day, 50)];
        let mut store = MockShared::default();
        // "team" has earlier traffic, "user" has never been seen, "org" is spent.
        assert!(reserve(&mut store, "team", per_minute, &tokens(0), NOW).is_ok());
        assert!(reserve(&mut store, "org", daily_tokens, &tokens(45), NOW).is_ok());
        let team_before = store.value("team");
        let org_before = store.value("org");

        let ten = tokens(10);
        let buckets = [
            ("team", per_minute, &ten),
            ("user", daily_tokens, &ten),
            ("org", daily_tokens, &ten),
        ];
        let result = reserve_all(&mut store, &buckets, NOW);
        assert!(
            matches!(&result, Err((2, Refusal::Exceeded { standing })) if standing.used == 45),
            "{result:?}"
        );
        assert_eq!(store.value("team"), team_before);
        assert_eq!(store.value("org"), org_before);
        assert_eq!(used(&store, "user", daily_tokens, NOW), [0]);
        assert_eq!(used(&store, "team", per_minute, NOW), [1]);

        // When all admit, each bucket holds its own reservation.
        let seven = tokens(7);
        let buckets = [("team", per_minute, &ten), ("user", daily_tokens, &seven)];
        let result = reserve_all(&mut store, &buckets, NOW);
        let admitted = result.unwrap_or_else(|err| panic!("{err:?}"));
        let keys: Vec<&str> = admitted.iter().map(|a| a.held.key.as_str()).collect();
        assert_eq!(keys, ["team", "user"]);
        let after: Vec<u64> = admitted
            .iter()
            .map(|a| a.updates[0].standing.used)
            .collect();
        assert_eq!(after, [2, 7]);
    }

    #[test]
    fn settle_replaces_the_estimate_with_the_actual_usage() {
        let limits = [
            limit(Meter::Requests, Window::Minute, 10),
            limit(Meter::Tokens, Window::Minute, 1_000),
        ];
        // (actual tokens, actual requests, tokens used after, requests used after):
        // another request holding 50 tokens is in flight throughout.
        let cases = [
            (150, 1, 200, 2),
            (40, 1, 90, 2),
            (100, 1, 150, 2),
            (0, 0, 50, 1),
            (5_000, 1, 5_050, 2),
        ];
        for (actual_tokens, actual_requests, tokens_after, requests_after) in cases {
            let mut store = MockShared::default();
            fill(&mut store, &limits, tokens(50), NOW);
            let held = admit(&mut store, &limits, tokens(100), NOW);
            let actual = Amounts {
                requests: actual_requests,
                tokens: actual_tokens,
                micro_usd: 0,
            };
            let updates = settle(&mut store, &held, &actual, NOW + SEC);
            let moved: Vec<(u64, u64)> = updates
                .iter()
                .map(|u| (u.used_before, u.standing.used))
                .collect();
            assert_eq!(
                moved,
                [(2, requests_after), (150, tokens_after)],
                "actual {actual_tokens}"
            );
            assert_eq!(
                used(&store, K, &limits, NOW),
                [requests_after, tokens_after]
            );
        }
    }

    #[test]
    fn settle_never_goes_below_zero() {
        let limits = [limit(Meter::Tokens, Window::Minute, 1_000)];
        let mut store = MockShared::default();
        let held = admit(&mut store, &limits, tokens(100), NOW);
        // A second release of the same reservation (as after a first write
        // that lost its count) would take the slot below 0.
        let _ = settle(&mut store, &held, &tokens(0), NOW);
        let updates = settle(&mut store, &held, &tokens(0), NOW);
        assert_eq!(updates[0].standing.used, 0);
    }

    #[test]
    fn settle_after_the_window_rolled_leaves_the_new_window_alone() {
        let limits = [
            limit(Meter::Tokens, Window::Minute, 1_000),
            limit(Meter::Tokens, Window::Day, 10_000),
        ];
        let mut store = MockShared::default();
        let held = admit(&mut store, &limits, tokens(100), NOW);
        // The next minute opens with its own traffic before the first ends.
        let later = NOW + MIN + SEC;
        fill(&mut store, &limits, tokens(30), later);
        let updates = settle(&mut store, &held, &tokens(400), later);
        // The minute slot keeps the new window's 30; the day takes the +300.
        assert_eq!(used(&store, K, &limits, later), [30, 430]);
        assert_eq!((updates[0].used_before, updates[0].standing.used), (30, 30));
        assert_eq!(
            (updates[1].used_before, updates[1].standing.used),
            (130, 430)
        );

        // Also when nobody wrote in the new window yet.
        let mut store = MockShared::default();
        let held = admit(&mut store, &limits, tokens(100), NOW);
        let updates = settle(&mut store, &held, &tokens(400), later);
        assert_eq!(updates[0].standing.used, 0);
        assert_eq!(used(&store, K, &limits, later), [0, 400]);
    }

    #[test]
    fn counts_reset_when_their_window_rolls() {
        let limits = [
            limit(Meter::Requests, Window::Minute, 2),
            limit(Meter::Requests, Window::Month, 5),
        ];
        let mut store = MockShared::default();
        let minute_start = NOW - NOW % MIN;
        fill(&mut store, &limits, requests(1), minute_start);
        fill(&mut store, &limits, requests(1), minute_start + MIN - 1);
        assert!(reserve(&mut store, K, &limits, &requests(1), minute_start + MIN - 1).is_err());
        // (now, used per limit)
        let cases = [
            (minute_start + MIN - 1, [2, 2]),
            (minute_start + MIN, [0, 2]),
            (minute_start + 10 * MIN, [0, 2]),
            (window_end_ms(Window::Month, NOW), [0, 0]),
        ];
        for (now, expected) in cases {
            assert_eq!(used(&store, K, &limits, now), expected, "at {now}");
        }
        let held = admit(&mut store, &limits, requests(1), minute_start + MIN);
        assert_eq!(used(&store, K, &limits, minute_start + MIN), [1, 3]);
        // The slot is reused in place: the value does not grow.
        assert_eq!(store.value(K).map(|v| v.len()), Some(1 + 2 * SLOT_LEN));
        assert_eq!(held.reserved_at_ms, minute_start + MIN);
    }

    #[test]
    fn a_lost_cas_race_is_retried_and_both_writes_count() {
        let limits = [limit(Meter::Tokens, Window::Day, 1_000)];
        let mut store = MockShared::default();
        ensure(&mut store, K);
        let (rival, admitted) = rival_reserving(&limits, tokens(30), 1);
        store.rival = Some(rival);
        store.set_calls = 0;
        let Admission { held, updates } = reserve(&mut store, K, &limits, &tokens(50), NOW)
            .unwrap_or_else(|refusal| panic!("{refusal:?}"));
        // Ours lost once to the rival's single write, then landed on top.
        assert_eq!(store.set_calls, 3);
        assert_eq!(admitted.get(), 1);
        assert_eq!((updates[0].used_before, updates[0].standing.used), (30, 80));
        assert_eq!(used(&store, K, &limits, NOW), [80]);

        // Settle re-reads on conflict too: the rival's next 30 survive.
        if let Some(rival) = store.rival.as_mut() {
            rival.turns = 1;
        }
        let updates = settle(&mut store, &held, &tokens(10), NOW);
        assert_eq!(
            (updates[0].used_before, updates[0].standing.used),
            (110, 70)
        );
        assert_eq!(used(&store, K, &limits, NOW), [70]);
    }

    #[test]
    fn busy_after_endless_conflicts_or_a_host_error() {
        let limits = [limit(Meter::Requests, Window::Minute, 10)];
        let mut store = MockShared::default();
        let held = admit(&mut store, &limits, requests(1), NOW);
        let before = store.value(K);

        store.rival = Some(Rival::always_conflicting());
        store.set_calls = 0;
        let refusal = reserve(&mut store, K, &limits, &requests(1), NOW);
        assert_eq!(refusal, Err(Refusal::Busy));
        assert_eq!(store.set_calls, MAX_CAS_ATTEMPTS);
        assert_eq!(store.value(K), before);
        // Settle gives up the same way and reports the bucket unchanged.
        store.set_calls = 0;
        let updates = settle(&mut store, &held, &requests(0), NOW);
        assert_eq!(store.set_calls, MAX_CAS_ATTEMPTS);
        assert_eq!((updates[0].used_before, updates[0].standing.used), (1, 1));
        assert_eq!(updates[0].crossed(&[1, 50, 100]), None);

        store.rival = None;
        store.refuse_sets = true;
        store.set_calls = 0;
        assert_eq!(
            reserve(&mut store, K, &limits, &requests(1), NOW),
            Err(Refusal::Busy)
        );
        let updates = settle(&mut store, &held, &requests(0), NOW);
        assert_eq!(store.set_calls, 2);
        assert_eq!(updates[0].standing.used, 1);
        // The first write of a new bucket fails closed as well.
        assert_eq!(
            reserve(&mut store, "new", &limits, &requests(1), NOW),
            Err(Refusal::Busy)
        );
    }

    #[test]
    fn interleaved_workers_never_admit_past_the_max() {
        // Before every write of ours, the rival worker runs a whole
        // reservation of its own, so each of our attempts sees a stale read.
        for max in [1, 2, 7, 10] {
            let limits = [
                limit(Meter::Requests, Window::Minute, max),
                limit(Meter::Tokens, Window::Minute, 1_000),
            ];
            let mut store = MockShared::default();
            ensure(&mut store, K);
            let (rival, admitted) = rival_reserving(&limits, tokens(1), 0);
            store.rival = Some(rival);
            let mut ours = 0;
            for _ in 0..3 * max + 3 {
                if let Some(rival) = store.rival.as_mut() {
                    rival.turns = 1;
                }
                match reserve(&mut store, K, &limits, &tokens(1), NOW) {
                    Ok(_) => ours += 1,
                    Err(Refusal::Exceeded { standing }) => assert_eq!(standing.used, max),
                    Err(other) => panic!("max {max}: {other:?}"),
                }
            }
            let theirs = admitted.get();
            assert_eq!(ours + theirs, max, "max {max}");
            assert_eq!(used(&store, K, &limits, NOW), [max, max], "max {max}");
            // They alternated: neither starved the other.
            assert!(ours.abs_diff(theirs) <= 1, "max {max}: {ours} vs {theirs}");
        }
    }

    #[test]
    fn ensure_creates_once_so_later_writes_are_protected() {
        let limits = [limit(Meter::Requests, Window::Day, 10)];
        let mut store = MockShared::default();
        ensure(&mut store, K);
        assert_eq!(store.value(K), Some(vec![VERSION]));
        fill(&mut store, &limits, requests(3), NOW);
        let after_reserve = store.value(K);
        ensure(&mut store, K);
        assert_eq!(store.value(K), after_reserve);
        // The first write is unprotected, every later one carries a token.
        assert_eq!(store.set_tokens.first(), Some(&None));
        assert!(store.set_tokens[1..].iter().all(Option::is_some));

        // An unreadable value is left for the next CAS write to repair.
        store.write("junk", b"junk");
        ensure(&mut store, "junk");
        assert_eq!(store.value("junk"), Some(b"junk".to_vec()));
    }

    #[test]
    fn writes_that_change_nothing_are_skipped() {
        let limits = [limit(Meter::Tokens, Window::Minute, 100)];
        let mut store = MockShared::default();
        let held = admit(&mut store, &limits, tokens(10), NOW);
        store.set_calls = 0;
        let updates = settle(&mut store, &held, &tokens(10), NOW);
        assert_eq!(store.set_calls, 0);
        assert_eq!(updates[0].standing.used, 10);
    }

    #[test]
    fn thresholds_are_crossed_upward_only() {
        let thresholds = [50, 80, 100];
        // (before, after, max, crossed)
        let cases = [
            (0, 49, 100, None),
            (0, 50, 100, Some(50)),
            (49, 50, 100, Some(50)),
            (50, 60, 100, None),
            (50, 80, 100, Some(80)),
            (10, 95, 100, Some(80)),
            (0, 100, 100, Some(100)),
            (79, 250, 100, Some(100)),
            (100, 150, 100, None),
            (90, 40, 100, None),
            (0, 0, 100, None),
            (0, 1, 0, Some(100)),
            (1, 2, 0, None),
            (799, 800, 1_000, Some(80)),
            (0, u64::MAX, u64::MAX, Some(100)),
        ];
        for (before, after, max, expected) in cases {
            assert_eq!(
                crossed(&thresholds, before, after, max),
                expected,
                "{before} -> {after} of {max}"
            );
        }
        // Unsorted thresholds work too.
        assert_eq!(crossed(&[100, 50, 80], 0, 90, 100), Some(80));
        assert_eq!(crossed(&[], 0, 90, 100), None);
    }

    #[test]
    fn percent_of_max() {
        let cases = [
            (0, 100, 0),
            (1, 3, 33),
            (2, 3, 66),
            (100, 100, 100),
            (250, 100, 250),
            (0, 0, 0),
            (5, 0, 100),
            (u64::MAX, 1, u32::MAX),
            (u64::MAX, u64::MAX, 100),
        ];
        for (used, max, expected) in cases {
            assert_eq!(percent(used, max), expected, "{used} of {max}");
        }
    }

    #[test]
    fn alerts_fire_once_for_the_writer_that_crosses() {
        let limits = [limit(Meter::Tokens, Window::Day, 100)];
        let thresholds = [50, 80, 100];
        let mut store = MockShared::default();
        let mut fired = Vec::new();
        let mut held = Vec::new();
        for _ in 0..6 {
            let Admission { held: one, updates } =
                reserve(&mut store, K, &limits, &tokens(15), NOW)
                    .unwrap_or_else(|refusal| panic!("{refusal:?}"));
            fired.push(updates[0].crossed(&thresholds));
            held.push(one);
        }
        // 15, 30, 45, 60, 75, 90
        assert_eq!(fired, [None, None, None, Some(50), None, Some(80)]);
        // A long answer settles above the limit: 100 % crossed once.
        let updates = settle(&mut store, &held[0], &tokens(40), NOW);
        assert_eq!(updates[0].crossed(&thresholds), Some(100));
        let updates = settle(&mut store, &held[1], &tokens(40), NOW);
        assert_eq!(updates[0].standing.used, 140);
        assert_eq!(updates[0].crossed(&thresholds), None);
    }

    #[test]
    fn configuration_changes_keep_the_other_counts() {
        let requests_per_minute = limit(Meter::Requests, Window::Minute, 10);
        let tokens_per_day = limit(Meter::Tokens, Window::Day, 1_000);
        let spend_per_month = limit(Meter::MicroUsd, Window::Month, 5_000);
        let mut store = MockShared::default();
        fill(
            &mut store,
            &[requests_per_minute, tokens_per_day],
            tokens(100),
            NOW,
        );

        // A limit is added and another removed.
        let spend = Amounts {
            micro_usd: 700,
            ..tokens(50)
        };
        fill(&mut store, &[tokens_per_day, spend_per_month], spend, NOW);
        let all = [requests_per_minute, tokens_per_day, spend_per_month];
        assert_eq!(used(&store, K, &all, NOW), [1, 150, 700]);

        // A new max keeps the count, and the removed limit comes back with its own.
        let tighter = Limit {
            max: 150,
            ..tokens_per_day
        };
        let refusal = reserve(
            &mut store,
            K,
            &[requests_per_minute, tighter],
            &tokens(1),
            NOW,
        );
        assert!(
            matches!(refusal, Err(Refusal::Exceeded { standing }) if standing.used == 150),
            "{refusal:?}"
        );
        fill(&mut store, &[requests_per_minute], tokens(1), NOW);
        assert_eq!(used(&store, K, &all, NOW), [2, 150, 700]);
    }

    #[test]
    fn unreadable_values_read_as_empty_and_are_rewritten() {
        let limits = [
            limit(Meter::Requests, Window::Minute, 10),
            limit(Meter::Tokens, Window::Day, 1_000),
        ];
        let mut good = MockShared::default();
        fill(&mut good, &limits, tokens(40), NOW);
        let valid = good.value(K).unwrap_or_default();
        assert_eq!(valid.len(), 1 + 2 * SLOT_LEN);
        assert_eq!(decode(&valid).map(|slots| slots.len()), Some(2));

        let with_byte = |at: usize, byte: u8| {
            let mut value = valid.clone();
            value[at] = byte;
            value
        };
        let duplicated = [valid.as_slice(), &valid[1..1 + SLOT_LEN]].concat();
        let cases = [
            ("empty", Vec::new()),
            ("truncated", valid[..valid.len() - 1].to_vec()),
            ("too long", [valid.as_slice(), &[0]].concat()),
            ("wrong version", with_byte(0, 2)),
            ("unknown meter", with_byte(1, 9)),
            ("zero window", with_byte(2, 0)),
            ("duplicate slot", duplicated),
        ];
        for (name, value) in cases {
            let mut store = MockShared::default();
            store.write(K, &value);
            assert_eq!(used(&store, K, &limits, NOW), [0, 0], "{name}");
            fill(&mut store, &limits, tokens(5), NOW);
            assert_eq!(used(&store, K, &limits, NOW), [1, 5], "{name}");
            let rewritten = store.value(K).map(|v| v.len());
            assert_eq!(rewritten, Some(1 + 2 * SLOT_LEN), "{name}");
        }
        // A value of only the version byte is a valid empty bucket.
        assert_eq!(decode(&[VERSION]), Some(Vec::new()));
    }
}
