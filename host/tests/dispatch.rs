//! Fan-out, failover and batch runs through the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{Sandbox, alive, eventually, exit_within, json_lines, on_a_terminal, on_a_terminal_of, read_pid, send_signal, with_stdout_closed};
use serde_json::Value;

const MIXED: &str = r#"
[defaults]
retry = { max_attempts = 1 }

[services.ok1]
plugin = "template"
command = "echo"

[services.ok2]
plugin = "template"
command = "echo"

[services.failing]
plugin = "template"
command = "@FAKE@"
settings = { args = ["fail", "1", "HTTP 429 rate limit {prompt}"] }

[services.hang]
plugin = "template"
command = "@FAKE@"
timeout = "3s"
settings = { args = ["hang", "@DIR@", "{prompt}"] }
"#;

#[test]
fn fan_out_results_arrive_as_each_finishes_and_a_hang_delays_no_one() {
    let sandbox = Sandbox::new(MIXED);
    let run = sandbox.run(&["run", "all", "--json", "hi"]);
    assert_eq!(run.code, 1, "{run:?}");
    let results = json_lines(&run.stdout);
    let order: Vec<&str> = results.iter().map(|r| r["service"].as_str().unwrap()).collect();
    assert_eq!(order.len(), 4);
    assert_eq!(order[3], "hang", "the hang is last: {order:?}");
    assert_eq!(results[3]["error"]["kind"], "timeout");
    let mut first: Vec<&str> = order[..3].to_vec();
    first.sort();
    assert_eq!(first, ["failing", "ok1", "ok2"]);
    assert!(run.stderr.contains("2 ok, 2 failed: "), "{}", run.stderr);
}

