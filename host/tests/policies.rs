//! Retries, circuit breakers, quotas and the ledger through the real binary, with the state
//! shared by separate `host` processes in one SQLite file.

mod common;

use std::thread;

use common::{Run, Sandbox};

/// (outcome, spawned, started_ms) of every ledger row, oldest first.
fn ledger(sandbox: &Sandbox) -> Vec<(String, bool, i64)> {
    let conn = rusqlite::Connection::open(sandbox.path("exechost/state.db")).unwrap();
    let mut stmt = conn.prepare("SELECT outcome, spawned, started_ms FROM attempts ORDER BY id").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
}

fn flaky(failures: u32, retry_after: Option<u64>, policy: &str) -> Sandbox {
    let after = retry_after.map(|s| format!(", \"{s}\"")).unwrap_or_default();
    Sandbox::new(&format!(
        r#"
[services.flaky]
plugin = "template"
command = "@FAKE@"
retry = {{ {policy} }}
settings = {{ args = ["flaky", "@DIR@", "{failures}", "{{prompt}}"{after}] }}
"#
    ))
}

#[test]
fn rate_limited_twice_then_success_takes_three_attempts_with_the_configured_waits() {
    let sandbox = flaky(2, None, "max_attempts = 3, base_delay = \"200ms\", jitter = false");
    let run = sandbox.run(&["run", "flaky", "--json", "the answer"]);
    assert_eq!(run.code, 0, "{run:?}");
    let j = run.json();
    assert_eq!((j["text"].as_str(), j["attempts"].as_u64()), (Some("the answer"), Some(3)));
    let rows = ledger(&sandbox);
    let outcomes: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(outcomes, ["rate-limited", "rate-limited", "ok"]);
    // Waits of 200 ms then 400 ms (no jitter) separate the attempts' starts.
    assert!(rows[1].2 - rows[0].2 >= 200, "{rows:?}");
    assert!(rows[2].2 - rows[1].2 >= 400, "{rows:?}");
}

