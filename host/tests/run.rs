//! `host run`, `host list` and `host check` through the real binary: what reaches the
//! command, what comes back, and the exit codes.

mod common;

use common::{Sandbox, with_stdout_closed};

const ARGV: &str = r#"
[services.argv]
plugin = "template"
command = "@FAKE@"
settings = { args = ["argv", "{prompt}", "{files}", "--model", "{model}"], model_flag = "--model", file_prefix = "@" }
"#;

fn argv_of(run: &common::Run) -> Vec<String> {
    assert_eq!(run.code, 0, "{run:?}");
    let json = run.json();
    serde_json::from_str(json["stdout"].as_str().unwrap()).unwrap()
}

#[test]
fn nasty_prompts_arrive_byte_exact_as_one_argument() {
    let sandbox = Sandbox::new(ARGV);
    let corpus = [
        "",
        " ",
        "plain words",
        "it's \"quoted\" and 'single'",
        "$(touch /tmp/pwned) `touch /tmp/pwned2` ${HOME} $HOME",
        "; rm -rf / && echo owned || true | cat > /etc/passwd",
        "line one\nline two\r\nline three\n",
        "--help",
        "-p",
        "--model=evil",
        "{prompt} {files} {model} {command} {{x}}",
        "*.rs ~ ?? [a-z]",
        "tab\there\x0bvt\x0cff",
        "\u{1b}[31mred\u{1b}[0m",
        "émoji 🦀 العربية 中文",
        "back\\slash \\n not a newline",
        "%s %n %x",
    ];
    for prompt in corpus {
        let run = sandbox.run(&["run", "argv", "--json", "--", prompt]);
        assert_eq!(argv_of(&run), vec![prompt.to_string()], "prompt {prompt:?}");
    }
}

#[test]
fn a_prompt_of_100_kib_is_still_one_argument() {
    let sandbox = Sandbox::new(ARGV);
    let prompt = "word ".repeat(20 * 1024);
    let run = sandbox.run(&["run", "argv", "--json", &prompt]);
    assert_eq!(argv_of(&run), vec![prompt]);
}

#[test]
fn files_and_model_become_arguments() {
    let sandbox = Sandbox::new(ARGV);
    std::fs::write(sandbox.path("a b.txt"), "A").unwrap();
    let run = sandbox.run(&["run", "argv", "--json", "-f", "a b.txt", "-m", "big-model", "hi"]);
    let file = sandbox.path("a b.txt").display().to_string();
    assert_eq!(argv_of(&run), vec!["hi".to_string(), format!("@{file}"), "--model".into(), "big-model".into()]);
    assert_eq!(run.json()["model"], "big-model");
}

#[test]
fn a_missing_file_is_a_usage_error_and_nothing_runs() {
    let sandbox = Sandbox::new(
        r#"
[services.touch]
plugin = "template"
command = "@FAKE@"
settings = { args = ["touch", "@DIR@/ran", "{prompt}", "{files}"] }
"#,
    );
    let run = sandbox.run(&["run", "touch", "-f", "no-such-file.txt", "hi"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("no-such-file.txt"), "{}", run.stderr);
    assert!(!sandbox.path("ran").exists(), "the command must not have run");
}

#[test]
fn the_prompt_dash_is_read_from_stdin() {
    let sandbox = Sandbox::new(ARGV);
    let run = sandbox.run_with_stdin(&["run", "argv", "--json", "-"], "from stdin\n".as_bytes());
    assert_eq!(argv_of(&run), vec!["from stdin\n".to_string()]);
}

#[test]
fn a_prompt_with_a_nul_byte_is_an_invalid_request_and_runs_nothing() {
    let sandbox = Sandbox::new(ARGV);
    let run = sandbox.run_with_stdin(&["run", "argv", "--json", "-"], b"before\0after");
    assert_eq!(run.code, 1, "{run:?}");
    let json = run.json();
    assert_eq!((json["error"]["kind"].as_str(), json["attempts"].as_u64()), (Some("invalid-request"), Some(1)), "{json}");
    assert!(json["error"]["message"].as_str().unwrap().contains("contains a NUL byte"), "{json}");
}

#[test]
fn a_prompt_on_stdin_that_is_not_utf8_is_a_usage_error() {
    let sandbox = Sandbox::new(ARGV);
    let run = sandbox.run_with_stdin(&["run", "argv", "-"], b"\xff\xfe");
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("the prompt on stdin is not UTF-8 text"), "{}", run.stderr);
}