#[test]
fn fan_out_human_output_has_a_header_per_service_and_a_summary() {
    let sandbox = Sandbox::new(MIXED);
    let run = sandbox.run(&["run", "ok1,failing", "hello"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("=== ok1 (") && run.stdout.contains("hello\n"), "{}", run.stdout);
    assert!(run.stdout.contains("=== failing FAILED (rate-limited) ==="), "{}", run.stdout);
    assert!(run.stderr.trim_end().ends_with("1 ok, 1 failed: failing rate-limited"), "{}", run.stderr);
    let all_ok = sandbox.run(&["run", "ok1,ok2", "--jobs", "1", "x"]);
    assert_eq!(all_ok.code, 0, "{all_ok:?}");
}

#[test]
fn a_fan_out_whose_reader_went_away_stops_the_other_services_quietly() {
    let sandbox = Sandbox::new(MIXED);
    let (code, stderr) = with_stdout_closed(&sandbox, &["run", "ok1,hang", "hi"]);
    assert_eq!(code, Some(1), "the hang was stopped, not answered: {stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(stderr.contains("hang cancelled"), "stopped at once, not after its timeout: {stderr}");
}

#[test]
fn failover_tries_in_order_and_skips_an_open_circuit_without_running_it() {
    let sandbox = Sandbox::new(
        r#"
[defaults]
retry = { max_attempts = 1 }

[services.tripped]
plugin = "template"
command = "@FAKE@"
breaker = { failure_threshold = 1, reset_timeout = "10m" }
settings = { args = ["fail", "1", "HTTP 503 {prompt}"] }

[services.limited]
plugin = "template"
command = "@FAKE@"
settings = { args = ["fail", "1", "429 Too Many Requests {prompt}"] }

[services.good]
plugin = "template"
command = "echo"
"#,
    );
    assert_eq!(sandbox.run(&["run", "tripped", "x"]).code, 1);
    let run = sandbox.run(&["run", "tripped", "--fallback", "limited,good", "--json", "answer"]);
    assert_eq!(run.code, 0, "{run:?}");
    let j = run.json();
    assert_eq!((j["service"].as_str(), j["text"].as_str()), (Some("good"), Some("answer")));
    let tried: Vec<(&str, &str)> = j["tried"].as_array().unwrap().iter().map(|t| (t["service"].as_str().unwrap(), t["kind"].as_str().unwrap())).collect();
    assert_eq!(tried, [("tripped", "circuit-open"), ("limited", "rate-limited")]);
    let human = sandbox.run(&["run", "tripped", "--fallback", "limited", "x"]);
    assert_eq!(human.code, 1);
    assert!(human.stderr.contains("tripped failed (circuit-open)") && human.stderr.contains("limited failed (rate-limited)"), "{}", human.stderr);
    assert!(human.stderr.contains("all 2 services failed"), "{}", human.stderr);
}

#[test]
fn sigint_stops_every_fan_out_child_prints_what_finished_and_exits_130() {
    let sandbox = Sandbox::new(
        r#"
[services.quick]
plugin = "template"
command = "echo"

[services.hang]
plugin = "template"
command = "@FAKE@"
settings = { args = ["hang", "@DIR@", "{prompt}"] }
"#,
    );
    let mut child = sandbox.host().args(["run", "all", "--json", "x"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("\"service\":\"quick\""), "{first}");
    let (pid, grandchild) = (read_pid(&sandbox.path("child.pid")), read_pid(&sandbox.path("grandchild.pid")));
    send_signal(&child, libc::SIGINT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.contains("\"kind\":\"cancelled\""), "{rest}");
    assert!(eventually(Duration::from_secs(5), || !alive(pid) && !alive(grandchild)), "a process survived");
}

#[test]
fn a_fan_out_that_cannot_print_its_results_leaves_no_process_behind() {
    let sandbox = Sandbox::new(
        r#"
[services.later]
plugin = "template"
command = "@FAKE@"
settings = { args = ["sleep", "1", "{prompt}"] }

[services.hang]
plugin = "template"
command = "@FAKE@"
settings = { args = ["hang", "@DIR@", "{prompt}"] }
"#,
    );
    // A full disk behind stdout: printing the first answer fails, and the host exits on
    // that error with the hang still running.
    let full = std::fs::File::options().write(true).open("/dev/full").unwrap();
    let child = sandbox.host().args(["run", "later,hang", "x"]).stdout(full).stderr(Stdio::piped()).spawn().unwrap();
    let (pid, grandchild) = (read_pid(&sandbox.path("child.pid")), read_pid(&sandbox.path("grandchild.pid")));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("writing the results to stdout"), "{out:?}");
    assert!(eventually(Duration::from_secs(5), || !alive(pid) && !alive(grandchild)), "a process survived");
}

#[test]
fn sigint_starts_no_fan_out_service_still_waiting_for_its_turn() {
    let sandbox = Sandbox::new(
        r#"
[services.first]
plugin = "template"
command = "@FAKE@"
settings = { args = ["touch", "@DIR@/started-first", "60", "{prompt}"] }

[services.second]
plugin = "template"
command = "@FAKE@"
settings = { args = ["touch", "@DIR@/started-second", "60", "{prompt}"] }
"#,
    );
    let child = sandbox.host().args(["run", "first,second", "--jobs", "1", "--json", "x"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    assert!(eventually(Duration::from_secs(30), || sandbox.path("started-first").exists()), "the first service did not start");
    send_signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(!sandbox.path("started-second").exists(), "the second service started after the signal");
    let second = json_lines(&String::from_utf8_lossy(&out.stdout)).into_iter().find(|r| r["service"] == "second").unwrap();
    // Nothing was spawned (and then killed): no exit code, no signal.
    assert_eq!(second["error"]["kind"], "cancelled", "{second}");
    assert!(second["exit_code"].is_null() && second["signal"].is_null(), "{second}");
}

/// A service whose command marks that it started (`started-PROMPT`) and then runs a minute.
const MARKING: &str = r#"
[services.marking]
plugin = "template"
command = "@FAKE@"
settings = { args = ["touch", "@DIR@/started-{prompt}", "60"] }
"#;

const BATCH: &str = r#"
[defaults]
retry = { max_attempts = 1 }

[services.echo]
plugin = "template"
command = "echo"

[services.slow]
plugin = "template"
command = "@FAKE@"
settings = { args = ["sleep", "0.2", "{prompt}"] }

[services.failing]
plugin = "template"
command = "@FAKE@"
settings = { args = ["fail", "1", "HTTP 503 {prompt}"] }
"#;

fn write_jobs(sandbox: &Sandbox, lines: &[String]) -> String {
    let path = sandbox.path("jobs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.display().to_string()
}

#[test]
fn batch_results_carry_ids_and_outcomes_for_every_job_shape() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = write_jobs(
        &sandbox,
        &[
            r#"{"id": 1, "service": "echo", "prompt": "one"}"#.into(),
            r#"{"id": "two", "services": ["echo", "failing"], "prompt": "two"}"#.into(),
            r#"{"id": 3, "service": "failing", "fallback": ["echo"], "prompt": "three"}"#.into(),
            r#"{"id": 4, "service": "failing", "prompt": "four"}"#.into(),
        ],
    );
    let results = sandbox.path("results.jsonl");
    let run = sandbox.run(&["batch", &jobs, "-o", results.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    let by_id = |id: Value| json_lines(&std::fs::read_to_string(&results).unwrap()).into_iter().find(|r| r["id"] == id).unwrap();
    assert_eq!(by_id(1.into())["text"], "one");
    let two = by_id("two".into());
    assert_eq!((two["success"].as_bool(), two["results"].as_array().unwrap().len()), (Some(false), 2));
    assert_eq!((by_id(3.into())["service"].as_str(), by_id(3.into())["tried"][0]["service"].as_str()), (Some("echo"), Some("failing")));
    assert_eq!(by_id(4.into())["error"]["kind"], "transient");
    assert!(run.stderr.contains("2 ok, 2 failed"), "jobs 2 and 4 failed: {}", run.stderr);
}

#[test]
fn batch_reports_malformed_lines_with_their_numbers_and_strict_stops() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = write_jobs(
        &sandbox,
        &[
            r#"{"id": 1, "service": "echo", "prompt": "one"}"#.into(),
            "this is not json".into(),
            r#"{"id": 3, "service": "nope", "prompt": "x"}"#.into(),
            r#"{"id": 4, "prompt": "no service"}"#.into(),
            r#"{"id": 5, "service": "echo", "prompt": "five", "colour": "red"}"#.into(),
            r#"{"id": 6, "service": "echo", "prompt": "six"}"#.into(),
            r#"{"id": 7, "service": "echo", "prompt": "seven", "timeout": "0s"}"#.into(),
            r#"{"id": 8, "service": "echo", "prompt": "eight", "model": ""}"#.into(),
            r#"{"id": 9, "service": "echo", "prompt": "nine", "options": {"": "x"}}"#.into(),
            "[10, \"echo\", \"ten\"]".into(),
        ],
    );
    let run = sandbox.run(&["batch", &jobs]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout.lines().count(), 2, "results go to stdout without -o");
    for (line, says) in [(2, "not a JSON object"), (3, "unknown service `nope`"), (4, "give `service`"), (5, "unknown field `colour`"), (7, "invalid timeout \"0s\": it must be more than 0"), (8, "`model` is empty"), (9, "`options` has an empty option name"), (10, "not a JSON object: each line is one job")] {
        assert!(run.stderr.contains(&format!("jobs.jsonl:{line}: invalid job, skipped: {says}")), "line {line}: {}", run.stderr);
    }
    let strict = sandbox.run(&["batch", &jobs, "--strict"]);
    assert_eq!(strict.code, 2, "{strict:?}");
    assert_eq!(strict.stdout.lines().count(), 1, "stopped at line 2");
}

#[test]
fn batch_results_to_dash_go_to_stdout() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = write_jobs(&sandbox, &[r#"{"id": 1, "service": "echo", "prompt": "one"}"#.into()]);
    let run = sandbox.run(&["batch", &jobs, "-o", "-"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(json_lines(&run.stdout)[0]["text"], "one");
    assert!(!sandbox.path("-").exists(), "no file named `-` is written");
}

#[test]
fn batch_reports_a_line_that_is_not_utf8_and_runs_the_others() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = sandbox.path("jobs.jsonl");
    let mut text = br#"{"id": 1, "service": "echo", "prompt": "one"}"#.to_vec();
    text.extend(b"\n{\"id\": 2, \"service\": \"echo\", \"prompt\": \"\xff\"}\n");
    text.extend(br#"{"id": 3, "service": "echo", "prompt": "three"}"#);
    std::fs::write(&jobs, text).unwrap();
    let run = sandbox.run(&["batch", jobs.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("jobs.jsonl:2: invalid job, skipped: not UTF-8 text"), "{}", run.stderr);
    let mut ids: Vec<i64> = json_lines(&run.stdout).iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, [1, 3]);
}

#[test]
fn batch_reports_a_duplicate_id_with_both_line_numbers_and_runs_only_the_first() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = write_jobs(
        &sandbox,
        &[
            r#"{"id": 7, "service": "echo", "prompt": "first"}"#.into(),
            r#"{"id": "7", "service": "echo", "prompt": "a string id is another id"}"#.into(),
            r#"{"id": 7, "service": "echo", "prompt": "second"}"#.into(),
        ],
    );
    let results = sandbox.path("results.jsonl");
    let run = sandbox.run(&["batch", &jobs, "-o", results.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("jobs.jsonl:3: invalid job, skipped: duplicate id 7: line 1 has it already"), "{}", run.stderr);
    let mut texts: Vec<String> = json_lines(&std::fs::read_to_string(&results).unwrap()).iter().map(|r| r["text"].as_str().unwrap().to_string()).collect();
    texts.sort();
    assert_eq!(texts, ["a string id is another id", "first"]);
    // A rerun finds both ids done and still reports the duplicate.
    let rerun = sandbox.run(&["batch", &jobs, "-o", results.to_str().unwrap()]);
    assert!(rerun.stderr.contains("jobs.jsonl:3: invalid job, skipped: duplicate id 7"), "{}", rerun.stderr);
    assert!(rerun.stderr.contains("2 already done"), "{}", rerun.stderr);
    let strict = sandbox.run(&["batch", &jobs, "--strict"]);
    assert_eq!(strict.code, 2, "{strict:?}");
}

#[test]
fn batch_refuses_to_write_results_into_its_own_jobs_file() {
    let sandbox = Sandbox::new(BATCH);
    // The last line has no newline: taken for results, it would be cut off as a torn write.
    let text = "{\"id\": 1, \"service\": \"echo\", \"prompt\": \"one\"}\n{\"id\": 2, \"service\": \"echo\", \"prompt\": \"two\"}";
    let jobs = sandbox.path("jobs.jsonl");
    std::fs::write(&jobs, text).unwrap();
    let link = sandbox.path("link.jsonl");
    std::os::unix::fs::symlink(&jobs, &link).unwrap();
    let jobs = jobs.to_str().unwrap();
    for output in [jobs, link.to_str().unwrap()] {
        let run = sandbox.run(&["batch", jobs, "-o", output]);
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains("is the jobs file; pass another -o file"), "{}", run.stderr);
    }
    let from_stdin = sandbox.host().args(["batch", "-", "-o", jobs]).stdin(std::fs::File::open(jobs).unwrap()).output().unwrap();
    assert_eq!(from_stdin.status.code(), Some(2), "{from_stdin:?}");
    assert_eq!(std::fs::read_to_string(jobs).unwrap(), text, "the jobs file is untouched");
}

#[test]
fn a_request_naming_a_service_twice_or_an_empty_name_is_a_usage_error() {
    let sandbox = Sandbox::new(BATCH);
    for args in [&["run", "echo,echo", "hi"][..], &["run", "echo", "--fallback", "failing,echo", "hi"], &["run", "echo,", "hi"]] {
        let run = sandbox.run(args);
        assert_eq!((run.code, run.stdout.as_str()), (2, ""), "{args:?}: nothing runs: {run:?}");
        assert!(run.stderr.contains("named twice") || run.stderr.contains("empty service name"), "{args:?}: {}", run.stderr);
    }
    let jobs = write_jobs(&sandbox, &[r#"{"id": 1, "services": ["echo", "echo"], "prompt": "x"}"#.into()]);
    let run = sandbox.run(&["batch", &jobs]);
    assert!(run.stderr.contains("jobs.jsonl:1: invalid job, skipped: service `echo` is named twice"), "{}", run.stderr);
}

#[test]
fn a_batch_job_for_all_fans_out_to_every_service() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = write_jobs(
        &sandbox,
        &[
            r#"{"id": 1, "service": "all", "prompt": "x"}"#.into(),
            r#"{"id": 2, "services": ["all"], "prompt": "x"}"#.into(),
            r#"{"id": 3, "services": ["echo", "all"], "prompt": "x"}"#.into(),
            r#"{"id": 4, "service": "all", "fallback": ["echo"], "prompt": "x"}"#.into(),
        ],
    );
    let run = sandbox.run(&["batch", &jobs]);
    assert_eq!(run.code, 1, "the failing service fails jobs 1 and 2: {run:?}");
    let results = json_lines(&run.stdout);
    assert_eq!(results.len(), 2, "{results:?}");
    for result in &results {
        let mut services: Vec<&str> = result["results"].as_array().unwrap().iter().map(|r| r["service"].as_str().unwrap()).collect();
        services.sort();
        assert_eq!(services, ["echo", "failing", "slow"], "{result}");
    }
    assert!(run.stderr.contains("jobs.jsonl:3: invalid job, skipped: `all` means every service and stands alone"), "{}", run.stderr);
    assert!(run.stderr.contains("jobs.jsonl:4: invalid job, skipped: `fallback` goes with a single service, not `all`"), "{}", run.stderr);
}

#[test]
fn all_listed_with_other_services_is_a_usage_error() {
    let sandbox = Sandbox::new(BATCH);
    for args in [&["run", "echo,all", "hi"][..], &["run", "echo", "--fallback", "all", "hi"]] {
        let run = sandbox.run(args);
        assert_eq!((run.code, run.stdout.as_str()), (2, ""), "{args:?}: nothing runs: {run:?}");
        assert!(run.stderr.contains("`all` means every service and stands alone"), "{args:?}: {}", run.stderr);
    }
}

#[test]
fn all_with_no_services_configured_is_a_usage_error() {
    let sandbox = Sandbox::new("[defaults]\ntimeout = \"5s\"\n");
    let run = sandbox.run(&["run", "all", "hi"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("no services are configured"), "{}", run.stderr);
}

#[test]
fn batch_runs_no_more_commands_at_once_than_its_open_files_limit_allows() {
    use std::os::unix::process::CommandExt;
    let sandbox = Sandbox::new(BATCH);
    let jobs: Vec<String> = (0..40).map(|i| format!(r#"{{"id": {i}, "service": "slow", "prompt": "{i}"}}"#)).collect();
    let jobs = write_jobs(&sandbox, &jobs);
    let mut host = sandbox.host();
    host.args(["batch", &jobs, "--jobs", "100"]);
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
    unsafe {
        host.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
    }
    let out = host.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // 8 with the host's own files alone; fewer if the test's process passed some down.
    let at_a_time: usize = stderr.split("running ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect(&stderr);
    assert!((1..=8).contains(&at_a_time) && stderr.contains("at a time, not 100") && stderr.contains("may open 64"), "{stderr}");
    let results = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!((results.len(), results.iter().all(|r| r["success"] == true)), (40, true), "every job ran: {stderr}");
}

#[test]
fn batch_reads_jobs_from_stdin() {
    let sandbox = Sandbox::new(BATCH);
    let input = "{\"id\": \"a\", \"service\": \"echo\", \"prompt\": \"from stdin\"}\n";
    let run = sandbox.run_with_stdin(&["batch", "-"], input.as_bytes());
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(json_lines(&run.stdout)[0]["text"], "from stdin");
}

#[test]
fn batch_from_stdin_answers_each_job_before_the_input_ends() {
    use std::io::Write;
    let sandbox = Sandbox::new(BATCH);
    let mut child = sandbox.host().args(["batch", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, results) = std::sync::mpsc::channel();
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    for id in ["a", "b"] {
        writeln!(stdin, r#"{{"id": "{id}", "service": "echo", "prompt": "job {id}"}}"#).unwrap();
        stdin.flush().unwrap();
        let line = results.recv_timeout(Duration::from_secs(30)).expect("the result comes while stdin is still open");
        let j: Value = serde_json::from_str(&line).unwrap();
        assert_eq!((j["id"].as_str(), j["text"].as_str()), (Some(id), Some(format!("job {id}").as_str())));
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn sigint_ends_a_batch_reading_stdin_while_its_input_stays_open() {
    use std::io::Write;
    let sandbox = Sandbox::new(BATCH);
    let mut child = sandbox.host().args(["batch", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, r#"{{"id": "a", "service": "echo", "prompt": "one"}}"#).unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("\"id\":\"a\""), "{first}");
    send_signal(&child, libc::SIGINT);
    // The input is still open (and may never end): the host must not wait for it.
    let status = exit_within(&mut child, Duration::from_secs(10)).expect("the host waited for its input after SIGINT");
    assert_eq!(status.code(), Some(130));
    drop(stdin);
}

#[test]
fn batch_resumes_after_sigkill_with_every_id_exactly_once() {
    let sandbox = Sandbox::new(BATCH);
    let jobs: Vec<String> = (0..40).map(|i| format!(r#"{{"id": {i}, "service": "slow", "prompt": "job {i}"}}"#)).collect();
    let jobs = write_jobs(&sandbox, &jobs);
    let results = sandbox.path("results.jsonl");
    let mut child = sandbox.host().args(["batch", &jobs, "-o", results.to_str().unwrap(), "--jobs", "4"]).stderr(Stdio::null()).spawn().unwrap();
    let count = || std::fs::read_to_string(&results).map(|t| t.lines().count()).unwrap_or(0);
    assert!(eventually(Duration::from_secs(30), || count() >= 8), "no progress");
    child.kill().unwrap();
    child.wait().unwrap();
    let before = count();
    assert!(before < 40, "the batch finished before it was killed");
    let rerun = sandbox.run(&["batch", &jobs, "-o", results.to_str().unwrap(), "--jobs", "8"]);
    assert_eq!(rerun.code, 0, "{rerun:?}");
    assert!(rerun.stderr.contains(&format!("{before} already done")), "{}", rerun.stderr);
    let mut ids: Vec<i64> = json_lines(&std::fs::read_to_string(&results).unwrap()).iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..40).collect::<Vec<_>>());
}

#[test]
fn sigterm_stops_a_batch_without_starting_another_job() {
    let sandbox = Sandbox::new(MARKING);
    let jobs: Vec<String> = (0..20).map(|i| format!(r#"{{"id": {i}, "service": "marking", "prompt": "{i}"}}"#)).collect();
    let jobs = write_jobs(&sandbox, &jobs);
    let results = sandbox.path("results.jsonl");
    let child = sandbox.host().args(["batch", &jobs, "-o", results.to_str().unwrap(), "--jobs", "2"]).stderr(Stdio::piped()).spawn().unwrap();
    let started = || std::fs::read_dir(sandbox.path("")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("started-")).count();
    assert!(eventually(Duration::from_secs(30), || started() == 2), "the first two jobs did not start");
    send_signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143));
    assert_eq!(started(), 2, "no job started after the signal");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 interrupted (a rerun does them)"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&results).unwrap(), "", "an interrupted job has no result line");
}

#[test]
fn a_second_batch_on_the_same_results_file_is_refused_while_the_first_runs() {
    let sandbox = Sandbox::new(MARKING);
    let jobs = write_jobs(&sandbox, &[r#"{"id": 1, "service": "marking", "prompt": "1"}"#.into()]);
    let results = sandbox.path("results.jsonl");
    let first = sandbox.host().args(["batch", &jobs, "-o", results.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap();
    assert!(eventually(Duration::from_secs(30), || sandbox.path("started-1").exists()), "the first batch did not start");
    let second = sandbox.run(&["batch", &jobs, "-o", results.to_str().unwrap()]);
    assert_eq!(second.code, 2, "{second:?}");
    assert!(second.stderr.contains("is in use by another host batch"), "{}", second.stderr);
    send_signal(&first, libc::SIGINT);
    assert_eq!(first.wait_with_output().unwrap().status.code(), Some(130));
}

#[test]
fn a_batch_that_cannot_write_its_results_stops_and_exits_1() {
    let sandbox = Sandbox::new(BATCH);
    let jobs: Vec<String> = (0..3).map(|i| format!(r#"{{"id": {i}, "service": "echo", "prompt": "{i}"}}"#)).collect();
    let jobs = write_jobs(&sandbox, &jobs);
    // A device that reads as endless zeros and refuses every write: it is not read back as
    // earlier results, and the first failed write stops the batch.
    let run = sandbox.run(&["batch", &jobs, "-o", "/dev/full"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("No space left on device") && run.stderr.contains("(results: /dev/full)"), "{}", run.stderr);
    assert!(run.stderr.contains("0 ok, 0 failed"), "no job counts as done: {}", run.stderr);
}

#[test]
fn batch_removes_a_last_result_line_cut_short_and_passes_over_blank_lines() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = write_jobs(&sandbox, &[r#"{"id": 1, "service": "echo", "prompt": "one"}"#.into(), r#"{"id": 2, "service": "echo", "prompt": "two"}"#.into()]);
    let results = sandbox.path("results.jsonl");
    std::fs::write(&results, "{\"id\":1,\"success\":true}\n\r\n{\"id\":2,\"succ").unwrap();
    let run = sandbox.run(&["batch", &jobs, "-o", results.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let text = std::fs::read_to_string(&results).unwrap();
    assert!(text.starts_with("{\"id\":1,\"success\":true}\n\r\n{\"id\":2,"), "the blank line stays, the torn one goes: {text}");
    let ids: Vec<i64> = json_lines(text.split_once("\r\n").unwrap().1).iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [2]);
}

#[test]
fn fan_out_shows_a_live_status_line_per_service_on_a_terminal_only() {
    let sandbox = Sandbox::new(BATCH);
    let screen = on_a_terminal(&sandbox, "run echo,slow hi");
    for seen in ["echo", "slow", "waiting", "running", "done", "=== slow ("] {
        assert!(screen.contains(seen), "{seen:?} not on the terminal: {screen}");
    }
    let piped = sandbox.run(&["run", "echo,slow", "hi"]);
    assert!(!piped.stderr.contains("waiting") && !piped.stderr.contains("running"), "{}", piped.stderr);
}

#[test]
fn fan_out_counts_services_in_one_line_when_theirs_would_not_fit_on_the_terminal() {
    let sandbox = Sandbox::new(BATCH);
    // A service's own line starts with its name padded to 14 columns.
    let own_line = format!("{:<14} ", "slow");
    let small = on_a_terminal_of(&sandbox, 3, "run all hi");
    assert!(small.contains("3 services") && small.contains(" running"), "the slow service runs for a tick at least: {small}");
    assert!(!small.contains(&own_line), "no line of its own per service: {small}");
    let tall = on_a_terminal_of(&sandbox, 4, "run all hi");
    assert!(!tall.contains("3 services") && tall.contains(&own_line), "{tall}");
}

#[test]
fn batch_shows_a_progress_bar_on_a_terminal_only() {
    let sandbox = Sandbox::new(BATCH);
    let jobs = write_jobs(&sandbox, &[r#"{"id": 1, "service": "slow", "prompt": "a"}"#.into(), r#"{"id": 2, "service": "echo", "prompt": "b"}"#.into()]);
    let screen = on_a_terminal(&sandbox, &format!("batch {jobs} -o {}", sandbox.path("results.jsonl").display()));
    assert!(screen.contains("2/2 done, 0 failed, 0 running"), "{screen}");
    assert!(screen.contains("ETA"), "{screen}");
    let piped = sandbox.run(&["batch", &jobs]);
    assert!(!piped.stderr.contains("done,"), "{}", piped.stderr);
}
