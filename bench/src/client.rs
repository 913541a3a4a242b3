//! The clients: one connection in a closed loop for latency (concurrency 1),
//! a streaming client that times every event, and a saturating load of many
//! closed-loop connections for throughput.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::wire::{find, Conn};

/// One request, built once and written as is every time.
pub struct Request {
    pub addr: String,
    pub bytes: Vec<u8>,
}

/// A chat request of about `size` bytes in the caller's API shape: one user
/// message of ordinary prose with escaped newlines, as a prompt looks.
pub fn chat_body(api: &str, model: &str, size: usize, stream: bool) -> Vec<u8> {
    let (head, tail) = match api {
        "anthropic" => (
            format!(
                r#"{{"model":"{model}","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":""#
            ),
            r#""}]}"#.to_string(),
        ),
        _ => (
            format!(
                r#"{{"model":"{model}","stream":{stream},"max_tokens":64,"temperature":0.2,"messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":""#
            ),
            r#""}]}"#.to_string(),
        ),
    };
    let line = "The quick brown fox jumps over the lazy dog; \\\"quoted\\\" text.\\n";
    let mut body = head.into_bytes();
    let want = size.saturating_sub(tail.len());
    while body.len() < want {
        let room = want - body.len();
        if room >= line.len() {
            body.extend_from_slice(line.as_bytes());
        } else {
            body.extend(std::iter::repeat_n(b'x', room));
        }
    }
    body.extend_from_slice(tail.as_bytes());
    body
}