#[test]
fn an_empty_model_is_a_usage_error_not_an_empty_argument() {
    let sandbox = Sandbox::new(ARGV);
    let run = sandbox.run(&["run", "argv", "-m", "", "x"]);
    assert_eq!((run.code, run.stdout.as_str()), (2, ""), "{run:?}");
    assert!(run.stderr.contains("the model name is empty"), "{}", run.stderr);
}

#[test]
fn human_output_is_the_answer_alone_on_stdout() {
    let sandbox = Sandbox::new(common::ECHO);
    let run = sandbox.run(&["run", "echo", "hello there"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "hello there\n");
}

#[test]
fn json_output_has_every_field() {
    let sandbox = Sandbox::new(common::ECHO);
    let run = sandbox.run(&["run", "echo", "--json", "four char"]);
    assert_eq!(run.code, 0, "{run:?}");
    let j = run.json();
    for field in ["service", "success", "text", "model", "tokens", "exit_code", "signal", "duration_ms", "attempts", "truncated", "error", "stdout", "stderr"] {
        assert!(j.get(field).is_some(), "missing {field} in {j}");
    }
    assert_eq!(j["service"], "echo");
    assert_eq!(j["success"], true);
    assert_eq!(j["text"], "four char");
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["attempts"], 1);
    assert_eq!(j["error"], serde_json::Value::Null);
    // "four char" is 9 characters: 3 estimated tokens in, 3 out.
    assert_eq!(j["tokens"]["input"], 3);
    assert_eq!(j["tokens"]["output"], 3);
    assert_eq!(j["tokens"]["total"], 6);
    assert_eq!(j["tokens"]["estimated"], true);
}