#[test]
fn verbose_runs_log_each_retry_with_its_wait_and_reason() {
    let sandbox = flaky(1, None, "max_attempts = 2, base_delay = \"100ms\", jitter = false");
    let run = sandbox.run(&["-v", "run", "flaky", "answer"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("attempt 1 failed (rate-limited): retrying in 100ms"), "{}", run.stderr);
    let quiet = flaky(1, None, "max_attempts = 2, base_delay = \"100ms\"").run(&["run", "flaky", "answer"]);
    assert!(!quiet.stderr.contains("retrying"), "{}", quiet.stderr);
}

#[test]
fn an_auth_failure_is_not_retried() {
    let sandbox = Sandbox::new(
        r#"
[services.auth]
plugin = "template"
command = "@FAKE@"
retry = { max_attempts = 5, base_delay = "10ms" }
settings = { args = ["fail", "1", "401 Unauthorized: invalid api key {prompt}"] }
"#,
    );
    let run = sandbox.run(&["run", "auth", "--json", "x"]);
    assert_eq!(run.code, 1);
    assert_eq!((run.json()["attempts"].as_u64(), run.json()["error"]["kind"].as_str()), (Some(1), Some("auth")));
    assert_eq!(ledger(&sandbox).len(), 1);
}

#[test]
fn retry_after_is_honoured_over_a_shorter_backoff() {
    let sandbox = flaky(1, Some(1), "max_attempts = 3, base_delay = \"10ms\", jitter = false");
    let run = sandbox.run(&["run", "flaky", "--json", "later"]);
    assert_eq!((run.code, run.json()["attempts"].as_u64()), (0, Some(2)), "{run:?}");
    let rows = ledger(&sandbox);
    assert!(rows[1].2 - rows[0].2 >= 1000, "the second attempt started before the retry-after: {rows:?}");
}

#[test]
fn a_retry_after_beyond_max_delay_stops_at_once_saying_when() {
    let sandbox = flaky(1, Some(90), "max_attempts = 3, max_delay = \"5s\"");
    let run = sandbox.run(&["run", "flaky", "--json", "x"]);
    assert_eq!(run.code, 1);
    let j = run.json();
    assert_eq!(j["attempts"], 1);
    let message = j["error"]["message"].as_str().unwrap();
    assert!(message.contains("accepts requests again at") && message.contains("(in 90 s)"), "{message}");
}

#[test]
fn an_absurd_retry_after_is_capped_and_reported_with_its_date() {
    // About u64::MAX milliseconds: past what the clock can add to now.
    let sandbox = flaky(1, Some(18_446_744_073_709_551), "max_attempts = 3");
    let run = sandbox.run(&["run", "flaky", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["error"]["retry_after_ms"], 1_000_000_000_000_u64, "capped at about 31 years");
    let message = j["error"]["message"].as_str().unwrap();
    assert!(message.contains("Z (in 11575 d)"), "a date, not a time of day: {message}");
}

fn switch_sandbox(breaker: &str) -> Sandbox {
    let sandbox = Sandbox::new(&format!(
        r#"
[services.sw]
plugin = "template"
command = "@FAKE@"
retry = {{ max_attempts = 1 }}
breaker = {{ {breaker} }}
settings = {{ args = ["switch", "@DIR@", "{{prompt}}"] }}
"#
    ));
    std::fs::write(sandbox.path("failing"), "").unwrap();
    sandbox
}

#[test]
fn the_breaker_opens_across_processes_and_fails_fast_without_running() {
    let sandbox = switch_sandbox("failure_threshold = 3, reset_timeout = \"60s\"");
    for _ in 0..3 {
        let run = sandbox.run(&["run", "sw", "--json", "x"]);
        assert_eq!(run.json()["error"]["kind"], "transient");
    }
    std::fs::remove_file(sandbox.path("failing")).unwrap();
    let run = sandbox.run(&["run", "sw", "--json", "x"]);
    assert_eq!(run.code, 1);
    let j = run.json();
    assert_eq!(j["error"]["kind"], "circuit-open");
    let message = j["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("circuit open for sw until ") && message.ends_with("after 3 consecutive failures (last: transient)"), "{message}");
    let rows = ledger(&sandbox);
    assert_eq!(rows.len(), 4);
    assert_eq!((rows[3].0.as_str(), rows[3].1), ("circuit-open", false), "nothing was spawned");
    let status = sandbox.run(&["status", "--json"]).json();
    assert_eq!(status[0]["breaker"], "open");
    assert_eq!(status[0]["consecutive_failures"], 3);
}

#[test]
fn half_open_admits_one_probe_when_four_processes_race() {
    let sandbox = switch_sandbox("failure_threshold = 2, reset_timeout = \"1s\"");
    for _ in 0..2 {
        sandbox.run(&["run", "sw", "x"]);
    }
    std::fs::remove_file(sandbox.path("failing")).unwrap();
    thread::sleep(std::time::Duration::from_millis(1100));
    // The service now answers after a second: the probe is still running while the others ask.
    let runs: Vec<Run> = thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| sandbox.run(&["run", "sw", "--json", "probe"]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let kinds: Vec<String> = runs.iter().map(|r| r.json()["error"]["kind"].as_str().unwrap_or("ok").to_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "ok").count(), 1, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "circuit-open").count(), 3, "{kinds:?}");
    // The probe's success closed the circuit.
    assert_eq!(sandbox.run(&["run", "sw", "after"]).code, 0);
    assert_eq!(sandbox.run(&["status", "--json"]).json()[0]["breaker"], "closed");
}

#[test]
fn the_rpm_quota_holds_across_concurrent_processes() {
    let sandbox = Sandbox::new(
        r#"
[services.echo]
plugin = "template"
command = "echo"
quota = { rpm = 3 }
"#,
    );
    let runs: Vec<Run> = thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(|| sandbox.run(&["run", "echo", "--json", "hi"]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = runs.iter().filter(|r| r.code == 0).count();
    assert_eq!(ok, 3, "{runs:?}");
    let refused = runs.iter().find(|r| r.code == 1).unwrap().json();
    assert_eq!(refused["error"]["kind"], "quota-exhausted");
    assert!(refused["error"]["message"].as_str().unwrap().contains("quota of 3 requests per minute for echo is used up; it frees at"));
    let status = sandbox.run(&["status", "--json"]).json();
    assert_eq!((status[0]["rpm"]["used"].as_u64(), status[0]["rpm"]["limit"].as_u64()), (Some(3), Some(3)));
}

#[test]
fn eight_processes_times_fifty_runs_leave_exact_ledger_counts() {
    let sandbox = Sandbox::new(common::ECHO);
    let failures: usize = thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| (0..50).filter(|_| sandbox.run(&["run", "echo", "hi"]).code != 0).count()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(failures, 0);
    let usage = sandbox.run(&["usage", "--json"]).json();
    assert_eq!(usage[0]["requests"], 400);
    assert_eq!(usage[0]["successes"], 400);
    assert_eq!(usage[0]["unfinished"], 0);
    assert_eq!(ledger(&sandbox).len(), 400);
}

#[test]
fn usage_reports_outcomes_tokens_and_durations_per_service_and_day() {
    let sandbox = Sandbox::new(
        r#"
[services.echo]
plugin = "template"
command = "echo"

[services.broken]
plugin = "template"
command = "@FAKE@"
retry = { max_attempts = 1 }
settings = { args = ["fail", "1", "HTTP 503 {prompt}"] }
"#,
    );
    sandbox.run(&["run", "echo", "12345678"]);
    sandbox.run(&["run", "echo", "1234"]);
    sandbox.run(&["run", "broken", "x"]);
    let usage = sandbox.run(&["usage", "--since", "1d", "--json"]).json();
    let rows = usage.as_array().unwrap();
    let broken = rows.iter().find(|r| r["service"] == "broken").unwrap();
    assert_eq!((broken["requests"].as_u64(), broken["failures"]["transient"].as_u64()), (Some(1), Some(1)));
    let echo = rows.iter().find(|r| r["service"] == "echo").unwrap();
    assert_eq!(echo["successes"], 2);
    // Estimated tokens: 8 and 4 characters in and out: (2 + 2) + (1 + 1).
    assert_eq!(echo["tokens"]["total"], 6);
    assert!(echo["p95_duration_ms"].as_i64().is_some() && echo["mean_duration_ms"].as_f64().is_some());
    let table = sandbox.run(&["usage"]);
    assert!(table.stdout.contains("broken") && table.stdout.contains("transient 1"), "{}", table.stdout);
}

#[test]
fn prune_removes_ledger_rows_older_than_keep_and_never_what_quotas_read() {
    let sandbox = Sandbox::new(common::ECHO);
    assert_eq!(sandbox.run(&["run", "echo", "recent"]).code, 0);
    let forty_days = 40 * 86_400_000_i64;
    let conn = rusqlite::Connection::open(sandbox.path("exechost/state.db")).unwrap();
    conn.execute(
        "INSERT INTO attempts (service, started_ms, outcome, spawned) SELECT service, started_ms - ?1, outcome, spawned FROM attempts",
        [forty_days],
    )
    .unwrap();
    drop(conn);
    assert_eq!(ledger(&sandbox).len(), 2);
    let too_short = sandbox.run(&["prune", "--keep", "1h"]);
    assert_eq!(too_short.code, 2, "{too_short:?}");
    assert!(too_short.stderr.contains("--keep must be at least 1.0d"), "{}", too_short.stderr);
    let pruned = sandbox.run(&["prune", "--keep", "30d", "--json"]);
    assert_eq!((pruned.code, pruned.json()["removed"].as_u64()), (0, Some(1)), "{pruned:?}");
    let rows = ledger(&sandbox);
    assert_eq!(rows.len(), 1, "the recent row stays: {rows:?}");
    let again = sandbox.run(&["prune", "--keep", "30d"]);
    assert!(again.stdout.starts_with("removed 0 ledger rows"), "{}", again.stdout);
}

#[test]
fn a_corrupt_state_file_is_a_usage_error_naming_it() {
    let sandbox = Sandbox::new(common::ECHO);
    let path = sandbox.path("broken.db");
    std::fs::write(&path, vec![b'!'; 8192]).unwrap();
    let run = sandbox.run(&["--state", path.to_str().unwrap(), "run", "echo", "hi"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains(path.to_str().unwrap()) && run.stderr.contains("--state"), "{}", run.stderr);
    assert_eq!(std::fs::read(&path).unwrap(), vec![b'!'; 8192], "the file was left alone");
}

#[test]
fn no_state_runs_without_touching_the_state_file() {
    let sandbox = Sandbox::new(common::ECHO);
    let run = sandbox.run(&["--no-state", "run", "echo", "hi"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "hi\n"));
    assert!(!sandbox.path("exechost/state.db").exists());
}

#[test]
fn health_reports_ok_not_installed_auth_and_failing_checks() {
    let sandbox = Sandbox::new(
        r#"
[services.echo]
plugin = "template"
command = "echo"

[services.ghost]
plugin = "template"
command = "exechost-no-such-program"

[services.keyless]
plugin = "template"
command = "echo"
auth_env = "EXECHOST_TEST_UNSET_KEY"

[services.sick]
plugin = "template"
command = "@FAKE@"
settings = { health_args = ["fail", "3", "cannot reach the server"] }
"#,
    );
    let run = sandbox.run(&["health", "--json"]);
    assert_eq!(run.code, 1, "{run:?}");
    let by_name = |name: &str| run.json().as_array().unwrap().iter().find(|h| h["service"] == name).unwrap().clone();
    assert_eq!(by_name("echo")["ok"], true);
    assert!(by_name("echo")["detail"].as_str().unwrap().contains("echo"), "{run:?}");
    assert!(by_name("ghost")["reason"].as_str().unwrap().starts_with("not installed"));
    assert!(by_name("keyless")["reason"].as_str().unwrap().contains("EXECHOST_TEST_UNSET_KEY is not set"));
    assert_eq!(by_name("sick")["reason"], "health command exited with code 3: cannot reach the server");
    let only = sandbox.run(&["health", "echo"]);
    assert_eq!(only.code, 0, "{only:?}");
    assert!(only.stdout.starts_with("OK     echo"), "{}", only.stdout);
}

#[test]
fn health_takes_all_for_every_service_and_refuses_a_service_named_twice() {
    let sandbox = Sandbox::new(
        r#"
[services.one]
plugin = "template"
command = "echo"

[services.two]
plugin = "template"
command = "echo"
"#,
    );
    let all = sandbox.run(&["health", "all"]);
    assert_eq!(all.code, 0, "{all:?}");
    let checked: Vec<&str> = all.stdout.lines().map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(checked, ["one", "two"], "{}", all.stdout);
    let twice = sandbox.run(&["health", "one", "one"]);
    assert_eq!((twice.code, twice.stdout.as_str()), (2, ""), "{twice:?}");
    assert!(twice.stderr.contains("service `one` is named twice"), "{}", twice.stderr);
}
