//! `multipart/form-data` bodies (file uploads: audio to transcribe, images
//! to edit), read only as far as routing needs: each part's name and where
//! its value lies, so `model` can be read and rewritten in place without
//! copying the upload.

use std::ops::Range;

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    pub name: &'a str,
    /// The part is an uploaded file.
    pub file: bool,
    /// Where the value's bytes are in the body.
    pub value: Range<usize>,
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = *needle.first()?;
    let mut at = from;
    while at + needle.len() <= haystack.len() {
        let rel = haystack.get(at..)?.iter().position(|&b| b == first)?;
        at += rel;
        if haystack.get(at..at + needle.len()) == Some(needle) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// A `name="value"` parameter of a Content-Disposition header.
fn parameter<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    header.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().trim_matches('"'))
    })
}

/// The parts of a form body, its boundary read from its first line (what
/// every SDK sends: no preamble). None when the body is not such a form.
pub fn parts(body: &[u8]) -> Option<Vec<Part<'_>>> {
    let line_end = find(body, b"\r\n", 0)?;
    let opening = body.get(..line_end)?;
    if !opening.starts_with(b"--") || opening.len() < 3 || opening.len() > 74 {
        return None;
    }
    let mut delimiter = b"\r\n".to_vec();
    delimiter.extend_from_slice(opening);
    let mut out = Vec::new();
    let mut at = line_end + 2;
    loop {
        let headers_end = find(body, b"\r\n\r\n", at)?;
        let headers = std::str::from_utf8(body.get(at..headers_end)?).ok()?;
        let start = headers_end + 4;
        let end = find(body, &delimiter, start)?;
        let disposition = headers.split("\r\n").find(|h| {
            h.get(..20)
                .is_some_and(|n| n.eq_ignore_ascii_case("content-disposition:"))
        })?;
        out.push(Part {
            name: parameter(disposition, "name")?,
            file: parameter(disposition, "filename").is_some(),
            value: start..end,
        });
        let after = end + delimiter.len();
        match body.get(after..after + 2)? {
            b"--" => return Some(out),
            b"\r\n" => at = after + 2,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &[u8] = b"--xyz\r\n\
        Content-Disposition: form-data; name=\"model\"\r\n\r\n\
        whisper\r\n\
        --xyz\r\n\
        Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
        Content-Type: audio/wav\r\n\r\n\
        RIFF\r\n--x\0\xff\r\n\
        --xyz--\r\n";

    #[test]
    fn reads_names_and_value_spans() {
        let parts = parts(FORM).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "model");
        assert!(!parts[0].file);
        assert_eq!(&FORM[parts[0].value.clone()], b"whisper");
        assert_eq!(parts[1].name, "file");
        assert!(parts[1].file);
        // A file may hold anything, even what looks like a shorter boundary.
        assert_eq!(&FORM[parts[1].value.clone()], b"RIFF\r\n--x\0\xff");
    }

    #[test]
    fn what_is_not_a_form_is_none() {
        for body in [
            &b"{\"model\":\"m\"}"[..],
            b"",
            b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunterminated",
            b"--xyz\r\nX-Other: 1\r\n\r\nv\r\n--xyz--",
        ] {
            assert_eq!(parts(body), None, "{:?}", String::from_utf8_lossy(body));
        }
    }
}
