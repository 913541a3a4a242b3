//! Quota buckets shared by every proxy: counters in Redis, reached over
//! HTTP through webdis (a proxy-wasm filter can only call out over HTTP or
//! gRPC, not speak Redis's protocol).
//!
//! A shared rule's bucket is one Redis counter per limit and window, named
//! `<bucket key>#<meter>:<window>:<window id>` with the same UTC windows as
//! `buckets.rs`, and expiring [`KEY_MARGIN_S`] after its window ends, so
//! stale keys go by themselves. One Lua script (`store.lua`) reserves for
//! every counter a request draws from, all or nothing and atomically (no
//! two proxies can both take the last unit), and settles the difference
//! between reservation and real usage when the request ends (refunds
//! included; a counter whose window is gone is not revived).
//!
//! Exact mode: every request with a shared rule makes one round trip at
//! admission and one detached call to settle. When the store cannot answer
//! (down, slow, garbled), each rule says what happens: `open` admits on
//! local limits only, `closed` refuses with a 503.

use serde::Deserialize;
use serde_json::Value;

use crate::config::error::ConfigError;
use crate::host::{Callout, CalloutAnswer, CalloutKind, Host};
use crate::metrics;
use crate::quota::buckets::{window_end_ms, window_id, Limit, Meter, Window};

/// The script, run with EVALSHA (EVAL when Redis does not have it yet).
pub const SCRIPT: &str = include_str!("store.lua");
/// SHA-1 of [`SCRIPT`], as Redis names it (checked by a test).
pub const SCRIPT_SHA1: &str = "dac87d357645c8942ca2420ca3ead1e060830e39";
/// How long a counter outlives its window: settles of requests that began
/// before the window ended still find it, and proxies whose clocks run a
/// little behind still share it.
pub const KEY_MARGIN_S: u64 = 120;
/// `Retry-After` of a refusal because the store could not answer.
pub const UNAVAILABLE_RETRY_S: u64 = 5;

const DEFAULT_TIMEOUT_MS: u64 = 200;

/// What a shared rule does when the store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Admit on local limits only (counted and logged).
    Open,
    /// Refuse with a 503 in the caller's shape.
    Closed,
}

impl FailureMode {
    pub fn parse(at: &str, value: &Value) -> Result<Self, ConfigError> {
        match value.as_str() {
            Some("open") => Ok(FailureMode::Open),
            Some("closed") => Ok(FailureMode::Closed),
            _ => Err(ConfigError::new(at, "must be \"open\" or \"closed\"")),
        }
    }
}

/// `quotas.store`: where the shared counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The Envoy cluster of the webdis bridge.
    pub cluster: String,
    /// The `:authority` sent to it.
    pub authority: String,
    pub timeout_ms: u64,
    /// For shared rules that set no `on_store_failure`.
    pub on_failure: FailureMode,
    /// `lease.proxies`: shared rules that set no `lease` lease with the
    /// default sizes for this many proxies; None: they stay exact.
    pub lease_proxies: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    on_failure: Option<Value>,
    #[serde(default)]
    lease: Option<Value>,
}

