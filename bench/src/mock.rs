//! The mock provider: answers OpenAI chat completions and Anthropic messages
//! from canned bytes, a thread per connection, so that it is never what the
//! benchmark measures.
//!
//! A request header `x-bench-stream: <events>` asks for a stream of that many
//! content events, `x-bench-gap-us` apart. Each event's text is `@<ns>`, the
//! wall-clock time the mock wrote it, so a client can tell how long every
//! event spent on the way, translation included.

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::wire::Conn;

const OPENAI_REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark's mock provider.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":9,"total_tokens":259},"system_fingerprint":"fp_bench"}"#;

const ANTHROPIC_REPLY: &str = r#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello from the benchmark's mock provider."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":250,"output_tokens":9}}"#;

pub fn serve(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    // The orchestrator reads the port from the first line.
    println!("{}", listener.local_addr()?.port());
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            // A peer that goes away ends its connection; nothing else to do.
            let _ = handle(stream);
        });
    }
    Ok(())
}

fn handle(stream: TcpStream) -> io::Result<()> {
    let mut conn = Conn::new(stream)?;
    let mut out = Vec::with_capacity(4096);
    while let Some(head) = conn.read_head()? {
        conn.discard_body(&head)?;
        let path = head.first_line.split(' ').nth(1).unwrap_or("/");
        let anthropic = path.starts_with("/v1/messages");
        let events: usize = head
            .header("x-bench-stream")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.clear();
        if events == 0 {
            let body = if anthropic {
                ANTHROPIC_REPLY
            } else {
                OPENAI_REPLY
            };
            write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                body.len(),
                body
            )?;
            conn.write_all(&out)?;
            continue;
        }
        let gap = Duration::from_micros(
            head.header("x-bench-gap-us")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000),
        );
        stream_reply(&mut conn, anthropic, events, gap)?;
    }
    Ok(())
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Writes one HTTP chunk holding one SSE event, stamped just before writing.
fn send_event(conn: &mut Conn, event: &str) -> io::Result<()> {
    let chunk = format!("{:x}\r\n{}\r\n", event.len(), event);
    conn.write_all(chunk.as_bytes())
}

fn stream_reply(conn: &mut Conn, anthropic: bool, events: usize, gap: Duration) -> io::Result<()> {
    conn.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
    )?;
    if anthropic {
        send_event(
            conn,
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_bench\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":250,\"output_tokens\":1}}}\n\n",
        )?;
        send_event(
            conn,
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        )?;
    }
    for i in 0..events {
        if i > 0 {
            thread::sleep(gap);
        }
        let stamp = now_ns();
        let event = if anthropic {
            format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"@{stamp} \"}}}}\n\n")
        } else {
            format!("data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"@{stamp} \"}},\"finish_reason\":null}}]}}\n\n")
        };
        send_event(conn, &event)?;
    }
    let tokens = events + 1;
    if anthropic {
        send_event(
            conn,
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        )?;
        send_event(
            conn,
            &format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{tokens}}}}}\n\n"),
        )?;
        send_event(
            conn,
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        )?;
    } else {
        send_event(
            conn,
            "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        )?;
        send_event(
            conn,
            &format!("data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{{\"prompt_tokens\":250,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\n", 250 + tokens),
        )?;
        send_event(conn, "data: [DONE]\n\n")?;
    }
    conn.write_all(b"0\r\n\r\n")
}
