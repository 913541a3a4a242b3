//! Proxy-wide shared data for the native build: one map in the process,
//! seen by every worker thread, with the same compare-and-swap contract as
//! proxy-wasm's shared data (see `host::SharedData`) but no host call.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::host::{HostResult, SharedData};

/// Values and their CAS tokens. A token changes on every write.
type Entries = HashMap<String, (Vec<u8>, u32)>;
static SHARED: Mutex<Option<Entries>> = Mutex::new(None);

fn map() -> MutexGuard<'static, Option<Entries>> {
    // A panic while the lock was held (caught at an entry point) leaves
    // the map as it was: each update replaces one value whole.
    SHARED.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn get(key: &str) -> Option<(Vec<u8>, u32)> {
    map().as_ref()?.get(key).cloned()
}

pub fn set(key: &str, value: &[u8], cas: Option<u32>) -> HostResult<bool> {
    let mut guard = map();
    let entries = guard.get_or_insert_with(HashMap::new);
    let current = entries.get(key).map(|(_, token)| *token);
    if let Some(expected) = cas {
        // proxy-wasm semantics: a token of 0 or an absent key accept any write.
        if expected != 0 && current.is_some_and(|token| token != expected) {
            return Ok(false);
        }
    }
    let next = current.unwrap_or(0).wrapping_add(1).max(1);
    entries.insert(key.to_string(), (value.to_vec(), next));
    Ok(true)
}

/// The process's shared data as a `SharedData`.
pub struct Store;

impl SharedData for Store {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<bool> {
        set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_swap_refuses_a_stale_token() {
        let key = "native-shared-test-cas";
        assert!(set(key, b"a", None).unwrap());
        let (value, token) = get(key).unwrap();
        assert_eq!(value, b"a");
        assert!(set(key, b"b", Some(token)).unwrap());
        assert!(!set(key, b"c", Some(token)).unwrap(), "stale token");
        assert_eq!(get(key).unwrap().0, b"b");
    }
}
