//! meshllm's benchmark tool: the mock provider and the clients that
//! `bench/run.py` drives. Standard library only, so it builds offline in
//! seconds and costs the measured machine as little as possible.
//!
//!   meshllm-bench mock [--port P]
//!   meshllm-bench latency --addr A --path P [--api openai|anthropic] --model M
//!                 --size BYTES [--requests N] [--warmup N] [--header k:v]...
//!   meshllm-bench stream  ... [--events N] [--gap-us G]
//!   meshllm-bench load    ... [--connections C] (--total N | --seconds S)
//!
//! Every client prints one JSON object on stdout.

mod client;
mod mock;
mod wire;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

struct Args {
    values: HashMap<String, String>,
    headers: Vec<(String, String)>,
}

impl Args {
    fn parse(raw: &[String]) -> Result<Args, String> {
        let mut values = HashMap::new();
        let mut headers = Vec::new();
        let mut it = raw.iter();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {flag}"))?;
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            if name == "header" {
                let (n, v) = value
                    .split_once(':')
                    .ok_or_else(|| format!("--header {value}: want name:value"))?;
                headers.push((n.trim().to_string(), v.trim().to_string()));
            } else {
                values.insert(name.to_string(), value.clone());
            }
        }
        Ok(Args { values, headers })
    }

    fn str(&self, name: &str, default: Option<&str>) -> Result<String, String> {
        self.values
            .get(name)
            .cloned()
            .or(default.map(str::to_string))
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name} {v}: not a number")),
        }
    }
}

fn run(argv: &[String]) -> Result<(), String> {
    let (command, rest) = argv.split_first().ok_or("usage: see bench/README.md")?;
    let args = Args::parse(rest)?;
    if command == "mock" {
        return mock::serve(args.num("port", 0)?).map_err(|e| e.to_string());
    }
    let events: usize = args.num("events", 20)?;
    let streaming = command == "stream";
    let mut headers = args.headers.clone();
    if streaming {
        headers.push(("x-bench-stream".into(), events.to_string()));
        headers.push(("x-bench-gap-us".into(), args.str("gap-us", Some("1000"))?));
    }
    let body = client::chat_body(
        &args.str("api", Some("openai"))?,
        &args.str("model", None)?,
        args.num("size", 1024)?,
        streaming,
    );
    let request = client::build_request(
        &args.str("addr", None)?,
        &args.str("path", Some("/v1/chat/completions"))?,
        &headers,
        &body,
    );
    let requests: usize = args.num("requests", 2000)?;
    let warmup: usize = args.num("warmup", 200)?;
    let out = match command.as_str() {
        "latency" => client::latency(&request, warmup, requests),
        "stream" => client::stream(&request, warmup, requests, args.num("gap-us", 1000.0)?),
        "load" => client::load(
            Arc::new(request),
            args.num("connections", 16)?,
            args.num("total", 0)?,
            Duration::from_secs_f64(args.num("seconds", 5.0)?),
        ),
        other => return Err(format!("unknown command {other}")),
    }
    .map_err(|e| e.to_string())?;
    println!("{out}");
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshllm-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
