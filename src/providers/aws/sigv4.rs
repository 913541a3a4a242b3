//! AWS Signature Version 4 request signing, header form, for non-S3
//! services such as Bedrock.
//!
//! The canonical URI is the request path as sent on the wire with each
//! segment URI-encoded once more (AWS "double-encodes" for every service but
//! S3): `/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse` is
//! signed as `/model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse`.
//! Paths are not normalised (no `.`/`..` or `//` removal): the gateway's
//! Bedrock paths never hold those.

use crate::core::sha256::{hex, hmac_sha256, sha256};
use crate::core::url::{percent_decode, percent_encode_into};

/// Long-term or temporary (STS) AWS credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Never print the secret or the token.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Signs a request and returns the headers to add to it, names lowercase:
/// `authorization`, `x-amz-date`, `x-amz-content-sha256`, and
/// `x-amz-security-token` when the credentials carry a session token.
///
/// `path` and `query` are exactly what goes on the wire (already
/// percent-encoded; `query` without `?`). The request must also carry
/// `host` (HTTP/2 `:authority`) and `content-type` with exactly the values
/// given here, since both are signed. `unix_seconds` is the signing time;
/// AWS rejects signatures more than 5 minutes off.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &str,
    path: &str,
    query: &str,
    host: &str,
    content_type: &str,
    body: &[u8],
    region: &str,
    service: &str,
    creds: &Credentials,
    unix_seconds: u64,
) -> Vec<(String, String)> {
    let amz_date = amz_date(unix_seconds);
    let payload_hash = hex(&sha256(body));
    let mut headers: Vec<(&str, &str)> = vec![
        ("content-type", content_type),
        ("host", host),
        ("x-amz-content-sha256", &payload_hash),
        ("x-amz-date", &amz_date),
    ];
    if let Some(token) = &creds.session_token {
        headers.push(("x-amz-security-token", token));
    }
    let signed = sign_headers(
        &Request {
            method,
            path,
            query,
            headers: &headers,
            payload_hash: &payload_hash,
        },
        region,
        service,
        creds,
        &amz_date,
    );
    let mut out = vec![
        ("authorization".to_string(), signed.authorization),
        ("x-amz-date".to_string(), amz_date.clone()),
        ("x-amz-content-sha256".to_string(), payload_hash.clone()),
    ];
    if let Some(token) = &creds.session_token {
        out.push(("x-amz-security-token".to_string(), token.clone()));
    }
    out
}

/// What is signed: every header in `headers` is signed, and `x-amz-date`
/// must be among them.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: &'a [(&'a str, &'a str)],
    payload_hash: &'a str,
}

/// The intermediate products, kept for tests.
#[cfg_attr(not(test), allow(dead_code))]
struct Signed {
    canonical_request: String,
    string_to_sign: String,
    authorization: String,
}

fn sign_headers(
    req: &Request<'_>,
    region: &str,
    service: &str,
    creds: &Credentials,
    amz_date: &str,
) -> Signed {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), canonical_header_value(v)))
        .collect();
    headers.sort();
    // Repeated names are signed once, their values joined with commas.
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        match merged.last_mut() {
            Some((last, values)) if *last == name => {
                values.push(',');
                values.push_str(&value);
            }
            _ => merged.push((name, value)),
        }
    }
    let signed_headers = merged
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical_request = String::new();
    canonical_request.push_str(req.method);
    canonical_request.push('\n');
    canonical_request.push_str(&canonical_uri(req.path));
    canonical_request.push('\n');
    canonical_request.push_str(&canonical_query(req.query));
    canonical_request.push('\n');
    for (name, value) in &merged {
        canonical_request.push_str(name);
        canonical_request.push(':');
        canonical_request.push_str(value);
        canonical_request.push('\n');
    }
    canonical_request.push('\n');
    canonical_request.push_str(&signed_headers);
    canonical_request.push('\n');
    canonical_request.push_str(req.payload_hash);

    let date = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&sha256(canonical_request.as_bytes()))
    );
    let k_secret = format!("AWS4{}", creds.secret_access_key);
    let k_date = hmac_sha256(k_secret.as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));
    let authorization = format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, \
         Signature={signature}",
        creds.access_key_id
    );
    Signed {
        canonical_request,
        string_to_sign,
        authorization,
    }
}

