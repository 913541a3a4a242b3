//! OpenAI API shapes the gateway produces itself: error bodies, and the
//! normalisation of upstream error replies into that shape.

use serde::Serialize;
use serde_json::Value;

/// An error as the OpenAI API reports it:
/// `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(
        status: u16,
        kind: &'static str,
        code: Option<&'static str>,
        message: String,
    ) -> Self {
        ApiError {
            status,
            message,
            kind,
            param: None,
            code,
        }
    }

    pub fn invalid_request(code: Option<&'static str>, message: String) -> Self {
        Self::new(400, "invalid_request_error", code, message)
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn body(&self) -> Vec<u8> {
        error_body(&self.message, self.kind, self.param, self.code)
    }
}

fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Vec<u8> {
    let env = Envelope {
        error: Body {
            message,
            kind,
            param,
            code,
        },
    };
    // Serializing this plain struct cannot fail; fall back to a fixed body anyway.
    serde_json::to_vec(&env).unwrap_or_else(|_| {
        br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
            .to_vec()
    })
}

/// The OpenAI error `type` conventionally used for an HTTP status.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// How far to quote a non-JSON upstream body in an error message.
const MAX_QUOTED_BYTES: usize = 512;

/// Where an error reply came from, for the message a person reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOrigin {
    /// The provider answered with this error.
    Provider,
    /// Envoy answered because the provider could not be reached or timed out.
    Proxy,
}

/// Normalises an upstream error reply into OpenAI's error shape.
///
/// Returns `None` when `body` already is an OpenAI-shaped error and contains
/// no secret, so it can be passed on untouched. `secrets` are redacted from
/// any text that is kept.
pub fn normalise_error(
    status: u16,
    body: &[u8],
    provider: Option<&str>,
    origin: ErrorOrigin,
    secrets: &[&str],
) -> Option<Vec<u8>> {
    let leaks = secrets
        .iter()
        .any(|s| !s.is_empty() && quotes_secret(body, s));
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if origin == ErrorOrigin::Provider && !leaks {
        if let Some(Value::Object(o)) = &parsed {
            if let Some(Value::Object(e)) = o.get("error") {
                if e.get("message").is_some_and(Value::is_string) {
                    return None;
                }
            }
        }
    }

    let extracted = parsed.as_ref().and_then(message_from_json);
    let text = extracted.unwrap_or_else(|| readable_text(body));
    let text = redact(&text, secrets);
    let (message, code) = match origin {
        ErrorOrigin::Proxy => {
            let code = match status {
                504 => "provider_timeout",
                413 => "request_too_large",
                _ => "provider_unavailable",
            };
            let what = if status == 504 {
                "did not answer in time"
            } else {
                "could not be reached"
            };
            let message = match provider {
                Some(p) => format!("Provider {p:?} {what} ({status}: {text})."),
                // Envoy answered before any provider was chosen.
                None => format!("The gateway's proxy rejected the request ({status}: {text})."),
            };
            (message, Some(code))
        }
        ErrorOrigin::Provider => {
            let text = if text.is_empty() {
                "no details given".to_string()
            } else {
                text
            };
            (
                format!(
                    "Provider {:?} returned an error ({status}): {text}",
                    provider.unwrap_or("none")
                ),
                provider_error_code(parsed.as_ref()),
            )
        }
    };
    let kind = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/type"))
        .and_then(Value::as_str)
        .filter(|_| origin == ErrorOrigin::Provider)
        .map(str::to_string);
    let kind_str = kind.as_deref().unwrap_or(error_type_for_status(status));
    let code_owned = code.map(str::to_string);
    Some(error_body(&message, kind_str, None, code_owned.as_deref()))
}

/// What a person can read of a body that is not JSON: an HTML error
/// page's `<title>` (load balancers and CDNs answer with those), else the
/// text with control characters blanked, at most `MAX_QUOTED_BYTES`.
pub fn readable_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let title = text
        .starts_with('<')
        .then(|| html_title(text))
        .flatten()
        .filter(|t| !t.is_empty());
    let text: String = title
        .unwrap_or(text)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut end = text.len().min(MAX_QUOTED_BYTES);
    while !text.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    text.get(..end).unwrap_or_default().trim().to_string()
}

/// The text of an HTML document's `<title>` element, if it has one.
fn html_title(html: &str) -> Option<&str> {
    let lower = html.to_ascii_lowercase();
    let open = lower.find("<title")?;
    let start = open + lower.get(open..)?.find('>')? + 1;
    let end = start + lower.get(start..)?.find("</title")?;
    Some(html.get(start..end)?.trim())
}

/// Finds a human-readable message in the error shapes providers use.
pub fn message_from_json(v: &Value) -> Option<String> {
    let candidates = [
        "/error/message",
        "/error",
        "/message",
        "/detail",
        "/detail/0/msg",
        "/error_message",
        "/errors/0/message",
        // Google's streaming endpoints wrap errors in an array.
        "/0/error/message",
    ];
    candidates
        .iter()
        .find_map(|p| v.pointer(p).and_then(Value::as_str))
        .map(str::to_string)
}

/// A provider's own error code, when it is one of the well-known ones.
fn provider_error_code(v: Option<&Value>) -> Option<&'static str> {
    let code = v?.pointer("/error/code").and_then(Value::as_str)?;
    const KNOWN: &[&str] = &[
        "rate_limit_exceeded",
        "insufficient_quota",
        "invalid_api_key",
        "model_not_found",
        "context_length_exceeded",
        "content_filter",
        "server_error",
    ];
    KNOWN.iter().copied().find(|k| *k == code)
}