/// Compiles `quotas.store`; None when it is absent.
pub fn compile_store(value: Option<&Value>) -> Result<Option<StoreConfig>, ConfigError> {
    let Some(value) = value else { return Ok(None) };
    let at = "quotas.store";
    let raw = RawStore::deserialize(value).map_err(|e| ConfigError::new(at, e.to_string()))?;
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 128
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    };
    if !name_ok(&raw.cluster) {
        return Err(ConfigError::new(
            format!("{at}.cluster"),
            "must be an Envoy cluster name (letters, digits, '-', '_', '.', ':')",
        ));
    }
    let authority = raw.authority.unwrap_or_else(|| raw.cluster.clone());
    if !name_ok(&authority) {
        return Err(ConfigError::new(
            format!("{at}.authority"),
            "must be a host name, optionally with a port",
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=10_000).contains(&timeout_ms) {
        return Err(ConfigError::new(
            format!("{at}.timeout_ms"),
            "must be a whole number of milliseconds from 1 to 10000",
        ));
    }
    let on_failure = match &raw.on_failure {
        None => FailureMode::Closed,
        Some(v) => FailureMode::parse(&format!("{at}.on_failure"), v)?,
    };
    let lease_proxies = match &raw.lease {
        None => None,
        Some(v) => {
            let obj = v.as_object().filter(|o| o.keys().all(|k| k == "proxies"));
            let obj = obj.ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.lease"),
                    "must be {\"proxies\": P} (sizes are set per rule)",
                )
            })?;
            let p = obj.get("proxies").and_then(Value::as_u64);
            Some(p.filter(|p| (1..=10_000).contains(p)).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.lease.proxies"),
                    "must be a whole number from 1 to 10000",
                )
            })?)
        }
    };
    Ok(Some(StoreConfig {
        cluster: raw.cluster,
        authority,
        timeout_ms,
        on_failure,
        lease_proxies,
    }))
}

/// One limit of one shared bucket in the window the request falls in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub key: String,
    pub limit: Limit,
    /// What the request reserved in it.
    pub reserved: u64,
    /// Unix ms at which the window ends.
    pub resets_at_ms: u64,
}

pub fn meter_name(meter: Meter) -> &'static str {
    match meter {
        Meter::Requests => "requests",
        Meter::Tokens => "tokens",
        Meter::MicroUsd => "micro_usd",
    }
}

fn window_name(window: Window) -> &'static str {
    match window {
        Window::Minute => "minute",
        Window::Day => "day",
        Window::Month => "month",
    }
}

/// The Redis key of `limit` of bucket `bucket` in the window of `now_ms`.
pub fn counter_key(bucket: &str, limit: &Limit, now_ms: u64) -> String {
    format!(
        "{bucket}#{}:{}:{}",
        meter_name(limit.meter),
        window_name(limit.window),
        window_id(limit.window, now_ms)
    )
}

/// The counters of bucket `bucket` for a request reserving `amount_of` each
/// meter at `now_ms`.
pub fn counters(
    bucket: &str,
    limits: &[Limit],
    amount_of: impl Fn(Meter) -> u64,
    now_ms: u64,
) -> Vec<Counter> {
    limits
        .iter()
        .map(|limit| Counter {
            key: counter_key(bucket, limit, now_ms),
            limit: *limit,
            reserved: amount_of(limit.meter),
            resets_at_ms: window_end_ms(limit.window, now_ms),
        })
        .collect()
}

/// Everything non-alphanumeric percent-encoded: webdis splits arguments on
/// `/` and reads a `.` as an output format.
pub(crate) fn encode_arg(out: &mut String, arg: &str) {
    encode_arg_bytes(out, arg.as_bytes());
}