/// Trimmed, inner runs of spaces collapsed to one.
fn canonical_header_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for word in v.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Each segment of the wire path encoded again; `/` separators kept.
fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    let mut out = String::with_capacity(path.len() + 8);
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        percent_encode_into(segment.as_bytes(), &mut out);
    }
    out
}

/// Parameters decoded, re-encoded strictly, sorted by name then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let mut key = String::new();
            percent_encode_into(&percent_decode(k), &mut key);
            let mut value = String::new();
            percent_encode_into(&percent_decode(v), &mut value);
            (key, value)
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian
/// (H. Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time.
pub fn amz_date(unix_seconds: u64) -> String {
    let secs = i64::try_from(unix_seconds).unwrap_or(i64::MAX);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUITE_TIME: u64 = 1_440_938_160; // 2015-08-30T12:36:00Z
    const HOST: (&str, &str) = ("Host", "example.amazonaws.com");
    const DATE: (&str, &str) = ("X-Amz-Date", "20150830T123600Z");
    const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const SUITE_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    fn suite_creds(token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: token.map(str::to_string),
        }
    }

    fn authz(signed_headers: &str, signature: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders={signed_headers}, Signature={signature}"
        )
    }

    /// Cases of AWS's aws-sig-v4-test-suite (docs.aws.amazon.com/general/
    /// latest/gr/signature-v4-test-suite.html); the expected signatures are
    /// the published `.authz` values.
    #[test]
    fn aws_test_suite() {
        // (name, method, path, query, headers, body, signed headers, signature)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, &str, &str, &str, Vec<(&str, &str)>, &[u8], &str, &str)> = vec![
            (
                "get-vanilla",
                "GET",
                "/",
                "",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "post-vanilla",
                "POST",
                "/",
                "",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
            ),
            (
                "post-vanilla-query",
                "POST",
                "/",
                "Param1=value1",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
            ),
            (
                "get-vanilla-query-order-key-case",
                "GET",
                "/",
                "Param2=value2&Param1=value1",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
            (
                "get-vanilla-utf8-query (already encoded on the wire)",
                "GET",
                "/",
                "%E1%88%B4=bar",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
            ),
            (
                "get-unreserved",
                "GET",
                "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                "",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
            ),
            (
                "get-utf8 (raw path, encoded once)",
                "GET",
                "/\u{1234}",
                "",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
            ),
            (
                "get-space (raw path)",
                "GET",
                "/example space/",
                "",
                vec![HOST, DATE],
                b"",
                "host;x-amz-date",
                "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
            ),
            (
                "get-header-value-trim",
                "GET",
                "/",
                "",
                vec![
                    HOST,
                    ("My-Header1", " value1"),
                    ("My-Header2", " \"a   b   c\""),
                    DATE,
                ],
                b"",
                "host;my-header1;my-header2;x-amz-date",
                "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
            ),
            (
                "post-x-www-form-urlencoded",
                "POST",
                "/",
                "",
                vec![
                    ("Content-Type", "application/x-www-form-urlencoded"),
                    HOST,
                    DATE,
                ],
                b"Param1=value1",
                "content-type;host;x-amz-date",
                "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
            ),
            (
                "post-sts-header-before",
                "POST",
                "/",
                "",
                vec![HOST, DATE, ("X-Amz-Security-Token", SUITE_TOKEN)],
                b"",
                "host;x-amz-date;x-amz-security-token",
                "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
            ),
        ];
        for (name, method, path, query, headers, body, signed_headers, signature) in cases {
            let payload_hash = hex(&sha256(body));
            let signed = sign_headers(
                &Request {
                    method,
                    path,
                    query,
                    headers: &headers,
                    payload_hash: &payload_hash,
                },
                "us-east-1",
                "service",
                &suite_creds(None),
                "20150830T123600Z",
            );
            assert_eq!(
                signed.authorization,
                authz(signed_headers, signature),
                "{name}\n{}",
                signed.canonical_request
            );
        }
    }

    #[test]
    fn suite_intermediate_strings() {
        let headers = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            HOST,
            DATE,
        ];
        let payload_hash = hex(&sha256(b"Param1=value1"));
        let signed = sign_headers(
            &Request {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                payload_hash: &payload_hash,
            },
            "us-east-1",
            "service",
            &suite_creds(None),
            "20150830T123600Z",
        );
        assert_eq!(
            signed.canonical_request,
            "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\n\
             host:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n\
             content-type;host;x-amz-date\n\
             9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
        );
        assert_eq!(
            signed.string_to_sign,
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n\
             42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281"
        );
    }

    /// A Bedrock Converse call with a colon in the model id. The expected
    /// signature was computed independently with a short Python script
    /// (hashlib + hmac, canonical URI written out by hand as
    /// `/model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse`).
    #[test]
    fn bedrock_converse_with_colon_in_model_id() {
        let body = br#"{"messages":[{"role":"user","content":[{"text":"Hello"}]}]}"#;
        let headers = sign(
            "POST",
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
            "",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "application/json",
            body,
            "us-east-1",
            "bedrock",
            &suite_creds(None),
            SUITE_TIME,
        );
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["authorization", "x-amz-date", "x-amz-content-sha256"]
        );
        assert_eq!(headers[1].1, "20150830T123600Z");
        assert_eq!(headers[2].1, BEDROCK_BODY_SHA256);
        assert_eq!(
            headers[0].1,
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/bedrock/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date, \
                 Signature={BEDROCK_SIGNATURE}"
            )
        );

        let with_token = sign(
            "POST",
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream",
            "",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "application/json",
            body,
            "us-east-1",
            "bedrock",
            &suite_creds(Some("FwoGZXIvYXdzEXAMPLETOKEN")),
            SUITE_TIME,
        );
        assert_eq!(
            with_token[3],
            (
                "x-amz-security-token".to_string(),
                "FwoGZXIvYXdzEXAMPLETOKEN".to_string()
            )
        );
        assert_eq!(
            with_token[0].1,
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/bedrock/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;\
                 x-amz-security-token, Signature={BEDROCK_STREAM_TOKEN_SIGNATURE}"
            )
        );
    }

    const BEDROCK_BODY_SHA256: &str =
        "7421da8d1a0949a481724fee62d5886aacde03836bf58248adb73e8b61ac0d54";
    const BEDROCK_SIGNATURE: &str =
        "7cff346b2fe84765240d6c7289252ad8b9c8696c282819cb49398ad26a316c47";
    const BEDROCK_STREAM_TOKEN_SIGNATURE: &str =
        "85c06f18a0842d70a4bbfba499bf36f9bcb521adae76ff626d7d22e230fd457b";

    #[test]
    fn canonical_uri_double_encodes_segments() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(
            canonical_uri("/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"),
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse"
        );
        // An unencoded colon (if it went out raw) is encoded once.
        assert_eq!(canonical_uri("/model/a:b/x"), "/model/a%3Ab/x");
        assert_eq!(
            canonical_uri("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123%3Ainference-profile%2Fus.x/converse"),
            "/model/arn%253Aaws%253Abedrock%253Aus-east-1%253A123%253Ainference-profile%252Fus.x/converse"
        );
    }

    #[test]
    fn canonical_query_sorts_and_encodes() {
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("b=2&a=1&a=0"), "a=0&a=1&b=2");
        assert_eq!(canonical_query("x&y="), "x=&y=");
        assert_eq!(canonical_query("k=a%20b&s=a b"), "k=a%20b&s=a%20b");
        assert_eq!(canonical_query("p=100%"), "p=100%25");
    }

    #[test]
    fn amz_dates() {
        let table = [
            (0u64, "19700101T000000Z"),
            (SUITE_TIME, "20150830T123600Z"),
            (951_782_400, "20000229T000000Z"), // leap day of a century year
            (1_709_251_199, "20240229T235959Z"),
            (1_709_251_200, "20240301T000000Z"),
            (4_102_444_800, "21000101T000000Z"),
            (253_402_300_799, "99991231T235959Z"),
        ];
        for (t, want) in table {
            assert_eq!(amz_date(t), want, "{t}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let shown = format!("{:?}", suite_creds(Some("tok")));
        assert!(shown.contains("AKIDEXAMPLE"));
        assert!(!shown.contains("wJalr"));
        assert!(!shown.contains("tok\""));
    }

    #[test]
    fn suite_time_constant() {
        assert_eq!(amz_date(SUITE_TIME), "20150830T123600Z");
        assert_eq!(EMPTY_HASH, hex(&sha256(b"")));
    }
}