/// `needle` occurs in `haystack` (an empty needle never does).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `haystack` quotes `secret`, as it is or in the JSON-escaped
/// form some encoders write (`/` as `\/`).
pub fn quotes_secret(haystack: &[u8], secret: &str) -> bool {
    contains(haystack, secret.as_bytes())
        || (secret.contains('/') && contains(haystack, escaped_slashes(secret).as_bytes()))
}

fn escaped_slashes(secret: &str) -> String {
    secret.replace('/', "\\/")
}

/// Replaces every occurrence of each secret (raw or with escaped slashes)
/// with a marker.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "[redacted]");
        if s.contains('/') {
            out = out.replace(&escaped_slashes(s), "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn api_error_body_has_all_four_fields() {
        let e = ApiError::invalid_request(Some("missing_required_parameter"), "no model".into())
            .with_param("model");
        assert_eq!(e.status, 400);
        let v = parse(&e.body());
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "no model", "type": "invalid_request_error",
                                          "param": "model", "code": "missing_required_parameter"}})
        );
        let v = parse(&ApiError::new(404, "invalid_request_error", None, "x".into()).body());
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
    }

    #[test]
    fn openai_shaped_errors_pass_untouched() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            normalise_error(429, body, Some("openai"), ErrorOrigin::Provider, &["sk-1"]),
            None
        );
        // Azure's shape has a message but no type: still fine for SDKs.
        let body = br#"{"error":{"code":"DeploymentNotFound","message":"The API deployment does not exist."}}"#;
        assert_eq!(
            normalise_error(404, body, Some("azure"), ErrorOrigin::Provider, &[]),
            None
        );
    }

    #[test]
    fn other_shapes_are_normalised() {
        let table: &[(u16, &[u8], &str, &str)] = &[
            (
                404,
                br#"{"error":"model 'x' not found"}"#,
                "model 'x' not found",
                "not_found_error",
            ),
            (
                422,
                br#"{"detail":[{"loc":["body"],"msg":"field required"}]}"#,
                "field required",
                "invalid_request_error",
            ),
            (
                400,
                br#"{"message":"bad things"}"#,
                "bad things",
                "invalid_request_error",
            ),
            (
                500,
                b"Internal Server Error",
                "Internal Server Error",
                "server_error",
            ),
            (502, b"", "no details given", "server_error"),
            (
                401,
                br#"{"detail":"Unauthorized"}"#,
                "Unauthorized",
                "authentication_error",
            ),
        ];
        for (status, body, text, kind) in table {
            let out =
                normalise_error(*status, body, Some("p"), ErrorOrigin::Provider, &[]).unwrap();
            let v = parse(&out);
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains(text), "{msg}");
            assert!(msg.contains(&format!("({status})")), "{msg}");
            assert_eq!(v["error"]["type"], *kind);
        }
    }

    #[test]
    fn proxy_errors_explain_reachability() {
        let out = normalise_error(
            503,
            b"upstream connect error or disconnect/reset before headers. reset reason: connection refused",
            Some("openai"),
            ErrorOrigin::Proxy,
            &[],
        )
        .unwrap();
        let v = parse(&out);
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], "provider_unavailable");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("Provider \"openai\" could not be reached"),
            "{msg}"
        );
        assert!(msg.contains("connection refused"));
        let v = parse(
            &normalise_error(
                504,
                b"upstream request timeout",
                Some("x"),
                ErrorOrigin::Proxy,
                &[],
            )
            .unwrap(),
        );
        assert_eq!(v["error"]["code"], "provider_timeout");
    }

    #[test]
    fn secrets_are_redacted_even_from_openai_shaped_errors() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-secret-123.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let out = normalise_error(
            401,
            body,
            Some("openai"),
            ErrorOrigin::Provider,
            &["sk-secret-123"],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("sk-secret-123"));
        assert!(text.contains("[redacted]"));
        let v = parse(text.as_bytes());
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn secrets_with_escaped_slashes_are_redacted() {
        let key = "ya29.a0/b1/c2";
        let body = br#"{"error": {"message": "bad token ya29.a0\/b1\/c2", "type": "x"}}"#;
        assert!(quotes_secret(body, key));
        let text = redact(&String::from_utf8_lossy(body), &[key]);
        assert!(!text.contains("a0\\/b1"), "{text}");
        assert!(text.contains("[redacted]"));
    }

    #[test]
    fn html_error_pages_are_quoted_by_their_title() {
        let page = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>";
        let v = parse(&normalise_error(502, page, Some("p"), ErrorOrigin::Provider, &[]).unwrap());
        assert_eq!(
            v["error"]["message"],
            "Provider \"p\" returned an error (502): 502 Bad Gateway"
        );
        assert_eq!(v["error"]["type"], "server_error");
        // No title: the text itself, control characters blanked.
        assert_eq!(readable_text(b"<p>down\x00</p>"), "<p>down </p>");
        assert_eq!(
            readable_text(b"\xff\xfe\x00garbage"),
            "\u{fffd}\u{fffd} garbage"
        );
        assert_eq!(readable_text(b"  <TITLE> Err </Title>"), "Err");
    }

    #[test]
    fn long_text_bodies_are_truncated() {
        let body = vec![b'x'; 10_000];
        let out = normalise_error(500, &body, Some("p"), ErrorOrigin::Provider, &[]).unwrap();
        assert!(out.len() < 1_000);
    }
}
