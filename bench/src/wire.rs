//! Just enough HTTP/1.1 for the benchmark: keep-alive connections, bodies
//! with a content-length or chunked, and an incremental chunked decoder so a
//! streaming client can time every byte as it arrives.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// A request or response head: the first line and lower-cased headers.
pub struct Head {
    pub first_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The status code of a response head (0 when unreadable).
    pub fn status(&self) -> u16 {
        self.first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
}

/// A connection with its read buffer: data is `buf[start..end]`; the
/// buffer is zeroed once when it grows, never per read.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl Conn {
    pub fn new(stream: TcpStream) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        })
    }

    pub fn connect(addr: &str) -> io::Result<Conn> {
        Conn::new(TcpStream::connect(addr)?)
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes into the buffer; Ok(0) at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        if self.buf.len() - self.end < 16 * 1024 {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < 16 * 1024 {
                let grown = self.buf.len() * 2;
                self.buf.resize(grown, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// The next head; None when the peer closed cleanly between messages.
    pub fn read_head(&mut self) -> io::Result<Option<Head>> {
        loop {
            if let Some(end) = find(self.buffered(), b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.buffered()[..end]).into_owned();
                self.consume(end + 4);
                let mut lines = text.split("\r\n");
                let first_line = lines.next().unwrap_or_default().to_string();
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                return Ok(Some(Head {
                    first_line,
                    headers,
                }));
            }
            if self.fill()? == 0 {
                return if self.buffered().is_empty() {
                    Ok(None)
                } else {
                    Err(invalid("connection closed inside a head"))
                };
            }
        }
    }

    /// The whole body of a message with this head.
    pub fn read_body(&mut self, head: &Head) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        self.each_body_piece(head, |piece| body.extend_from_slice(piece))?;
        Ok(body)
    }

    /// Reads and drops the body of a message with this head, without
    /// copying it (a 1 MB request costs the mock one pass over the socket).
    pub fn discard_body(&mut self, head: &Head) -> io::Result<()> {
        self.each_body_piece(head, |_| {})
    }

    /// Hands the body of a message with this head to `on_piece` as it is
    /// read, content-length or chunked.
    fn each_body_piece(&mut self, head: &Head, mut on_piece: impl FnMut(&[u8])) -> io::Result<()> {
        if head.is_chunked() {
            let mut decoder = Chunked::default();
            let mut piece = Vec::new();
            loop {
                piece.clear();
                let used = decoder.feed(self.buffered(), &mut piece)?;
                on_piece(&piece);
                self.consume(used);
                if decoder.done() {
                    return Ok(());
                }
                if self.fill()? == 0 {
                    return Err(invalid("connection closed inside a chunked body"));
                }
            }
        }
        let mut left = head.content_length().unwrap_or(0);
        loop {
            let take = left.min(self.buffered().len());
            on_piece(&self.buffered()[..take]);
            self.consume(take);
            left -= take;
            if left == 0 {
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(invalid("connection closed inside a body"));
            }
        }
    }

    /// Reads a chunked body as it arrives, handing each piece of decoded
    /// data to `on_data` with the time the read that carried it returned.
    pub fn stream_body(&mut self, mut on_data: impl FnMut(&[u8], Instant)) -> io::Result<()> {
        let mut decoder = Chunked::default();
        let mut data = Vec::new();
        let mut at = Instant::now();
        loop {
            data.clear();
            let used = decoder.feed(self.buffered(), &mut data)?;
            self.consume(used);
            if !data.is_empty() {
                on_data(&data, at);
            }
            if decoder.done() {
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(invalid("connection closed inside a stream"));
            }
            at = Instant::now();
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An incremental decoder of `Transfer-Encoding: chunked`.
#[derive(Default)]
struct Chunked {
    /// Data bytes left in the current chunk (plus its CRLF once data ends).
    remaining: usize,
    in_data: bool,
    finished: bool,
}

impl Chunked {
    fn done(&self) -> bool {
        self.finished
    }

    /// Decodes what it can of `input` into `out`; returns the bytes used.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
        let mut pos = 0;
        while !self.finished {
            if self.in_data {
                let take = self.remaining.min(input.len() - pos);
                out.extend_from_slice(&input[pos..pos + take]);
                pos += take;
                self.remaining -= take;
                if self.remaining > 0 {
                    return Ok(pos);
                }
                if input.len() - pos < 2 {
                    return Ok(pos);
                }
                pos += 2; // the CRLF after the data
                self.in_data = false;
                continue;
            }
            let Some(eol) = find(&input[pos..], b"\r\n") else {
                return Ok(pos);
            };
            let line = std::str::from_utf8(&input[pos..pos + eol])
                .map_err(|_| invalid("chunk size is not text"))?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| invalid("chunk size is not hex"))?;
            if size == 0 {
                // The last chunk: its (empty) trailer ends with one more CRLF.
                let Some(end) = find(&input[pos..], b"\r\n\r\n") else {
                    return Ok(pos);
                };
                pos += end + 4;
                self.finished = true;
                return Ok(pos);
            }
            pos += eol + 2;
            self.remaining = size;
            self.in_data = true;
        }
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_decoder_handles_pieces_split_anywhere() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let mut d = Chunked::default();
            let mut out = Vec::new();
            let mut pending = wire[..split].to_vec();
            let used = d.feed(&pending, &mut out).unwrap();
            pending.drain(..used);
            pending.extend_from_slice(&wire[split..]);
            let used = d.feed(&pending, &mut out).unwrap();
            assert_eq!(used, pending.len(), "split at {split}");
            assert!(d.done());
            assert_eq!(out, b"hello, world");
        }
    }

    #[test]
    fn head_status_and_headers() {
        let head = Head {
            first_line: "HTTP/1.1 429 Too Many Requests".into(),
            headers: vec![("transfer-encoding".into(), "chunked".into())],
        };
        assert_eq!(head.status(), 429);
        assert!(head.is_chunked());
        assert_eq!(head.content_length(), None);
    }
}
