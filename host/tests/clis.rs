//! The five AI CLI plugins against the real CLIs (installed by scripts/install-clis into
//! tests/.tools, or found on PATH), each pointed at the mock provider API on 127.0.0.1 with an
//! isolated home, through the real `host` binary.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mock::{Mock, Mode, down_url};
use common::{Run, Sandbox, eventually};

/// The CLI's executable: tests/.tools/bin first, then PATH. A missing CLI fails the test
/// with what to do.
fn cli(name: &str) -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/.tools/bin").join(name);
    if tools.exists() {
        return tools;
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("the `{name}` CLI is not installed: run scripts/install-clis (scripts/test does)"))
}

/// One CLI's test rig: a sandbox whose services.toml has the service `svc`, an isolated home
/// with the CLI's configuration pointing at `base`.
struct Rig {
    sandbox: Sandbox,
    home: PathBuf,
}

impl Rig {
    fn new(name: &str, base: &str, retry: &str) -> Rig {
        let command = cli(name);
        let (settings, env, default_model) = match name {
            "gemini" => (format!(r#"{{ base_url = "{base}" }}"#), r#"{ GEMINI_API_KEY = "test-key" }"#.to_string(), "gemini-2.5-flash"),
            "qwen" => (format!(r#"{{ base_url = "{base}/v1" }}"#), r#"{ OPENAI_API_KEY = "test-key" }"#.to_string(), "qwen-mock"),
            "claude" => (format!(r#"{{ base_url = "{base}" }}"#), r#"{ ANTHROPIC_API_KEY = "test-key" }"#.to_string(), "claude-mock"),
            "codex" => (r#"{ provider = "mock" }"#.to_string(), r#"{ MOCK_API_KEY = "test-key" }"#.to_string(), "mock-model"),
            "llm" => ("{}".to_string(), r#"{ OPENAI_API_KEY = "test-key" }"#.to_string(), "mock"),
            other => panic!("no rig for {other}"),
        };
        let sandbox = Sandbox::new(&format!(
            r#"
[services.svc]
plugin = "{name}"
command = "{}"
default_model = "{default_model}"
timeout = "{timeout}"
retry = {{ {retry} }}
env = {env}
settings = {settings}
"#,
            command.display(),
            // qwen's own retry layer cannot be turned off: a 429 or 500 takes it about 80 s.
            timeout = if name == "qwen" { "150s" } else { "60s" },
        ));
        let home = sandbox.path("home");
        let write = |path: &str, text: String| {
            let path = home.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        match name {
            "gemini" => write(
                ".gemini/settings.json",
                r#"{"security": {"auth": {"selectedType": "gemini-api-key"}}, "general": {"maxAttempts": 1, "enableAutoUpdate": false},
                   "privacy": {"usageStatisticsEnabled": false}, "telemetry": {"enabled": false}}"#
                    .into(),
            ),
            "qwen" => write(
                ".qwen/settings.json",
                r#"{"memory": {"enableManagedAutoMemory": false}, "model": {"generationConfig": {"maxRetries": 0}},
                   "privacy": {"usageStatisticsEnabled": false}, "telemetry": {"enabled": false}}"#
                    .into(),
            ),
            "codex" => write(
                ".codex/config.toml",
                format!(
                    "model_provider = \"mock\"\n[model_providers.mock]\nname = \"Mock\"\nbase_url = \"{base}/v1\"\nenv_key = \"MOCK_API_KEY\"\nwire_api = \"responses\"\n"
                ),
            ),
            "llm" => write(
                "llm/extra-openai-models.yaml",
                format!("- model_id: mock\n  model_name: mock-model\n  api_base: \"{base}/v1\"\n- model_id: other-mock\n  model_name: other-mock\n  api_base: \"{base}/v1\"\n"),
            ),
            _ => std::fs::create_dir_all(&home).unwrap(),
        }
        Rig { sandbox, home }
    }

    fn run(&self, args: &[&str]) -> Run {
        let mut cmd = self.sandbox.host();
        cmd.env("HOME", &self.home)
            .env("CODEX_HOME", self.home.join(".codex"))
            .env("LLM_USER_PATH", self.home.join("llm"))
            .env("NO_COLOR", "1");
        for var in ["GEMINI_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "CODEX_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "GOOGLE_GEMINI_BASE_URL"] {
            cmd.env_remove(var);
        }
        cmd.args(args).output().expect("running host").into()
    }

    /// No process is left running in the sandbox (the CLIs run there).
    fn no_process_left(&self) -> bool {
        let dir = self.sandbox.dir.path().to_path_buf();
        eventually(Duration::from_secs(5), || {
            !std::fs::read_dir("/proc").unwrap().flatten().any(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir)))
        })
    }
}

fn kind(run: &Run) -> String {
    run.json()["error"]["kind"].as_str().unwrap_or("none").to_string()
}

fn success(name: &str) {
    let mock = Mock::start(Mode::answer("The answer is 42."));
    let rig = Rig::new(name, &mock.url(), "max_attempts = 1");
    let run = rig.run(&["run", "svc", "--json", "What is the answer?"]);
    assert_eq!(run.code, 0, "{run:?}");
    let j = run.json();
    assert_eq!(j["text"], "The answer is 42.");
    assert_eq!((j["tokens"]["input"].as_u64(), j["tokens"]["output"].as_u64()), (Some(123), Some(45)), "{j}");
    assert_eq!(j["tokens"]["total"], 168);
    assert_eq!(j["tokens"]["estimated"], false);
    let sent = mock.model_requests();
    assert_eq!(sent.len(), 1, "one model request: {sent:?}");
    assert!(sent[0].body.contains("What is the answer?"), "the prompt reached the mock");
}

fn file_attached(name: &str) {
    let mock = Mock::start(Mode::answer("Read it."));
    let rig = Rig::new(name, &mock.url(), "max_attempts = 1");
    std::fs::write(rig.sandbox.path("notes.txt"), "The secret word is PERIWINKLE.\n").unwrap();
    let run = rig.run(&["run", "svc", "--json", "-f", "notes.txt", "What is the secret word?"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(mock.model_requests().iter().any(|r| r.body.contains("PERIWINKLE")), "the file's contents reached the mock");
}

fn model_passed(name: &str, model: &str) {
    let mock = Mock::start(Mode::answer("ok"));
    let rig = Rig::new(name, &mock.url(), "max_attempts = 1");
    let run = rig.run(&["run", "svc", "--json", "-m", model, "hi"]);
    assert_eq!(run.code, 0, "{run:?}");
    let sent = &mock.model_requests()[0];
    assert!(sent.path.contains(model) || sent.json()["model"] == model, "the model reached the mock: {} {}", sent.path, &sent.body[..200.min(sent.body.len())]);
}

fn rate_limited(name: &str) {
    let mock = Mock::start(Mode::fail(429));
    let rig = Rig::new(name, &mock.url(), "max_attempts = 1");
    let run = rig.run(&["run", "svc", "--json", "hi"]);
    assert_eq!((run.code, kind(&run).as_str()), (1, "rate-limited"), "{run:?}");
}

/// A 429 and then an answer: `attempts` is 2 when only the host retries (1 for the CLIs
/// whose own retries cannot be turned off).
fn rate_limited_then_answer(name: &str, attempts: u64) {
    let mock = Mock::start(Mode::fail_then_answer(429, 1, "second time lucky"));
    let rig = Rig::new(name, &mock.url(), "max_attempts = 3, base_delay = \"100ms\"");
    let run = rig.run(&["run", "svc", "--json", "hi"]);
    assert_eq!(run.code, 0, "{run:?}");
    let j = run.json();
    assert_eq!((j["text"].as_str(), j["attempts"].as_u64()), (Some("second time lucky"), Some(attempts)), "{j}");
    assert_eq!(mock.model_requests().len(), 2);
}

fn unauthorized(name: &str) {
    let mock = Mock::start(Mode::fail(401));
    let rig = Rig::new(name, &mock.url(), "max_attempts = 3, base_delay = \"100ms\"");
    let run = rig.run(&["run", "svc", "--json", "hi"]);
    assert_eq!((run.code, kind(&run).as_str()), (1, "auth"), "{run:?}");
    assert_eq!(run.json()["attempts"], 1, "auth failures are not retried");
}

fn server_error(name: &str) {
    let mock = Mock::start(Mode::fail(500));
    let rig = Rig::new(name, &mock.url(), "max_attempts = 1");
    let run = rig.run(&["run", "svc", "--json", "hi"]);
    assert_eq!((run.code, kind(&run).as_str()), (1, "transient"), "{run:?}");
}

/// Server down: a transient failure, or for a CLI that waits for the network forever, the
/// host's timeout; either way within the timeout and with no process left.
fn server_down(name: &str, expected: &str) {
    let rig = Rig::new(name, &down_url(), "max_attempts = 1");
    let run = rig.run(&["run", "svc", "--json", "--timeout", "20s", "hi"]);
    assert_eq!((run.code, kind(&run).as_str()), (1, expected), "{run:?}");
    assert!(rig.no_process_left(), "a CLI process was left behind");
}

fn stall(name: &str) {
    let mock = Mock::start(Mode::Stall);
    let rig = Rig::new(name, &mock.url(), "max_attempts = 1");
    let run = rig.run(&["run", "svc", "--json", "--timeout", "8s", "hi"]);
    assert_eq!((run.code, kind(&run).as_str()), (1, "timeout"), "{run:?}");
    assert!(rig.no_process_left(), "a CLI process was left behind");
}

macro_rules! cli_tests {
    ($module:ident, $name:literal, model = $model:literal, retried_429_attempts = $attempts:literal, down = $down:literal) => {
        mod $module {
            #[test]
            fn answers_with_text_and_exact_token_counts() {
                super::success($name);
            }
            #[test]
            fn an_attached_file_reaches_the_api() {
                super::file_attached($name);
            }
            #[test]
            fn the_model_asked_for_reaches_the_api() {
                super::model_passed($name, $model);
            }
            #[test]
            fn a_429_is_rate_limited() {
                super::rate_limited($name);
            }
            #[test]
            fn a_429_then_an_answer_succeeds_under_the_retry_policy() {
                super::rate_limited_then_answer($name, $attempts);
            }
            #[test]
            fn a_401_is_an_auth_failure_tried_once() {
                super::unauthorized($name);
            }
            #[test]
            fn a_500_is_transient() {
                super::server_error($name);
            }
            #[test]
            fn a_server_that_is_down_fails_within_the_timeout() {
                super::server_down($name, $down);
            }
            #[test]
            fn a_stalled_response_is_ended_by_the_timeout() {
                super::stall($name);
            }
        }
    };
}

cli_tests!(gemini, "gemini", model = "gemini-2.5-pro", retried_429_attempts = 2, down = "transient");
cli_tests!(qwen, "qwen", model = "qwen-other", retried_429_attempts = 1, down = "transient");
cli_tests!(claude, "claude", model = "claude-other", retried_429_attempts = 2, down = "transient");
cli_tests!(codex, "codex", model = "other-model", retried_429_attempts = 2, down = "timeout");
cli_tests!(llm, "llm", model = "other-mock", retried_429_attempts = 1, down = "transient");

#[test]
fn health_runs_each_cli_version_check() {
    let rig = Rig::new("claude", &down_url(), "max_attempts = 1");
    let run = rig.run(&["health", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let detail = run.json()[0]["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains("Claude Code"), "{detail}");
}
