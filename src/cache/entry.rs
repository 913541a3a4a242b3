//! What the cache keeps of an answer, and whether an answer is whole
//! enough to keep: a stream that ended early or with an error event, or a
//! body that is not a JSON answer, is never replayed.

use serde::{Deserialize, Serialize};

use crate::core::schema::Schema;

/// A kept answer: exactly the bytes the first caller got, with what a
/// replay needs to say about them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full key (a slot of the local store holds one key at a time).
    pub key: [u8; 32],
    /// When it stops being served, in ms since the epoch.
    pub expires_ms: u64,
    pub content_type: String,
    /// The provider and model that answered.
    pub provider: String,
    pub model: String,
    pub body: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    k: String,
    exp: u64,
    ct: String,
    p: String,
    m: String,
    /// The body's length: a value cut short in a store is not an answer.
    n: usize,
}

impl Entry {
    /// One line of JSON saying what it is, then the answer's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            k: crate::core::sha256::hex(&self.key),
            exp: self.expires_ms,
            ct: self.content_type.clone(),
            p: self.provider.clone(),
            m: self.model.clone(),
            n: self.body.len(),
        };
        let mut out = serde_json::to_vec(&header).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    /// None for anything [`Entry::encode`] did not write.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let header: Header = serde_json::from_slice(&bytes[..nl]).ok()?;
        let mut key = [0u8; 32];
        if header.k.len() != 64 {
            return None;
        }
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(header.k.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let body = &bytes[nl + 1..];
        if body.len() != header.n {
            return None;
        }
        Some(Entry {
            key,
            expires_ms: header.exp,
            content_type: header.ct,
            provider: header.p,
            model: header.m,
            body: body.to_vec(),
        })
    }
}

/// Whether `body`, as the caller got it, is a whole answer worth replaying.
pub fn whole_answer(caller: Schema, stream: bool, body: &[u8]) -> bool {
    if !stream {
        return matches!(
            serde_json::from_slice::<serde_json::Value>(body),
            Ok(serde_json::Value::Object(ref o)) if !o.contains_key("error")
        );
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    fn data(line: &str) -> Option<&str> {
        line.strip_prefix("data:").map(str::trim_start)
    }
    let events = || text.lines().map(str::trim_end);
    let error_data = events().any(|l| data(l).is_some_and(|d| d.starts_with("{\"error\"")));
    match caller {
        // Ends with its own end marker, and no error on the way.
        Schema::OpenAi => !error_data && events().rfind(|l| !l.is_empty()) == Some("data: [DONE]"),
        Schema::Anthropic => {
            !error_data
                && events().any(|l| l == "event: message_stop")
                && !events().any(|l| l == "event: error")
        }
        // No end marker: the last chunk says why the answer finished.
        Schema::Gemini => {
            !error_data
                && events()
                    .rev()
                    .find_map(data)
                    .is_some_and(|d| d.contains("\"finishReason\""))
        }
        Schema::Converse | Schema::Responses => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_as_written() {
        let e = Entry {
            key: [7; 32],
            expires_ms: 123,
            content_type: "text/event-stream".into(),
            provider: "openai".into(),
            model: "gpt-4o".into(),
            body: b"data: x\n\nwith\nnewlines".to_vec(),
        };
        let bytes = e.encode();
        assert_eq!(Entry::decode(&bytes), Some(e));
        assert_eq!(Entry::decode(&bytes[..bytes.len() - 1]), None, "cut short");
        assert_eq!(Entry::decode(b"garbage"), None);
        assert_eq!(Entry::decode(b"{\"k\":\"zz\"}\nbody"), None);
    }

    #[test]
    fn whole_answers_by_api() {
        assert!(whole_answer(
            Schema::OpenAi,
            false,
            br#"{"id":"x","choices":[]}"#
        ));
        assert!(!whole_answer(
            Schema::OpenAi,
            false,
            br#"{"error":{"message":"m"}}"#
        ));
        assert!(!whole_answer(Schema::OpenAi, false, b"{\"id\":"));

        let ok = "data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert!(whole_answer(Schema::OpenAi, true, ok.as_bytes()));
        let cut = "data: {\"choices\":[]}\n\n";
        assert!(!whole_answer(Schema::OpenAi, true, cut.as_bytes()));
        let failed = "data: {\"choices\":[]}\n\ndata: {\"error\":{}}\n\ndata: [DONE]\n\n";
        assert!(!whole_answer(Schema::OpenAi, true, failed.as_bytes()));

        let a = "event: message_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\n";
        assert!(whole_answer(Schema::Anthropic, true, a.as_bytes()));
        let a_err = "event: message_start\ndata: {}\n\nevent: error\ndata: {}\n\n";
        assert!(!whole_answer(Schema::Anthropic, true, a_err.as_bytes()));

        let g = "data: {\"candidates\":[{}]}\r\n\r\ndata: {\"candidates\":[{\"finishReason\":\"STOP\"}]}\r\n\r\n";
        assert!(whole_answer(Schema::Gemini, true, g.as_bytes()));
        let g_cut = "data: {\"candidates\":[{}]}\n\n";
        assert!(!whole_answer(Schema::Gemini, true, g_cut.as_bytes()));
        assert!(!whole_answer(Schema::Responses, true, ok.as_bytes()));
    }
}
