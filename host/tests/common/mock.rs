//! A mock of the AI providers' HTTP APIs on 127.0.0.1 (an ephemeral port), for driving the
//! real CLIs: Gemini `streamGenerateContent?alt=sse`, OpenAI chat completions (streaming and
//! not), OpenAI Responses over SSE, Anthropic messages over SSE. It answers with a text and
//! token usage the test chooses, or fails (429 with Retry-After, 401, 500), or stalls.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// What the mock does with the next requests.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Answer `text`, reporting this usage.
    Answer { text: String, input_tokens: u64, output_tokens: u64 },
    /// Fail the next `times` model requests with `status` (429 carries `Retry-After: 1`),
    /// then answer as `then`.
    Fail { status: u16, times: usize, then: Box<Mode> },
    /// Read the request and never answer.
    Stall,
}

impl Mode {
    pub fn answer(text: &str) -> Mode {
        Mode::Answer { text: text.into(), input_tokens: 123, output_tokens: 45 }
    }

    pub fn fail(status: u16) -> Mode {
        Mode::Fail { status, times: usize::MAX, then: Box::new(Mode::answer("unused")) }
    }

    pub fn fail_then_answer(status: u16, times: usize, text: &str) -> Mode {
        Mode::Fail { status, times, then: Box::new(Mode::answer(text)) }
    }
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub body: String,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

struct Shared {
    mode: Mode,
    received: Vec<Received>,
}

/// The running mock; it stops with the test process.
pub struct Mock {
    port: u16,
    shared: Arc<Mutex<Shared>>,
}

/// A base URL where nothing listens (connection refused).
pub fn down_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

impl Mock {
    pub fn start(mode: Mode) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the mock");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared { mode, received: Vec::new() }));
        let for_thread = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = for_thread.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        Mock { port, shared }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, mode: Mode) {
        self.shared.lock().unwrap().mode = mode;
    }

    /// The model requests received (not preconnects or metadata look-ups).
    pub fn model_requests(&self) -> Vec<Received> {
        self.shared.lock().unwrap().received.iter().filter(|r| is_model_call(&r.path)).cloned().collect()
    }
}

fn is_model_call(path: &str) -> bool {
    path.contains(":streamGenerateContent")
        || path.contains(":generateContent")
        || path.starts_with("/v1/chat/completions")
        || path.starts_with("/v1/responses")
        || path.starts_with("/v1/messages")
}

fn serve(stream: TcpStream, shared: &Mutex<Shared>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
        let body = if chunked { read_chunked(&mut reader)? } else {
            let mut body = vec![0; length];
            reader.read_exact(&mut body)?;
            body
        };
        let received = Received { method: method.clone(), path: path.clone(), body: String::from_utf8_lossy(&body).into_owned() };
        let model_call = is_model_call(&path) && method == "POST";
        let mode = {
            let mut s = shared.lock().unwrap();
            s.received.push(received.clone());
            let mode = s.mode.clone();
            if model_call
                && let Mode::Fail { status, times, then } = &s.mode
            {
                let next = if *times <= 1 { (**then).clone() } else { Mode::Fail { status: *status, times: times - 1, then: then.clone() } };
                s.mode = next;
            }
            mode
        };
        if !model_call {
            let (status, body) = match (method.as_str(), path.as_str()) {
                ("HEAD", _) => (200, String::new()),
                (_, p) if p.starts_with("/v1/models") => (200, json!({"object": "list", "data": []}).to_string()),
                (_, p) if p.contains(":countTokens") => (200, json!({"totalTokens": 10}).to_string()),
                _ => (404, json!({"error": {"message": "not found (mock)"}}).to_string()),
            };
            respond(&mut stream, status, "application/json", &[], body.as_bytes())?;
            continue;
        }
        match mode {
            Mode::Stall => {
                std::thread::sleep(Duration::from_secs(120));
                return Ok(());
            }
            Mode::Fail { status, .. } => {
                let extra: &[(&str, &str)] = if status == 429 { &[("Retry-After", "1")] } else { &[] };
                respond(&mut stream, status, "application/json", extra, error_body(&path, status).as_bytes())?;
            }
            Mode::Answer { text, input_tokens, output_tokens } => {
                let request = received.json();
                let (content_type, body) = answer(&path, &request, &text, input_tokens, output_tokens);
                respond(&mut stream, 200, content_type, &[], body.as_bytes())?;
            }
        }
    }
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        let mut chunk = vec![0; n + 2];
        reader.read_exact(&mut chunk)?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

