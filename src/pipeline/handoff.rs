//! Everything that passes between the two halves of the filter, on both
//! sides: what the listener half leaves for the upstream half (the plan,
//! the position headers, the cluster, the retry count), what the upstream
//! half leaves for the listener half (usage, a changed answer status, the
//! response headers naming what served), and where Envoy puts what it
//! decided in between (the upstream host's position). One place owns each
//! name and format, so the writer and the reader cannot drift apart.

use crate::config::models::Operation;
use crate::core::schema::Schema;
use crate::core::usage::Usage;
use crate::host::{Host, HostResult};
use crate::pipeline::wire::{Reader, Writer};

/// The header the Envoy route reads to pick the provider's cluster.
pub const CLUSTER_HEADER: &str = "x-meshllm-cluster";
/// Names the caller's API (`openai`, `anthropic`, `gemini`) on a request
/// the listener half serves itself. Envoy's `header_to_metadata` turns it
/// into dynamic metadata (`meshllm.caller_api`) and removes it, and the
/// connection manager's `local_reply_config` shapes Envoy's own replies by
/// it: those Envoy sends straight to the caller once this filter holds the
/// response headers (a provider that closes mid-answer, a timeout).
pub const CALLER_API_HEADER: &str = "x-meshllm-caller-api";

/// The caller's API as `CALLER_API_HEADER` names it (render.py's
/// `local_reply_config` has one set of mappers per name).
pub fn api_name(caller: Schema) -> &'static str {
    match caller {
        Schema::Anthropic => "anthropic",
        Schema::Gemini => "gemini",
        // The Responses API's errors are OpenAI's envelope.
        Schema::OpenAi | Schema::Converse | Schema::Responses => "openai",
    }
}
/// Response headers the serving half sets and the listener half reads.
pub const PROVIDER_RESPONSE_HEADER: &str = "x-meshllm-provider";
pub const MODEL_RESPONSE_HEADER: &str = "x-meshllm-model";
/// How many targets were tried, the one that answered included.
pub const ATTEMPTS_RESPONSE_HEADER: &str = "x-meshllm-attempts";
/// Why the route's targets were ordered as they were.
pub const ROUTE_RESPONSE_HEADER: &str = "x-meshllm-route";
/// The aggregate cluster whose position clusters hold every provider.
pub const FAILOVER_CLUSTER: &str = "meshllm";
/// Position headers: `x-meshllm-p<i>` names the provider of attempt i; Envoy
/// turns them into load-balancer metadata (and removes them).
pub const POSITION_HEADER_PREFIX: &str = "x-meshllm-p";
/// The first position's cluster (render.py names them `meshllm.p<i>`).
pub const FIRST_POSITION_CLUSTER: &str = "meshllm.p0";
/// How many times Envoy's router retries: the listener half sets it to one
/// fewer than the plan's targets.
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
/// Filter state the listener half leaves for the upstream half.
pub const PLAN_PROPERTY: &str = "meshllm.plan";
/// Filter state the upstream half leaves for the listener half: the target
/// that answered and the token counts it reported.
pub const USAGE_PROPERTY: &str = "meshllm.usage";
/// Filter state: the status the upstream half gave an answer whose headers
/// had already passed it (a translation that failed at the body).
pub const ANSWER_STATUS_PROPERTY: &str = "meshllm.answer_status";
/// Where the upstream half finds the attempt's position in the chain: the
/// metadata of the host Envoy's position cluster picked.
const HOST_POSITION: &[&str] = &[
    "xds",
    "upstream_host_metadata",
    "filter_metadata",
    "meshllm",
    "position",
];

/// Request headers Envoy's router obeys when a client sends them.
pub const ROUTER_CONTROL_HEADERS: &[&str] = &[
    MAX_RETRIES_HEADER,
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-is-timeout-retry",
    "x-envoy-attempt-count",
];

/// Headers only Envoy and the gateway's own halves may set on a request.
pub fn is_internal_request_header(name: &str) -> bool {
    let starts = |prefix: &str| {
        name.as_bytes()
            .get(..prefix.len())
            .is_some_and(|b| b.eq_ignore_ascii_case(prefix.as_bytes()))
    };
    starts("x-meshllm-") || starts("x-envoy-")
}

/// The header naming the provider of the attempt at `position`.
pub fn position_header(position: usize) -> String {
    format!("{POSITION_HEADER_PREFIX}{position}")
}

/// Upstream half: the attempt's position in the plan's chain, from the
/// metadata of the host Envoy picked. None outside a position cluster.
pub fn attempt_position(host: &dyn Host) -> Option<usize> {
    host.property(HOST_POSITION)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|p| p.parse::<usize>().ok())
}