/// [`encode_arg`] of any bytes.
pub(crate) fn encode_arg_bytes(out: &mut String, arg: &[u8]) {
    for &b in arg {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A webdis command (a request path): the script by its SHA-1, or whole.
fn command(whole_script: bool, keys: &[&str], args: &[String]) -> String {
    let mut out = String::from("/");
    if whole_script {
        out.push_str("EVAL/");
        encode_arg(&mut out, SCRIPT);
    } else {
        out.push_str("EVALSHA/");
        out.push_str(SCRIPT_SHA1);
    }
    out.push('/');
    out.push_str(&keys.len().to_string());
    for part in keys.iter().copied().chain(args.iter().map(String::as_str)) {
        out.push('/');
        encode_arg(&mut out, part);
    }
    out
}

/// The reservation of `counters`, all or nothing.
pub fn reserve_command(counters: &[Counter], whole_script: bool) -> String {
    let keys: Vec<&str> = counters.iter().map(|c| c.key.as_str()).collect();
    let mut args = Vec::with_capacity(1 + 3 * counters.len());
    args.push("reserve".to_string());
    for c in counters {
        args.push(c.limit.max.to_string());
        args.push(c.reserved.to_string());
        args.push((c.resets_at_ms / 1000 + KEY_MARGIN_S).to_string());
    }
    command(whole_script, &keys, &args)
}

/// A reservation of `counters` (all or nothing, as [`reserve_command`])
/// that also leases up to `leases[i].0` more of counter i, at most its
/// room divided by `leases[i].1` (see `lease.rs`). The reply has 2n
/// numbers: each counter after, then the extras granted.
pub fn lease_command(counters: &[Counter], leases: &[(u64, u64)], whole_script: bool) -> String {
    let keys: Vec<&str> = counters.iter().map(|c| c.key.as_str()).collect();
    let mut args = Vec::with_capacity(1 + 5 * counters.len());
    args.push("lease".to_string());
    for (i, c) in counters.iter().enumerate() {
        let (extra, divisor) = leases.get(i).copied().unwrap_or((0, 1));
        args.push(c.limit.max.to_string());
        args.push(c.reserved.to_string());
        args.push((c.resets_at_ms / 1000 + KEY_MARGIN_S).to_string());
        args.push(extra.to_string());
        args.push(divisor.max(1).to_string());
    }
    command(whole_script, &keys, &args)
}

/// The settlement of `deltas` (actual − reserved, per counter key).
pub fn settle_command(deltas: &[(&str, i64)], whole_script: bool) -> String {
    let keys: Vec<&str> = deltas.iter().map(|(k, _)| *k).collect();
    let mut args = Vec::with_capacity(1 + deltas.len());
    args.push("settle".to_string());
    args.extend(deltas.iter().map(|(_, d)| d.to_string()));
    command(whole_script, &keys, &args)
}

/// The HTTP call that carries `command` to the bridge: a GET with the
/// command as its path. (webdis 0.1.9 hangs on a POST whose body reaches it
/// in a TCP segment of its own, which no client controls.)
pub fn callout<'a>(store: &'a StoreConfig, command: &'a str) -> Callout<'a> {
    Callout {
        cluster: &store.cluster,
        kind: CalloutKind::Http {
            method: "GET",
            path: command,
            authority: &store.authority,
            headers: &[],
            body: &[],
        },
        timeout_ms: store.timeout_ms,
    }
}

/// What the store said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The script ran: admitted (or settled), with each counter's usage
    /// after it (settle: -1 for a counter that is gone).
    Done { admitted: bool, used: Vec<i64> },
    /// Redis does not have the script (it restarted): send it whole.
    NoScript,
    /// No usable answer; the text says why, for logs.
    Failed(String),
}

/// Reads the bridge's answer to a call over `n` counters.
pub fn parse_reply(answer: &CalloutAnswer, n: usize) -> Reply {
    let body = match answer {
        CalloutAnswer::Http { status, body, .. } if (200..300).contains(status) => body,
        CalloutAnswer::Http { status, .. } => return Reply::Failed(format!("HTTP {status}")),
        CalloutAnswer::Grpc { status, .. } => {
            return Reply::Failed(format!("a gRPC answer ({status}) from an HTTP bridge"))
        }
        CalloutAnswer::Failed(why) => return Reply::Failed(why.clone()),
    };
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Reply::Failed("the answer is not JSON".into());
    };
    let result = value
        .as_object()
        .and_then(|o| o.get("EVALSHA").or_else(|| o.get("EVAL")))
        .and_then(Value::as_array);
    let Some(result) = result else {
        return Reply::Failed("the answer has no script result".into());
    };
    // An error is `[false, "message"]`.
    if let Some(Value::Bool(false)) = result.first() {
        let message = result.get(1).and_then(Value::as_str).unwrap_or("");
        if message.starts_with("NOSCRIPT") {
            return Reply::NoScript;
        }
        return Reply::Failed(format!(
            "Redis: {}",
            message.chars().take(200).collect::<String>()
        ));
    }
    let numbers: Option<Vec<i64>> = result.iter().map(Value::as_i64).collect();
    match numbers.as_deref() {
        Some([flag @ (0 | 1), used @ ..]) if used.len() == n => Reply::Done {
            admitted: *flag == 1,
            used: used.to_vec(),
        },
        _ => Reply::Failed("the script's result has the wrong shape".into()),
    }
}