fn respond(stream: &mut TcpStream, status: u16, content_type: &str, extra: &[(&str, &str)], body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn message_for(status: u16) -> &'static str {
    match status {
        429 => "Rate limit reached for requests (mock)",
        401 => "Invalid API key provided (mock)",
        _ => "Internal server error (mock)",
    }
}

fn error_body(path: &str, status: u16) -> String {
    let message = message_for(status);
    if path.starts_with("/v1beta/") {
        let state = match status {
            429 => "RESOURCE_EXHAUSTED",
            401 => "UNAUTHENTICATED",
            _ => "INTERNAL",
        };
        json!({"error": {"code": status, "message": message, "status": state}}).to_string()
    } else if path.starts_with("/v1/messages") {
        let kind = match status {
            429 => "rate_limit_error",
            401 => "authentication_error",
            _ => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
    } else {
        let (kind, code) = match status {
            429 => ("requests", "rate_limit_exceeded"),
            401 => ("invalid_request_error", "invalid_api_key"),
            _ => ("server_error", "server_error"),
        };
        json!({"error": {"message": message, "type": kind, "code": code}}).to_string()
    }
}

fn sse(events: &[(Option<&str>, Value)]) -> String {
    let mut out = String::new();
    for (event, data) in events {
        if let Some(event) = event {
            out.push_str(&format!("event: {event}\n"));
        }
        out.push_str(&format!("data: {data}\n\n"));
    }
    out
}

/// A successful answer in the API's own shape.
fn answer(path: &str, request: &Value, text: &str, input: u64, output: u64) -> (&'static str, String) {
    let model = request["model"].as_str().unwrap_or("mock-model").to_string();
    if path.starts_with("/v1beta/models/") {
        let model = path.trim_start_matches("/v1beta/models/").split(':').next().unwrap_or("gemini").to_string();
        let chunk = json!({
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": input, "candidatesTokenCount": output, "totalTokenCount": input + output},
            "modelVersion": model,
        });
        if path.contains(":streamGenerateContent") {
            return ("text/event-stream", sse(&[(None, chunk)]));
        }
        return ("application/json", chunk.to_string());
    }
    if path.starts_with("/v1/chat/completions") {
        let usage = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output});
        if request["stream"].as_bool() == Some(true) {
            let mut out = sse(&[
                (None, json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": null}]})),
                (None, json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
                (None, json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [], "usage": usage})),
            ]);
            out.push_str("data: [DONE]\n\n");
            return ("text/event-stream", out);
        }
        let body = json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": usage});
        return ("application/json", body.to_string());
    }
    if path.starts_with("/v1/responses") {
        let item = json!({"id": "msg_mock", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]});
        let response = |status: &str, output: Value, usage: Value| json!({"id": "resp_mock", "object": "response", "created_at": 1,
            "status": status, "model": model, "output": output, "usage": usage});
        let usage = json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input + output});
        let body = sse(&[
            (Some("response.created"), json!({"type": "response.created", "sequence_number": 0, "response": response("in_progress", json!([]), Value::Null)})),
            (Some("response.output_item.added"), json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
                "item": {"id": "msg_mock", "type": "message", "role": "assistant", "status": "in_progress", "content": []}})),
            (Some("response.output_text.delta"), json!({"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_mock",
                "output_index": 0, "content_index": 0, "delta": text})),
            (Some("response.output_item.done"), json!({"type": "response.output_item.done", "sequence_number": 3, "output_index": 0, "item": item})),
            (Some("response.completed"), json!({"type": "response.completed", "sequence_number": 4, "response": response("completed", json!([item]), usage)})),
        ]);
        return ("text/event-stream", body);
    }
    // Anthropic messages.
    let body = sse(&[
        (Some("message_start"), json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})),
        (Some("content_block_start"), json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        (Some("content_block_delta"), json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})),
        (Some("content_block_stop"), json!({"type": "content_block_stop", "index": 0})),
        (Some("message_delta"), json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": output}})),
        (Some("message_stop"), json!({"type": "message_stop"})),
    ]);
    ("text/event-stream", body)
}
