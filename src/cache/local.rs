//! Answers kept in the proxy's shared memory, seen by every worker.
//! Shared data never expires and cannot be listed, so the store is a
//! fixed table of `max_entries` slots: a key lives in the slot its hash
//! names, and a newer answer for another key in the same slot replaces
//! it. Memory stays bounded by `max_entries × max_entry_bytes` without
//! any bookkeeping shared between workers; expiry is checked on read.
//!
//! Each slot has a small tag (the key and expiry) beside the entry, so a
//! miss reads a few bytes, not another request's answer. The entry holds
//! its key too: a reader that meets a tag and an entry of two different
//! writes takes it for a miss.

use crate::cache::entry::Entry;
use crate::host::SharedData;

/// The shared-data name of a key's slot.
pub fn slot(key: &[u8; 32], max_entries: u64) -> String {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    format!(
        "meshllm.cache.{}",
        u64::from_be_bytes(first) % max_entries.max(1)
    )
}

/// A slot's tag: its key, then when it expires (big-endian ms).
fn tag(key: &[u8; 32], expires_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(key);
    out.extend_from_slice(&expires_ms.to_be_bytes());
    out
}

/// The live answer kept for `key`, if any.
pub fn get(store: &dyn SharedData, key: &[u8; 32], max_entries: u64, now_ms: u64) -> Option<Entry> {
    let name = slot(key, max_entries);
    let (found, _) = store.shared_get(&format!("{name}.tag"))?;
    let expires = u64::from_be_bytes(found.get(32..40)?.try_into().ok()?);
    if found.get(..32)? != key.as_slice() || expires <= now_ms {
        return None;
    }
    let (bytes, _) = store.shared_get(&name)?;
    let entry = Entry::decode(&bytes)?;
    (entry.key == *key && entry.expires_ms > now_ms).then_some(entry)
}

/// Keeps an answer (the last writer of a slot wins).
pub fn put(store: &mut dyn SharedData, entry: &Entry, max_entries: u64) {
    let name = slot(&entry.key, max_entries);
    let written = store
        .shared_set(&name, &entry.encode(), None)
        .and_then(|_| {
            store.shared_set(
                &format!("{name}.tag"),
                &tag(&entry.key, entry.expires_ms),
                None,
            )
        });
    if let Err(e) = written {
        log::warn!("could not keep an answer in the cache: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::MockShared;

    fn entry(key: [u8; 32], expires_ms: u64) -> Entry {
        Entry {
            key,
            expires_ms,
            content_type: "application/json".into(),
            provider: "p".into(),
            model: "m".into(),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn kept_until_it_expires() {
        let mut host = MockShared::default();
        put(&mut host, &entry([1; 32], 1_000), 16);
        assert_eq!(get(&host, &[1; 32], 16, 999), Some(entry([1; 32], 1_000)));
        assert_eq!(get(&host, &[1; 32], 16, 1_000), None);
        assert_eq!(get(&host, &[2; 32], 16, 0), None);
    }

    #[test]
    fn a_slot_holds_one_key_and_the_table_stays_bounded() {
        let mut host = MockShared::default();
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[7] = 1;
        b[7] = 3; // 1 and 3 share slot 1 of 2
        b[31] = 9;
        assert_eq!(slot(&a, 2), slot(&b, 2));
        put(&mut host, &entry(a, 10), 2);
        put(&mut host, &entry(b, 10), 2);
        assert_eq!(get(&host, &a, 2, 0), None);
        assert!(get(&host, &b, 2, 0).is_some());
        for i in 0..=255u8 {
            let mut k = [i; 32];
            k[0] = i;
            put(&mut host, &entry(k, 10), 4);
        }
        let slots: std::collections::HashSet<String> =
            (0..=255u8).map(|i| slot(&[i; 32], 4)).collect();
        assert!(slots.len() <= 4);
    }

    #[test]
    fn a_miss_reads_only_the_tag_and_mixed_writes_are_misses() {
        let mut host = MockShared::default();
        let mut a = [0u8; 32];
        a[7] = 1;
        let mut b = a;
        b[7] = 3; // same slot of 2
        put(&mut host, &entry(a, 10), 2);
        // Another writer's entry under a's tag: a miss, not a's answer.
        let name = slot(&a, 2);
        host.write(&name, &entry(b, 10).encode());
        assert_eq!(get(&host, &a, 2, 0), None);
        assert_eq!(get(&host, &b, 2, 0), None, "b's tag is not there yet");
        host.write(&format!("{name}.tag"), &tag(&b, 10));
        assert!(get(&host, &b, 2, 0).is_some());
    }
}