/// What each counter's usage settles by: actual − reserved.
pub fn delta(reserved: u64, actual: u64) -> i64 {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    clamp(actual).saturating_sub(clamp(reserved))
}

/// Counts one call to the store by kind (reserve, settle, lease, return)
/// and outcome, in `meshllm_quota_store_calls_total`.
pub(crate) fn count_call(host: &mut dyn Host, kind: &str, outcome: &str) {
    let name = metrics::labelled(
        metrics::QUOTA_STORE_CALLS_TOTAL,
        &[("kind", kind), ("outcome", outcome)],
    );
    host.count(&name, 1);
}

/// Sends the settlement on behalf of the root context, so it lands even
/// though the request is over; sent again whole if Redis lost the script.
pub(crate) fn settle(
    host: &mut dyn Host,
    store_config: &StoreConfig,
    deltas: &[(&str, i64)],
    whole_script: bool,
    kind: &'static str,
) {
    let command = settle_command(deltas, whole_script);
    let owned: Vec<(String, i64)> = deltas.iter().map(|(k, d)| (k.to_string(), *d)).collect();
    let config = store_config.clone();
    let then: crate::host::DetachedHandler =
        Box::new(
            move |host, answer| match parse_reply(&answer, owned.len()) {
                Reply::Done { .. } => count_call(host, kind, "ok"),
                Reply::NoScript if !whole_script => {
                    let deltas: Vec<(&str, i64)> =
                        owned.iter().map(|(k, d)| (k.as_str(), *d)).collect();
                    settle(host, &config, &deltas, true, kind);
                }
                Reply::NoScript => {
                    count_call(host, kind, "failed");
                    log::warn!("quota store: settle lost: Redis does not keep the script");
                }
                Reply::Failed(why) => {
                    count_call(host, kind, "failed");
                    log::warn!(
                        "quota store: settle of {} counters lost: {why}",
                        owned.len()
                    );
                }
            },
        );
    if let Err(e) = host.call_out_detached(&callout(store_config, &command), then) {
        count_call(host, kind, "failed");
        log::warn!("quota store: settle not sent: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MIN: Limit = Limit {
        meter: Meter::Requests,
        window: Window::Minute,
        max: 10,
    };

    fn answer(status: u16, body: &str) -> CalloutAnswer {
        CalloutAnswer::Http {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn script_sha1_names_the_script() {
        let out = std::process::Command::new("sha1sum")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/src/quota/store.lua"))
            .output()
            .expect("sha1sum runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().next(), Some(SCRIPT_SHA1));
    }

    #[test]
    fn keys_name_their_window_as_buckets_do() {
        // 2026-03-01T00:00:30Z
        let now = 1_772_323_230_000;
        let day = Limit {
            meter: Meter::Tokens,
            window: Window::Day,
            max: 5,
        };
        let month = Limit {
            meter: Meter::MicroUsd,
            window: Window::Month,
            max: 5,
        };
        assert_eq!(
            counter_key("meshllm/quota/v1/team", &MIN, now),
            format!("meshllm/quota/v1/team#requests:minute:{}", now / 60_000)
        );
        assert_eq!(
            counter_key("b", &day, now),
            format!("b#tokens:day:{}", now / 86_400_000)
        );
        assert_eq!(counter_key("b", &month, now), "b#micro_usd:month:674");
        let c = counters(
            "b",
            &[MIN, month],
            |m| if m == Meter::Requests { 1 } else { 7 },
            now,
        );
        assert_eq!(c[0].reserved, 1);
        assert_eq!(c[1].reserved, 7);
        assert_eq!(c[0].resets_at_ms, (now / 60_000 + 1) * 60_000);
        assert_eq!(c[1].resets_at_ms, window_end_ms(Window::Month, now));
    }

    #[test]
    fn reserve_command_encodes_keys_and_args_for_webdis() {
        let now = 120_000;
        let c = counters("meshllm/quota/v1/a|ns=x.y", &[MIN], |_| 1, now);
        let body = reserve_command(&c, false);
        assert_eq!(
            body,
            format!(
                "/EVALSHA/{SCRIPT_SHA1}/1/meshllm%2Fquota%2Fv1%2Fa%7Cns%3Dx%2Ey%23requests%3Aminute%3A2/reserve/10/1/{}",
                180 + KEY_MARGIN_S
            )
        );
        let whole = reserve_command(&c, true);
        assert!(whole.starts_with("/EVAL/"));
        assert!(
            !whole.contains('.') && whole.matches('/').count() == 8,
            "{whole}"
        );
    }

    #[test]
    fn settle_command_carries_signed_deltas() {
        let body = settle_command(&[("k", -40), ("j", 3)], false);
        assert_eq!(body, format!("/EVALSHA/{SCRIPT_SHA1}/2/k/j/settle/%2D40/3"));
        assert_eq!(delta(100, 60), -40);
        assert_eq!(delta(1, 4), 3);
        assert_eq!(delta(u64::MAX, 0), -i64::MAX);
    }

    #[test]
    fn replies_are_read_strictly() {
        assert_eq!(
            parse_reply(&answer(200, r#"{"EVALSHA":[1,3,0]}"#), 2),
            Reply::Done {
                admitted: true,
                used: vec![3, 0]
            }
        );
        assert_eq!(
            parse_reply(&answer(200, r#"{"EVAL":[0,9]}"#), 1),
            Reply::Done {
                admitted: false,
                used: vec![9]
            }
        );
        assert_eq!(
            parse_reply(
                &answer(200, r#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#),
                1
            ),
            Reply::NoScript
        );
        let failed = |a: &CalloutAnswer, n| matches!(parse_reply(a, n), Reply::Failed(_));
        assert!(failed(&answer(503, ""), 1));
        assert!(failed(&answer(403, r#"{"EVALSHA":[1,1]}"#), 1));
        assert!(failed(&answer(200, "<html>"), 1));
        assert!(failed(&answer(200, r#"{"EVALSHA":[1,1]}"#), 2));
        assert!(failed(&answer(200, r#"{"EVALSHA":[2,1]}"#), 1));
        assert!(failed(&answer(200, r#"{"EVALSHA":[1,"x"]}"#), 1));
        assert!(failed(&answer(200, r#"{"EVALSHA":[false,"ERR oom"]}"#), 1));
        assert!(failed(&answer(200, r#"{"GET":"1"}"#), 1));
        assert!(failed(&CalloutAnswer::Failed("timeout".into()), 1));
        assert!(failed(
            &CalloutAnswer::Grpc {
                status: 0,
                message: Vec::new()
            },
            1
        ));
    }

    #[test]
    fn store_section_compiles_with_defaults_and_refuses_nonsense() {
        let s = compile_store(Some(&json!({"cluster": "quota_store"})))
            .unwrap()
            .unwrap();
        assert_eq!(s.authority, "quota_store");
        assert_eq!(s.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(s.on_failure, FailureMode::Closed);
        let s = compile_store(Some(
            &json!({"cluster": "q", "timeout_ms": 50, "on_failure": "open", "authority": "webdis:7379"}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!((s.timeout_ms, s.on_failure), (50, FailureMode::Open));
        assert_eq!(s.authority, "webdis:7379");
        for (doc, path) in [
            (json!({"cluster": ""}), "quotas.store.cluster"),
            (json!({"cluster": "a b"}), "quotas.store.cluster"),
            (
                json!({"cluster": "q", "timeout_ms": 0}),
                "quotas.store.timeout_ms",
            ),
            (
                json!({"cluster": "q", "on_failure": "maybe"}),
                "quotas.store.on_failure",
            ),
            (json!({"cluster": "q", "extra": 1}), "quotas.store"),
            (json!({}), "quotas.store"),
        ] {
            let e = compile_store(Some(&doc)).unwrap_err();
            assert_eq!(e.path, path, "{doc}");
        }
    }
}
