//! Shared test harness: a temporary folder with a services.toml, and the real `host` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod mock;

/// A configuration with one service, `echo`, that runs the real `echo`.
pub const ECHO: &str = "[services.echo]\nplugin = \"template\"\ncommand = \"echo\"\n";

/// A fake service CLI from tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// A wasm plugin built by the host's build script (including the test-only ones).
pub fn built_plugin(stem: &str) -> PathBuf {
    Path::new(env!("EXECHOST_PLUGIN_DIR")).join(format!("{stem}.wasm"))
}

/// The compile cache shared by all tests, so each plugin is compiled once per test run.
pub fn shared_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("exechost-cache")
}

/// Each line of `text` (NDJSON output, a results file) as JSON.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// A temporary folder holding a services.toml, in which `host` runs.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
}

/// What one `host` run did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Sandbox {
    /// `config` may use @FAKE@ (the fake CLI), @MISBEHAVE@ (the test plugin) and @DIR@ (this folder).
    pub fn new(config: &str) -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = config
            .replace("@FAKE@", &fixture("fake-cli").display().to_string())
            .replace("@MISBEHAVE@", &built_plugin("misbehave_plugin").display().to_string())
            .replace("@DIR@", &dir.path().display().to_string());
        std::fs::write(dir.path().join("services.toml"), text).unwrap();
        Sandbox { dir, cache: shared_cache() }
    }

    /// The same, with a compile cache of its own.
    pub fn with_own_cache(config: &str) -> Sandbox {
        let mut s = Sandbox::new(config);
        s.cache = s.dir.path().join("cache");
        s
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `host` command with this sandbox's configuration and cache.
    pub fn host(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_host"));
        cmd.current_dir(self.dir.path())
            .arg("--config")
            .arg(self.path("services.toml"))
            .env("XDG_CACHE_HOME", &self.cache)
            .env("XDG_STATE_HOME", self.dir.path())
            .env_remove("EXECHOST_STATE")
            .env_remove("EXECHOST_CONFIG")
            .env_remove("EXECHOST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.host().args(args).output().expect("running host").into()
    }

    /// Runs with `input` on the host's stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Run {
        use std::io::Write;
        let mut child = self
            .host()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning host");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("waiting for host");
        writer.join().unwrap();
        out.into()
    }
}

/// Sends `signal` (e.g. `libc::SIGINT`) to a `host` process the test started.
pub fn send_signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) only sends a signal, to a process this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// True while a process with this pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name in parentheses.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start().chars().next();
            state != Some('Z')
        }
        Err(_) => false,
    }
}

/// Waits up to `limit` for `done` to become true.
pub fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// The child's exit status if it exits within `limit`.
pub fn exit_within(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut status = None;
    eventually(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status
}

/// Reads a pid file the fake CLI writes, waiting for it to appear.
pub fn read_pid(path: &Path) -> i32 {
    assert!(eventually(Duration::from_secs(10), || path.exists()), "{} never appeared", path.display());
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

/// Runs `host` with a terminal (a pseudo-terminal from `script`) as its stdin, stdout and stderr.
pub fn on_a_terminal(sandbox: &Sandbox, args: &str) -> String {
    on_a_terminal_of(sandbox, 50, args)
}

/// The same, on a terminal `rows` lines high.
pub fn on_a_terminal_of(sandbox: &Sandbox, rows: u16, args: &str) -> String {
    let host = format!(
        "stty rows {rows} cols 100; {} --config {} --state {} {args}",
        env!("CARGO_BIN_EXE_host"),
        sandbox.path("services.toml").display(),
        sandbox.path("state.db").display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &host, "/dev/null"])
        .env("XDG_CACHE_HOME", &sandbox.cache)
        .current_dir(sandbox.dir.path())
        .output()
        .expect("running script(1) for a pseudo-terminal");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `host` with `args` and a stdout whose reader is gone before anything is written
/// (`host ... | head -0`): (exit code, stderr).
pub fn with_stdout_closed(sandbox: &Sandbox, args: &[&str]) -> (Option<i32>, String) {
    let mut child = sandbox.host().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("running host");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waiting for host");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An executable shell script at `path` (its folder made) running `body`.
pub fn write_script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