/// What the listener half decided, for the upstream half of each attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub caller: Schema,
    pub operation: Operation,
    /// Gemini callers name the model and streaming in the URL.
    pub gemini: Option<(String, bool)>,
    /// Indices into `Config::models`, in attempt order.
    pub chain: Vec<usize>,
    pub reason: String,
    /// The caller's Anthropic headers, for attempts that go to Anthropic.
    pub anthropic: Vec<(String, String)>,
    /// The caller's namespace and service and the model it asked for, as
    /// metric labels for each attempt.
    pub labels: (String, String, String),
}

impl Plan {
    /// The plan as filter state, in the `wire` encoding (serde_json cost
    /// ~8k instructions per request between the halves).
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.usize(self.caller as usize);
        w.usize(self.operation.code());
        w.bool(self.gemini.is_some());
        if let Some((model, stream)) = &self.gemini {
            w.str(model);
            w.bool(*stream);
        }
        w.usize(self.chain.len());
        for &m in &self.chain {
            w.usize(m);
        }
        w.str(&self.reason);
        w.usize(self.anthropic.len());
        for (name, value) in &self.anthropic {
            w.str(name);
            w.str(value);
        }
        let (ns, svc, model) = &self.labels;
        for label in [ns, svc, model] {
            w.str(label);
        }
        w.finish()
    }

    /// None for anything `encode` did not write, garbage included.
    fn decode(bytes: &[u8]) -> Option<Plan> {
        let mut r = Reader::new(bytes);
        // In declaration order: `encode` writes the discriminant.
        const SCHEMAS: [Schema; 5] = [
            Schema::OpenAi,
            Schema::Anthropic,
            Schema::Gemini,
            Schema::Converse,
            Schema::Responses,
        ];
        let caller = *SCHEMAS.get(r.usize()?)?;
        let operation = Operation::from_code(r.usize()?)?;
        let gemini = match r.bool()? {
            true => Some((r.str()?.to_string(), r.bool()?)),
            false => None,
        };
        let chain = (0..r.count()?)
            .map(|_| r.usize())
            .collect::<Option<Vec<usize>>>()?;
        let reason = r.str()?.to_string();
        let anthropic = (0..r.count()?)
            .map(|_| Some((r.str()?.to_string(), r.str()?.to_string())))
            .collect::<Option<Vec<_>>>()?;
        let labels = (
            r.str()?.to_string(),
            r.str()?.to_string(),
            r.str()?.to_string(),
        );
        r.is_done().then_some(Plan {
            caller,
            operation,
            gemini,
            chain,
            reason,
            anthropic,
            labels,
        })
    }
}

/// Listener half: leaves the plan for the upstream half of every attempt.
pub fn leave_plan(host: &mut dyn Host, plan: &Plan) -> HostResult {
    host.set_property(&[PLAN_PROPERTY], &plan.encode())
}

/// Upstream half: the plan the listener half left; None when there is
/// none or it is garbled.
pub fn plan(host: &dyn Host) -> Option<Plan> {
    host.property(&[PLAN_PROPERTY])
        .and_then(|b| Plan::decode(&b))
}

/// Upstream half: leaves the target that answered and its token counts
/// for the listener half, which settles the quota.
pub fn leave_usage(host: &mut dyn Host, target: usize, usage: &Usage) -> HostResult {
    host.set_property(&[USAGE_PROPERTY], encode_usage(target, usage).as_bytes())
}

/// Listener half: the target and usage the upstream half left.
pub fn usage(host: &dyn Host) -> Option<(usize, Usage)> {
    host.property(&[USAGE_PROPERTY])
        .and_then(|b| decode_usage(&b))
}

/// `target,input,output,cached,reasoning`.
fn encode_usage(target: usize, u: &Usage) -> String {
    format!(
        "{target},{},{},{},{}",
        u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens
    )
}

fn decode_usage(bytes: &[u8]) -> Option<(usize, Usage)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut n = text.split(',').map(|p| p.trim().parse::<u64>().ok());
    let target = usize::try_from(n.next()??).ok()?;
    let usage = Usage {
        input_tokens: n.next()??,
        output_tokens: n.next()??,
        cached_input_tokens: n.next()??,
        reasoning_tokens: n.next()??,
    };
    Some((target, usage))
}

/// Upstream half: the status an answer whose headers already passed it
/// should have after all; the listener half, holding them, sets it.
pub fn leave_answer_status(host: &mut dyn Host, status: u16) -> HostResult {
    host.set_property(&[ANSWER_STATUS_PROPERTY], status.to_string().as_bytes())
}

/// Listener half: the status the upstream half left, when it is three
/// digits.
pub fn answer_status(host: &dyn Host) -> Option<u16> {
    host.property(&[ANSWER_STATUS_PROPERTY])
        .and_then(|b| decode_status(&b))
}

