//! The external guardrail's protocol: what the gateway asks a team's
//! classifier, and how it reads the answer. Pure; the guard stage issues
//! the call and waits.
//!
//! The gateway POSTs JSON:
//! `{"stage": "request", "rule": "<name>", "caller": {"namespace", "service"},
//!   "texts": ["...", ...]}` — every text value of the request, in order
//! (`"stage": "response"`: of a complete answer, in the caller's shape).
//! The classifier answers 200 with `{"flagged": false}` (let it pass) or
//! `{"flagged": true, "reason": "..."}`; for a rule whose action is
//! `redact` it adds `"texts"`, the same values in the same order as they
//! should be sent instead. Anything else (another status, a body that is not
//! that JSON, `texts` of another length) counts as no answer.

use serde_json::{json, Value};

use crate::host::CalloutAnswer;

/// What the classifier said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Flagged; with the texts to send instead, when it gave them.
    Flagged {
        texts: Option<Vec<String>>,
    },
}

/// The request body of a classifier call; `stage`: `request` or
/// `response` (the answer's texts).
pub fn ask(
    stage: &str,
    rule: &str,
    (namespace, service): (&str, &str),
    texts: &[String],
) -> Vec<u8> {
    json!({
        "stage": stage,
        "rule": rule,
        "caller": {"namespace": namespace, "service": service},
        "texts": texts,
    })
    .to_string()
    .into_bytes()
}

/// The classifier's verdict, or why there is none.
pub fn read(answer: &CalloutAnswer, sent: usize) -> Result<Verdict, String> {
    let body = match answer {
        CalloutAnswer::Http { status, body, .. } if (200..300).contains(status) => body,
        CalloutAnswer::Http { status, .. } => return Err(format!("it answered {status}")),
        CalloutAnswer::Grpc { .. } => return Err("it answered over gRPC".into()),
        CalloutAnswer::Failed(why) => return Err(why.clone()),
    };
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("its answer is not JSON: {e}"))?;
    let flagged = v
        .get("flagged")
        .and_then(Value::as_bool)
        .ok_or("its answer has no boolean `flagged`")?;
    if !flagged {
        return Ok(Verdict::Pass);
    }
    let texts = match v.get("texts") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let texts: Option<Vec<String>> = items
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect();
            match texts {
                Some(t) if t.len() == sent => Some(t),
                _ => return Err(format!("its `texts` are not {sent} strings")),
            }
        }
        Some(_) => return Err("its `texts` is not an array".into()),
    };
    Ok(Verdict::Flagged { texts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, body: &str) -> CalloutAnswer {
        CalloutAnswer::Http {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn asks_with_every_text_and_reads_the_verdicts() {
        let body: Value =
            serde_json::from_slice(&ask("request", "c", ("shop", "web"), &["a".into()])).unwrap();
        assert_eq!(body["texts"], json!(["a"]));
        assert_eq!(body["caller"]["namespace"], "shop");
        assert_eq!(
            read(&http(200, r#"{"flagged": false}"#), 1),
            Ok(Verdict::Pass)
        );
        assert_eq!(
            read(&http(200, r#"{"flagged": true, "reason": "x"}"#), 1),
            Ok(Verdict::Flagged { texts: None })
        );
        assert_eq!(
            read(&http(200, r#"{"flagged": true, "texts": ["b"]}"#), 1),
            Ok(Verdict::Flagged {
                texts: Some(vec!["b".into()])
            })
        );
    }

    #[test]
    fn anything_else_is_no_answer() {
        for answer in [
            http(500, r#"{"flagged": false}"#),
            http(200, "ok"),
            http(200, r#"{"flagged": "no"}"#),
            http(200, r#"{"flagged": true, "texts": ["a", "b"]}"#),
            http(200, r#"{"flagged": true, "texts": "a"}"#),
            CalloutAnswer::Failed("timeout".into()),
        ] {
            assert!(read(&answer, 1).is_err(), "{answer:?}");
        }
    }
}