#[test]
fn a_rate_limit_is_classified_and_exits_1() {
    let sandbox = Sandbox::new(
        r#"
[services.limited]
plugin = "template"
command = "@FAKE@"
retry = { max_attempts = 1 }
settings = { args = ["fail", "1", "HTTP 429: rate limit exceeded. Retry after 3 seconds. {prompt}"] }
"#,
    );
    let run = sandbox.run(&["run", "limited", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["success"], false);
    assert_eq!(j["exit_code"], 1);
    assert_eq!(j["error"]["kind"], "rate-limited");
    assert_eq!(j["error"]["retry_after_ms"], 3000);
    let human = sandbox.run(&["run", "limited", "x"]);
    assert_eq!(human.code, 1);
    assert_eq!(human.stdout, "");
    assert!(human.stderr.contains("limited failed (rate-limited)"), "{}", human.stderr);
}

#[test]
fn output_that_is_not_utf8_is_kept_lossily() {
    let sandbox = Sandbox::new(
        r#"
[services.bad]
plugin = "template"
command = "@FAKE@"
settings = { args = ["badutf8", "{prompt}"] }
"#,
    );
    let run = sandbox.run(&["run", "bad", "--json", "x"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["text"], "ok \u{fffd}\u{fffd}\u{fffd}( end");
}

#[test]
fn a_missing_command_is_not_installed() {
    let sandbox = Sandbox::new(
        r#"
[services.ghost]
plugin = "template"
command = "exechost-no-such-program"
"#,
    );
    let run = sandbox.run(&["run", "ghost", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["error"]["kind"], "not-installed");
    assert!(j["error"]["message"].as_str().unwrap().contains("exechost-no-such-program"), "{j}");
}

#[test]
fn service_and_plugin_environment_reach_the_command() {
    let sandbox = Sandbox::new(
        r#"
[services.env]
plugin = "@MISBEHAVE@"
command = "@FAKE@"
env = { EXECHOST_SERVICE_VAR = "from-config" }
settings = { args = ["env", "EXECHOST_SERVICE_VAR", "EXECHOST_TEST_VAR"] }
"#,
    );
    // The misbehave plugin sets EXECHOST_TEST_VAR and appends the prompt as an argument.
    let run = sandbox.run(&["run", "env", "--json", "HOME"]);
    assert_eq!(run.code, 0, "{run:?}");
    let vars: serde_json::Value = serde_json::from_str(run.json()["text"].as_str().unwrap()).unwrap();
    assert_eq!(vars["EXECHOST_SERVICE_VAR"], "from-config");
    assert_eq!(vars["EXECHOST_TEST_VAR"], "set-by-plugin");
    assert_eq!(vars["HOME"].as_str(), std::env::var("HOME").ok().as_deref(), "the host's environment is inherited");
}

#[test]
fn an_unknown_service_is_a_usage_error_naming_the_known_ones() {
    let sandbox = Sandbox::new(ARGV);
    let run = sandbox.run(&["run", "nope", "x"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("unknown service `nope`") && run.stderr.contains("argv"), "{}", run.stderr);
}

#[test]
fn list_reports_commands_found_and_auth_env() {
    let sandbox = Sandbox::new(
        r#"
[services.here]
plugin = "template"
command = "echo"
auth_env = "EXECHOST_TEST_KEY_UNSET"

[services.gone]
plugin = "template"
command = "exechost-no-such-program"
models = ["m1", "m2"]
default_model = "m2"
"#,
    );
    let run = sandbox.run(&["list", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let rows = run.json();
    let gone = rows.as_array().unwrap().iter().find(|r| r["name"] == "gone").unwrap();
    assert_eq!(gone["command_path"], serde_json::Value::Null);
    assert_eq!(gone["default_model"], "m2");
    let here = rows.as_array().unwrap().iter().find(|r| r["name"] == "here").unwrap();
    assert!(here["command_path"].as_str().unwrap().ends_with("/echo"));
    assert_eq!(here["auth_env_set"], false);
    let human = sandbox.run(&["list"]);
    assert!(human.stdout.contains("NOT FOUND") && human.stdout.contains("EXECHOST_TEST_KEY_UNSET NOT SET"), "{}", human.stdout);
}

#[test]
fn check_loads_every_plugin_and_fails_on_bad_settings() {
    let sandbox = Sandbox::new(
        r#"
[services.good]
plugin = "template"
command = "echo"

[services.typo]
plugin = "template"
command = "echo"
settings = { templat = "{command} {prompt}" }
"#,
    );
    let run = sandbox.run(&["check"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("ok    good") && run.stdout.contains("template 0.1.0"), "{}", run.stdout);
    assert!(run.stdout.contains("FAIL  typo") && run.stdout.contains("templat"), "{}", run.stdout);
}

#[test]
fn a_reader_that_went_away_ends_the_run_quietly_with_the_services_exit_code() {
    let sandbox = Sandbox::new(common::ECHO);
    for json in [false, true] {
        let args: &[&str] = if json { &["run", "echo", "--json", "hi"] } else { &["run", "echo", "hi"] };
        let (code, stderr) = with_stdout_closed(&sandbox, args);
        assert_eq!((code, stderr.as_str()), (Some(0), ""), "json: {json}");
    }
}

/// Writes the script `exechost-tool` in the sandbox folder `dir`, echoing `says` and its arguments,
/// with permissions `mode`.
fn write_tool(sandbox: &Sandbox, dir: &str, says: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let path = sandbox.path(&format!("{dir}/exechost-tool"));
    common::write_script(&path, &format!("echo {says} \"$@\""));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_command_name_is_looked_up_on_path_past_entries_where_it_is_not_executable() {
    let sandbox = Sandbox::new("[services.tool]\nplugin = \"template\"\ncommand = \"exechost-tool\"\n");
    write_tool(&sandbox, "a", "first", 0o644);
    write_tool(&sandbox, "b", "second", 0o755);
    let path = format!("{}:{}", sandbox.path("a").display(), sandbox.path("b").display());
    let found: common::Run = sandbox.host().env("PATH", &path).args(["--no-state", "run", "tool", "hi"]).output().unwrap().into();
    assert_eq!((found.code, found.stdout.as_str()), (0, "second hi\n"), "{found:?}");

    std::fs::remove_file(sandbox.path("b/exechost-tool")).unwrap();
    let refused: common::Run = sandbox.host().env("PATH", &path).args(["--no-state", "run", "tool", "--json", "hi"]).output().unwrap().into();
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("`exechost-tool` is not executable"), "{refused:?}");
}

#[test]
fn a_command_name_is_looked_up_on_the_services_own_path_when_its_env_sets_one() {
    let sandbox = Sandbox::new("[services.tool]\nplugin = \"template\"\ncommand = \"exechost-tool\"\nenv = { PATH = \"@DIR@/own\" }\n");
    write_tool(&sandbox, "own", "own", 0o755);
    write_tool(&sandbox, "hosts", "hosts", 0o755);
    let hosts_path = sandbox.path("hosts");
    let run: common::Run = sandbox.host().env("PATH", &hosts_path).args(["--no-state", "run", "tool", "hi"]).output().unwrap().into();
    assert_eq!((run.code, run.stdout.as_str()), (0, "own hi\n"), "{run:?}");
    let list: common::Run = sandbox.host().env("PATH", &hosts_path).args(["list", "--json"]).output().unwrap().into();
    assert_eq!(list.code, 0, "{list:?}");
    let path = list.json()[0]["command_path"].as_str().map(String::from);
    assert_eq!(path, Some(sandbox.path("own/exechost-tool").display().to_string()), "{list:?}");
}
