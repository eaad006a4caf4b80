//! The executor through the real binary: timeouts kill the whole process group, output is
//! capped in bounded memory, large stdin does not deadlock, Ctrl-C leaves nothing behind.

mod common;

use std::time::{Duration, Instant};

use common::{Sandbox, alive, eventually, exit_within, on_a_terminal, read_pid, send_signal};

fn hang_sandbox(mode: &str, limits: &str) -> Sandbox {
    Sandbox::new(&format!(
        r#"
[defaults]
retry = {{ max_attempts = 1 }}

[services.hang]
plugin = "template"
command = "@FAKE@"
{limits}
settings = {{ args = ["{mode}", "@DIR@", "{{prompt}}"] }}
"#
    ))
}

#[test]
fn a_timeout_kills_the_command_and_its_grandchild() {
    let sandbox = hang_sandbox("hang", "timeout = \"1s\"");
    let run = sandbox.run(&["run", "hang", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["error"]["kind"], "timeout");
    assert!(j["error"]["message"].as_str().unwrap().contains("timed out after 1s"), "{j}");
    let (child, grandchild) = (read_pid(&sandbox.path("child.pid")), read_pid(&sandbox.path("grandchild.pid")));
    assert!(eventually(Duration::from_secs(5), || !alive(child) && !alive(grandchild)), "a process survived");
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let sandbox = hang_sandbox("hang-stubborn", "timeout = \"1s\"\nkill_grace = \"500ms\"");
    let run = sandbox.run(&["run", "hang", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.json()["error"]["kind"], "timeout");
    assert_eq!(run.json()["signal"], 9, "SIGKILL ended it");
    let (child, grandchild) = (read_pid(&sandbox.path("child.pid")), read_pid(&sandbox.path("grandchild.pid")));
    assert!(eventually(Duration::from_secs(5), || !alive(child) && !alive(grandchild)), "a process survived");
}

#[test]
fn a_stopped_command_is_continued_so_that_it_can_handle_sigterm() {
    let sandbox = hang_sandbox("stopped", "timeout = \"1s\"\nkill_grace = \"20s\"");
    let run = sandbox.run(&["run", "hang", "--json", "x"]);
    assert_eq!(run.json()["error"]["kind"], "timeout", "{run:?}");
    assert!(sandbox.path("terminated").exists(), "the command handled SIGTERM instead of waiting stopped for SIGKILL");
}

#[test]
fn a_command_reading_the_terminal_fails_at_once_instead_of_waiting_stopped() {
    let sandbox = hang_sandbox("tty", "timeout = \"20s\"");
    let screen = on_a_terminal(&sandbox, "run hang --json x");
    let json = &screen[screen.find('{').expect("a JSON result")..];
    let result: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {screen}"));
    assert_ne!(result["error"]["kind"], "timeout", "{screen}");
    assert!(result["stderr"].as_str().unwrap().contains("cannot read the terminal"), "{screen}");
}

#[test]
fn the_timeout_option_overrides_the_configured_one() {
    let sandbox = hang_sandbox("hang", "timeout = \"300s\"");
    let started = Instant::now();
    let run = sandbox.run(&["run", "hang", "--timeout", "500ms", "--json", "x"]);
    assert_eq!(run.json()["error"]["kind"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(60), "the 300 s timeout was used");
}

#[test]
fn an_idle_command_is_killed_after_the_idle_timeout() {
    let sandbox = Sandbox::new(
        r#"
[services.idle]
plugin = "template"
command = "@FAKE@"
idle_timeout = "1s"
retry = { max_attempts = 1 }
settings = { args = ["idle", "{prompt}"] }
"#,
    );
    let run = sandbox.run(&["run", "idle", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["error"]["kind"], "timeout");
    assert!(j["error"]["message"].as_str().unwrap().contains("idle_timeout"), "{j}");
    assert_eq!(j["stdout"], "started\n", "output before the kill is kept");
}

/// Sends `signal` to a `host run` whose command hangs; returns host's exit code once it has
/// checked that neither the command nor its grandchild survived.
fn interrupt_hanging_run(signal: i32) -> Option<i32> {
    let sandbox = hang_sandbox("hang", "timeout = \"300s\"");
    let mut child = sandbox.host().args(["run", "hang", "x"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let (pid, grandchild) = (read_pid(&sandbox.path("child.pid")), read_pid(&sandbox.path("grandchild.pid")));
    send_signal(&child, signal);
    let status = child.wait().unwrap();
    assert!(eventually(Duration::from_secs(5), || !alive(pid) && !alive(grandchild)), "a process survived");
    status.code()
}

#[test]
fn sigint_to_host_stops_the_command_group_and_exits_130() {
    assert_eq!(interrupt_hanging_run(libc::SIGINT), Some(130));
}

#[test]
fn sigterm_to_host_stops_the_command_group_and_exits_143() {
    assert_eq!(interrupt_hanging_run(libc::SIGTERM), Some(143));
}

#[test]
fn sighup_to_host_stops_the_command_group_and_exits_129() {
    assert_eq!(interrupt_hanging_run(libc::SIGHUP), Some(129));
}

#[test]
fn sighup_is_ignored_when_the_host_starts_with_it_ignored_as_under_nohup() {
    use std::os::unix::process::CommandExt;
    let sandbox = hang_sandbox("hang", "timeout = \"300s\"");
    let mut host = sandbox.host();
    host.args(["run", "hang", "x"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: signal(2) is async-signal-safe; it sets the disposition nohup sets.
    unsafe {
        host.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = host.spawn().unwrap();
    let pid = read_pid(&sandbox.path("child.pid"));
    send_signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none() && alive(pid), "SIGHUP stopped a host started under nohup");
    send_signal(&child, libc::SIGINT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
}

#[test]
fn a_second_sigint_kills_a_command_that_ignores_sigterm_without_waiting_out_kill_grace() {
    let sandbox = hang_sandbox("hang-stubborn", "timeout = \"300s\"\nkill_grace = \"60s\"");
    let mut child = sandbox.host().args(["run", "hang", "x"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let (pid, grandchild) = (read_pid(&sandbox.path("child.pid")), read_pid(&sandbox.path("grandchild.pid")));
    send_signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the first SIGINT gives the command its kill_grace");
    send_signal(&child, libc::SIGINT);
    let status = exit_within(&mut child, Duration::from_secs(10)).expect("the second SIGINT did not end the host well within kill_grace");
    assert_eq!(status.code(), Some(130));
    assert!(eventually(Duration::from_secs(5), || !alive(pid) && !alive(grandchild)), "a process survived");
}

/// Runs `host` and returns its exit code and peak resident memory in KiB (from wait4).
#[expect(clippy::zombie_processes, reason = "wait4 reaps the child, for its resource usage")]
fn run_measuring_rss(sandbox: &Sandbox, args: &[&str]) -> (i32, String, i64) {
    use std::io::Read;
    let mut child = sandbox.host().args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let out = reader.join().unwrap();
    (libc::WEXITSTATUS(status), out, usage.ru_maxrss)
}

#[test]
fn a_100_mib_stdout_is_capped_in_bounded_memory() {
    let sandbox = Sandbox::new(
        r#"
[services.flood]
plugin = "template"
command = "@FAKE@"
max_output = "1MiB"
settings = { args = ["flood", "{prompt}"] }
"#,
    );
    let (code, out, max_rss_kib) = run_measuring_rss(&sandbox, &["run", "flood", "--json", "100"]);
    assert_eq!(code, 0, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["truncated"], true);
    assert_eq!(j["text"].as_str().unwrap().len(), 1 << 20);
    assert!(max_rss_kib < 80 * 1024, "peak RSS {max_rss_kib} KiB: output was not capped");
}

#[test]
fn a_10_mib_prompt_on_stdin_does_not_deadlock() {
    // `cat` writes everything back while the host is still writing its stdin.
    let sandbox = Sandbox::new(
        r#"
[services.cat]
plugin = "template"
command = "cat"
timeout = "60s"
settings = { args = [], stdin = "prompt" }
"#,
    );
    let prompt = "0123456789abcdef".repeat(10 << 16);
    let run = sandbox.run_with_stdin(&["run", "cat", "--json", "-"], prompt.as_bytes());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["truncated"], false);
    assert_eq!(j["text"].as_str().unwrap().len(), 10 << 20);
    assert!(j["text"].as_str().unwrap() == prompt);
}

#[test]
fn without_stdin_the_command_reads_dev_null_not_an_open_pipe() {
    let sandbox = Sandbox::new(
        r#"
[services.stdin]
plugin = "template"
command = "@FAKE@"
timeout = "20s"
settings = { args = ["stdin", "{prompt}"] }
"#,
    );
    // fake-cli's stdin mode reads to end of file: with an open pipe it would hang.
    let run = sandbox.run(&["run", "stdin", "--json", "x"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.json()["text"].as_str().unwrap().starts_with("0 "), "{run:?}");
}

fn sched_sandbox() -> Sandbox {
    Sandbox::new(
        r#"
[services.sched]
plugin = "template"
command = "@FAKE@"
settings = { args = ["sched", "{prompt}"] }
"#,
    )
}

#[test]
fn commands_run_under_the_batch_scheduling_policy() {
    let run = sched_sandbox().run(&["run", "sched", "--json", "x"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["text"].as_str().unwrap().trim(), "batch", "{run:?}");
}

#[test]
fn a_host_started_under_the_idle_policy_keeps_it_for_its_commands() {
    use std::os::unix::process::CommandExt;
    let sandbox = sched_sandbox();
    let mut host = sandbox.host();
    // SAFETY: sched_setscheduler is async-signal-safe and touches only the parameter.
    unsafe {
        host.pre_exec(|| {
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let run: common::Run = host.args(["run", "sched", "--json", "x"]).output().expect("running host").into();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["text"].as_str().unwrap().trim(), "idle", "{run:?}");
}

#[test]
fn a_command_starts_in_a_group_of_its_own_with_no_signal_blocked_and_sigpipe_at_its_default() {
    // `cat` changes nothing of how it was started: its status is what the host gave it.
    let sandbox = Sandbox::new(
        r#"
[services.status]
plugin = "template"
command = "cat"
settings = { args = ["/proc/self/status"], stdin = "prompt" }
"#,
    );
    let run = sandbox.run(&["run", "status", "--json", "x"]);
    assert_eq!(run.code, 0, "{run:?}");
    let status = run.json()["text"].as_str().unwrap().to_string();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name} in {status}"));
        line[name.len() + 1..].trim().to_string()
    };
    let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
    let bit = |signal: i32| 1u64 << (signal - 1);
    assert_eq!(field("NSpgid"), field("Pid"), "its own process group");
    assert_eq!(mask("SigBlk"), 0, "no signal blocked");
    assert_eq!(mask("SigIgn") & bit(libc::SIGPIPE), 0, "SIGPIPE at its default");
    assert_ne!(mask("SigIgn") & bit(libc::SIGTTIN), 0, "kept off the terminal");
}