pub fn build_request(addr: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Request {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nhost: llm.bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (name, value) in headers {
        bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(body);
    Request {
        addr: addr.to_string(),
        bytes,
    }
}

/// Sorted samples in microseconds and their summary.
pub struct Summary {
    sorted: Vec<f64>,
}

impl Summary {
    pub fn new(mut samples: Vec<f64>) -> Summary {
        samples.sort_by(f64::total_cmp);
        Summary { sorted: samples }
    }

    /// Nearest-rank percentile; 0 without samples.
    pub fn pct(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn json(&self) -> String {
        let mean = if self.sorted.is_empty() {
            0.0
        } else {
            self.sorted.iter().sum::<f64>() / self.sorted.len() as f64
        };
        format!(
            r#"{{"count":{},"p50_us":{:.1},"p90_us":{:.1},"p99_us":{:.1},"mean_us":{:.1},"min_us":{:.1},"max_us":{:.1}}}"#,
            self.sorted.len(),
            self.pct(50.0),
            self.pct(90.0),
            self.pct(99.0),
            mean,
            self.pct(0.0),
            self.sorted.last().copied().unwrap_or(0.0)
        )
    }
}

fn micros(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Sends the request and reads the whole response; returns its status.
fn exchange(conn: &mut Conn, request: &Request) -> io::Result<u16> {
    conn.write_all(&request.bytes)?;
    let head = conn
        .read_head()?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a reply"))?;
    conn.read_body(&head)?;
    Ok(head.status())
}

/// Latency at concurrency 1 over one keep-alive connection. Any status but
/// 200 is an error: a benchmark of refusals measures nothing.
pub fn latency(request: &Request, warmup: usize, count: usize) -> io::Result<String> {
    let mut conn = Conn::connect(&request.addr)?;
    for _ in 0..warmup {
        check(exchange(&mut conn, request)?)?;
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let status = exchange(&mut conn, request)?;
        samples.push(micros(start.elapsed()));
        check(status)?;
    }
    Ok(Summary::new(samples).json())
}

fn check(status: u16) -> io::Result<()> {
    if status == 200 {
        Ok(())
    } else {
        Err(io::Error::other(format!("status {status}")))
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The mock's stamp in an event (`@<ns>`), if it carries one.
fn stamp_of(event: &[u8]) -> Option<u128> {
    let at = find(event, b"@")?;
    let digits: Vec<u8> = event[at + 1..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Streams at concurrency 1. For each event the mock stamped: how long it
/// took from the mock's write to the client's read (`event_delay`), and the
/// time to the first stamped event (`ttfb`, from sending the request). An
/// event that arrives more than half a gap late was held back.
pub fn stream(request: &Request, warmup: usize, count: usize, gap_us: f64) -> io::Result<String> {
    let mut conn = Conn::connect(&request.addr)?;
    let mut ttfb = Vec::with_capacity(count);
    let mut delays = Vec::new();
    let mut held_back = 0usize;
    let mut stamped = 0usize;
    for round in 0..warmup + count {
        let measured = round >= warmup;
        let start = Instant::now();
        conn.write_all(&request.bytes)?;
        let head = conn
            .read_head()?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed"))?;
        check(head.status())?;
        if !head.is_chunked() {
            // An error or an unstreamed answer: nothing to time.
            conn.read_body(&head)?;
            return Err(io::Error::other("the answer was not streamed"));
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut first: Option<Duration> = None;
        conn.stream_body(|data, at| {
            let arrived_ns = now_ns() - at.elapsed().as_nanos();
            pending.extend_from_slice(data);
            while let Some(end) = find(&pending, b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let Some(sent) = stamp_of(&event) else {
                    continue;
                };
                if first.is_none() {
                    first = Some(at - start);
                }
                if measured {
                    let delay = arrived_ns.saturating_sub(sent) as f64 / 1000.0;
                    stamped += 1;
                    if delay > gap_us / 2.0 {
                        held_back += 1;
                    }
                    delays.push(delay);
                }
            }
        })?;
        if measured {
            ttfb.push(micros(first.unwrap_or_default()));
        }
    }
    Ok(format!(
        r#"{{"ttfb":{},"event_delay":{},"events":{},"held_back":{}}}"#,
        Summary::new(ttfb).json(),
        Summary::new(delays).json(),
        stamped,
        held_back
    ))
}

/// Saturating load: `connections` closed loops until `total` requests have
/// been answered (or `duration` has passed, when `total` is 0).
pub fn load(
    request: Arc<Request>,
    connections: usize,
    total: u64,
    duration: Duration,
) -> io::Result<String> {
    let issued = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (request, issued, ok, failed, stop) = (
                request.clone(),
                issued.clone(),
                ok.clone(),
                failed.clone(),
                stop.clone(),
            );
            thread::spawn(move || {
                let mut conn = None;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if total > 0 && issued.fetch_add(1, Ordering::Relaxed) >= total {
                        return;
                    }
                    if conn.is_none() {
                        conn = Conn::connect(&request.addr).ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    match exchange(c, &request) {
                        Ok(200) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                    }
                }
            })
        })
        .collect();
    if total == 0 {
        thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
    }
    for w in workers {
        let _ = w.join();
    }
    let seconds = start.elapsed().as_secs_f64();
    let answered = ok.load(Ordering::Relaxed);
    Ok(format!(
        r#"{{"ok":{},"failed":{},"seconds":{:.3},"rps":{:.1}}}"#,
        answered,
        failed.load(Ordering::Relaxed),
        seconds,
        answered as f64 / seconds
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body_has_the_size_asked_and_is_json_shaped() {
        for size in [1024, 100 * 1024, 1024 * 1024] {
            let body = chat_body("openai", "mini", size, false);
            assert_eq!(body.len(), size);
            assert!(body.starts_with(br#"{"model":"mini","stream":false"#));
            assert!(body.ends_with(br#""}]}"#));
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = Summary::new((1..=100).map(f64::from).collect());
        assert_eq!(s.pct(50.0), 50.0);
        assert_eq!(s.pct(99.0), 99.0);
        assert_eq!(s.pct(0.0), 1.0);
    }

    #[test]
    fn stamps_are_read_from_events() {
        assert_eq!(
            stamp_of(b"data: {\"delta\":{\"content\":\"@1234 \"}}\n\n"),
            Some(1234)
        );
        assert_eq!(stamp_of(b"data: [DONE]\n\n"), None);
    }
}
