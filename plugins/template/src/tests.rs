//! Specifications of the template plugin's argument building and failure classification.

use super::*;
use exechost_plugin_sdk::File;

fn service(settings: &str) -> Service {
    Service {
        name: "svc".into(),
        command: "prog".into(),
        default_model: None,
        models: Vec::new(),
        settings: settings.into(),
    }
}

fn request(prompt: &str) -> Request {
    Request { prompt: prompt.into(), files: Vec::new(), model: None, options: Vec::new() }
}

fn args(settings: &str, request: &Request) -> Vec<String> {
    Template::build_command(service(settings), request.clone()).expect("builds").args
}

fn failed(code: i32, stderr: &str) -> Failure {
    let output = Output {
        status: ExitStatus::Code(code),
        stdout: Vec::new(),
        stderr: stderr.as_bytes().to_vec(),
        duration_ms: 5,
        stdout_truncated: false,
        stderr_truncated: false,
    };
    Template::parse_output(service("{}"), request("p"), output).expect_err("fails")
}

#[test]
fn the_prompt_is_one_argument_whatever_it_holds() {
    let nasty = "a b\n'c' \"d\" $(rm -rf /) `x` {files} {model} -- --flag";
    let got = args(r#"{"template": "{command} -p {prompt} --x"}"#, &request(nasty));
    assert_eq!(got, vec!["-p".to_string(), nasty.to_string(), "--x".to_string()]);
}

#[test]
fn files_expand_to_one_argument_each_with_the_prefix() {
    let mut req = request("hi");
    req.files = ["/a b.txt", "/c.txt"].iter().map(|p| File { path: p.to_string(), contents: None }).collect();
    let got = args(r#"{"template": "{command} {prompt} {files}", "file_prefix": "@"}"#, &req);
    assert_eq!(got, vec!["hi", "@/a b.txt", "@/c.txt"]);
}

#[test]
fn an_absent_model_drops_its_token_and_the_model_flag() {
    let settings = r#"{"template": "{command} -p {prompt} --model {model}", "model_flag": "--model"}"#;
    assert_eq!(args(settings, &request("q")), vec!["-p", "q"]);
    let mut req = request("q");
    req.model = Some("m1".into());
    assert_eq!(args(settings, &req), vec!["-p", "q", "--model", "m1"]);
}

#[test]
fn the_default_model_is_used_when_the_request_names_none() {
    let mut svc = service(r#"{"args": ["{prompt}", "--model={model}"]}"#);
    svc.default_model = Some("dm".into());
    let cmd = Template::build_command(svc, request("q")).unwrap();
    assert_eq!(cmd.args, vec!["q", "--model=dm"]);
}

#[test]
fn stdin_mode_sends_the_prompt_on_stdin() {
    let cmd = Template::build_command(service(r#"{"args": ["-w"], "stdin": "prompt"}"#), request("x y")).unwrap();
    assert_eq!(cmd.args, vec!["-w"]);
    assert_eq!(cmd.stdin.as_deref(), Some(&b"x y"[..]));
}

#[test]
fn a_prompt_too_long_for_one_argument_suggests_stdin() {
    let big = "x".repeat(200 * 1024);
    let err = Template::build_command(service("{}"), request(&big)).unwrap_err();
    assert_eq!(err.kind, FailureKind::InvalidRequest);
    assert!(err.message.contains("stdin = \"prompt\""), "{}", err.message);
}

#[test]
fn files_without_a_files_placeholder_are_refused() {
    let mut req = request("hi");
    req.files.push(File { path: "/x".into(), contents: None });
    let err = Template::build_command(service("{}"), req).unwrap_err();
    assert_eq!(err.kind, FailureKind::InvalidRequest);
}

#[test]
fn unknown_settings_and_placeholders_are_reported() {
    let err = Template::validate(service(r#"{"templat": "x"}"#)).unwrap_err();
    assert!(err.contains("templat"), "{err}");
    let err = Template::validate(service(r#"{"template": "{command} {promt}"}"#)).unwrap_err();
    assert!(err.contains("{promt}"), "{err}");
}

#[test]
fn rate_limit_text_is_classified_with_retry_after() {
    let f = failed(1, "Error: 429 Too Many Requests, retry after 7 seconds");
    assert_eq!(f.kind, FailureKind::RateLimited);
    assert_eq!(f.retry_after_ms, Some(7000));
}

#[test]
fn auth_and_transient_and_other_failures_are_told_apart() {
    assert_eq!(failed(1, "401 Unauthorized").kind, FailureKind::Auth);
    assert_eq!(failed(1, "HTTP 503 Service Unavailable").kind, FailureKind::Transient);
    assert_eq!(failed(3, "something odd").kind, FailureKind::Other);
}

#[test]
fn success_is_stdout_without_its_final_newline() {
    let output = Output {
        status: ExitStatus::Code(0),
        stdout: b"hello\n\xff\n".to_vec(),
        stderr: Vec::new(),
        duration_ms: 1,
        stdout_truncated: false,
        stderr_truncated: false,
    };
    let r = Template::parse_output(service("{}"), request("p"), output).unwrap();
    assert_eq!(r.text, "hello\n\u{fffd}");
    assert!(r.usage.is_none());
}