fn decode_status(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text.len() != 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|s| (100..1000).contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::MockHost;

    #[test]
    fn plans_round_trip_and_garbled_plans_are_refused() {
        let full = Plan {
            caller: Schema::Gemini,
            operation: Operation::Embeddings,
            gemini: Some(("gemini-2.5-pro".into(), true)),
            chain: vec![3, 0, 200],
            reason: "budget:ops".into(),
            anthropic: vec![
                ("anthropic-version".into(), "2023-06-01".into()),
                ("anthropic-beta".into(), "a,b ✓".into()),
            ],
            labels: ("shop".into(), "checkout".into(), "chat".into()),
        };
        let empty = Plan {
            caller: Schema::Converse,
            operation: Operation::ChatCompletions,
            gemini: None,
            chain: vec![],
            reason: String::new(),
            anthropic: vec![],
            labels: Default::default(),
        };
        for plan in [&full, &empty] {
            let bytes = plan.encode();
            assert_eq!(Plan::decode(&bytes).as_ref(), Some(plan));
            // Every shorter prefix and any extra byte is refused.
            for cut in 0..bytes.len() {
                assert_eq!(Plan::decode(&bytes[..cut]), None, "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Plan::decode(&longer), None);
        }
        let mut unknown_schema = full.encode();
        unknown_schema[0] = 5;
        assert_eq!(Plan::decode(&unknown_schema), None);
        // Every schema a caller can speak round-trips.
        let responses = Plan {
            caller: Schema::Responses,
            ..full.clone()
        };
        assert_eq!(Plan::decode(&responses.encode()), Some(responses));
        // The former JSON encoding is garbage now.
        assert_eq!(Plan::decode(br#"{"caller":"OpenAi","chain":[0]}"#), None);

        // Through the host: what one half leaves, the other reads.
        let mut host = MockHost::new("POST", "/v1/chat/completions");
        assert_eq!(plan(&host), None);
        leave_plan(&mut host, &full).unwrap();
        assert_eq!(plan(&host), Some(full));
        host.properties
            .insert(PLAN_PROPERTY.into(), b"\xff\xff garbage".to_vec());
        assert_eq!(plan(&host), None);
    }

    #[test]
    fn usage_round_trips_and_malformed_usage_is_refused() {
        let counts = Usage {
            input_tokens: 12,
            output_tokens: 34,
            cached_input_tokens: 5,
            reasoning_tokens: u64::MAX,
        };
        let mut host = MockHost::new("POST", "/v1/chat/completions");
        assert_eq!(usage(&host), None);
        leave_usage(&mut host, 7, &counts).unwrap();
        assert_eq!(
            host.properties[USAGE_PROPERTY],
            format!("7,12,34,5,{}", u64::MAX).into_bytes(),
            "the text format is unchanged"
        );
        assert_eq!(usage(&host), Some((7, counts)));
        assert_eq!(
            decode_usage(b" 1, 2 ,3,4,5"),
            Some((
                1,
                Usage {
                    input_tokens: 2,
                    output_tokens: 3,
                    cached_input_tokens: 4,
                    reasoning_tokens: 5,
                }
            ))
        );
        for bad in [
            &b""[..],
            b"1,2,3,4",
            b"1,2,3,x,5",
            b"-1,2,3,4,5",
            b"1,2,3,4,18446744073709551616",
            b"\xff,2,3,4,5",
        ] {
            assert_eq!(
                decode_usage(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn answer_status_round_trips_and_only_three_digits_count() {
        let mut host = MockHost::new("POST", "/v1/chat/completions");
        assert_eq!(answer_status(&host), None);
        leave_answer_status(&mut host, 502).unwrap();
        assert_eq!(host.properties[ANSWER_STATUS_PROPERTY], b"502");
        assert_eq!(answer_status(&host), Some(502));
        for bad in [
            &b""[..],
            b"50",
            b"5020",
            b" 502",
            b"5x2",
            b"+50",
            b"\xff\xff\xff",
        ] {
            assert_eq!(
                decode_status(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn positions_come_from_the_upstream_host_metadata() {
        let mut host = MockHost::new("POST", "/v1/chat/completions");
        assert_eq!(attempt_position(&host), None);
        let path = HOST_POSITION.join(".");
        host.properties.insert(path.clone(), b"2".to_vec());
        assert_eq!(attempt_position(&host), Some(2));
        host.properties.insert(path, b"two".to_vec());
        assert_eq!(attempt_position(&host), None);
        assert_eq!(position_header(3), "x-meshllm-p3");
    }

    #[test]
    fn internal_request_headers_are_recognised_in_any_case() {
        for name in [
            "x-meshllm-p0",
            "X-MeshLLM-Cluster",
            CALLER_API_HEADER,
            MAX_RETRIES_HEADER,
            "X-Envoy-Attempt-Count",
        ] {
            assert!(is_internal_request_header(name), "{name}");
        }
        for name in ["x-meshll", "authorization", "x-request-id", "x-envoy"] {
            assert!(!is_internal_request_header(name), "{name}");
        }
        assert!(ROUTER_CONTROL_HEADERS
            .iter()
            .all(|n| is_internal_request_header(n)));
    }
}
