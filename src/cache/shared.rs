//! Answers shared by every proxy through the quota store's Redis, reached
//! over HTTP through webdis (`quotas.store`). A proxy that misses locally
//! asks the store before the provider; a kept answer is written to both.
//!
//! webdis takes a command in the request path (a POST body can hang it,
//! see `quota/store.rs`) and refuses paths past about 80 KB, so a large
//! answer is written in pieces: to a key of its own with `SET` and
//! `APPEND`, then published under its real key with `RENAME`, so no
//! reader ever sees half of it. The value is the local store's entry,
//! whose header carries the body's length; anything else read back is a
//! miss. Redis expires it with the cache's TTL.

use crate::cache::entry::Entry;
use crate::core::sha256::hex;
use crate::host::{CalloutAnswer, Host};
use crate::quota::store::{callout, count_call, encode_arg_bytes, StoreConfig};

/// Raw bytes per write call: at most three times that once
/// percent-encoded, well inside webdis's limit on a path.
pub const PIECE_BYTES: usize = 8 * 1024;

/// The Redis key of a cache key.
pub fn redis_key(key: &[u8; 32]) -> String {
    format!("meshllm/cache/{}", hex(key))
}

/// The command that reads an entry raw (`.txt`: the value itself, 404
/// when there is none).
pub fn lookup_command(key: &[u8; 32]) -> String {
    let mut out = String::from("/GET/");
    encode_arg_bytes(&mut out, redis_key(key).as_bytes());
    out.push_str(".txt");
    out
}

/// The live entry in a lookup's answer, if it is one for `key`.
pub fn read(answer: &CalloutAnswer, key: &[u8; 32], now_ms: u64) -> Option<Entry> {
    let entry = Entry::decode(answer.ok_body()?)?;
    (entry.key == *key && entry.expires_ms > now_ms).then_some(entry)
}

/// The commands that write `entry` for `ttl_s` seconds, in order: one
/// `SET` when it fits a call, else `SET`, `APPEND`s and a `RENAME` of a
/// key named by `writer` (unique to this write).
pub fn write_commands(entry: &Entry, ttl_s: u64, writer: &str) -> Vec<String> {
    let value = entry.encode();
    let key = redis_key(&entry.key);
    let pieces: Vec<&[u8]> = value.chunks(PIECE_BYTES).collect();
    let whole = pieces.len() <= 1;
    let target = if whole {
        key.clone()
    } else {
        format!("{key}/part/{writer}")
    };
    let mut out = Vec::with_capacity(pieces.len() + 1);
    for (i, piece) in pieces.iter().enumerate() {
        let mut c = String::from(if i == 0 { "/SET/" } else { "/APPEND/" });
        encode_arg_bytes(&mut c, target.as_bytes());
        c.push('/');
        encode_arg_bytes(&mut c, piece);
        if i == 0 {
            c.push_str(&format!("/EX/{ttl_s}"));
        }
        out.push(c);
    }
    if !whole {
        let mut c = String::from("/RENAME/");
        encode_arg_bytes(&mut c, target.as_bytes());
        c.push('/');
        encode_arg_bytes(&mut c, key.as_bytes());
        out.push(c);
    }
    out
}

/// Sends `commands` one after the other, each once the one before
/// succeeded, on behalf of the proxy (the request may be over).
pub fn write(host: &mut dyn Host, store: &StoreConfig, mut commands: Vec<String>) {
    if commands.is_empty() {
        count_call(host, "cache_write", "ok");
        return;
    }
    let first = commands.remove(0);
    let config = store.clone();
    let then: crate::host::DetachedHandler = Box::new(move |host, answer| {
        if answer.ok_body().is_some() {
            write(host, &config, commands);
        } else {
            count_call(host, "cache_write", "failed");
            log::warn!("cache: an answer was not shared: the store said {answer:?}");
        }
    });
    if let Err(e) = host.call_out_detached(&callout(store, &first), then) {
        count_call(host, "cache_write", "failed");
        log::warn!("cache: an answer was not shared: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &[u8]) -> Entry {
        Entry {
            key: [0xab; 32],
            expires_ms: 10_000,
            content_type: "text/event-stream".into(),
            provider: "p".into(),
            model: "m".into(),
            body: body.to_vec(),
        }
    }

    use crate::core::url::percent_decode as decode;

    #[test]
    fn a_small_answer_is_one_set_with_the_ttl() {
        let e = entry(b"data: x/y?.txt\n\n");
        let c = write_commands(&e, 60, "w");
        assert_eq!(c.len(), 1);
        let parts: Vec<&str> = c[0].split('/').collect();
        assert_eq!(parts[1], "SET");
        assert_eq!(decode(parts[2]), redis_key(&e.key).as_bytes());
        assert_eq!(decode(parts[3]), e.encode());
        assert_eq!(&parts[4..], ["EX", "60"]);
        assert!(
            !c[0].contains('.'),
            "webdis reads a dot as an output format"
        );
        assert!(lookup_command(&e.key).ends_with(&format!("{}.txt", hex(&e.key))));
        assert!(lookup_command(&e.key).starts_with("/GET/meshllm%2Fcache%2F"));
    }

    #[test]
    fn a_large_answer_is_written_in_pieces_then_renamed() {
        let e = entry(&vec![b'%'; 3 * PIECE_BYTES]);
        let c = write_commands(&e, 60, "w1");
        assert!(c.len() >= 4, "{}", c.len());
        assert!(c[0].starts_with("/SET/") && c[0].ends_with("/EX/60"));
        assert!(c[1..c.len() - 1].iter().all(|x| x.starts_with("/APPEND/")));
        assert!(
            c.iter().all(|x| x.len() < 3 * PIECE_BYTES + 200),
            "fits webdis"
        );
        let last: Vec<&str> = c[c.len() - 1].split('/').collect();
        assert_eq!(last[1], "RENAME");
        assert_eq!(decode(last[3]), redis_key(&e.key).as_bytes());
        let mut value = Vec::new();
        for x in &c[..c.len() - 1] {
            let parts: Vec<&str> = x.split('/').collect();
            assert_eq!(
                decode(parts[2]),
                format!("{}/part/w1", redis_key(&e.key)).as_bytes()
            );
            value.extend(decode(parts[3]));
        }
        assert_eq!(Entry::decode(&value), Some(e));
    }

    #[test]
    fn only_a_live_entry_for_the_key_is_read() {
        let e = entry(b"{}");
        let ok = CalloutAnswer::Http {
            status: 200,
            headers: vec![],
            body: e.encode(),
        };
        assert_eq!(read(&ok, &e.key, 0), Some(e.clone()));
        assert_eq!(read(&ok, &e.key, 10_000), None, "expired");
        assert_eq!(read(&ok, &[1; 32], 0), None, "another key");
        let missing = CalloutAnswer::Http {
            status: 404,
            headers: vec![],
            body: vec![],
        };
        assert_eq!(read(&missing, &e.key, 0), None);
        assert_eq!(read(&CalloutAnswer::Failed("t".into()), &e.key, 0), None);
    }
}
