//! The plugin runtime through the real binary: a broken or hostile plugin fails its own
//! service with a clear message, never the host; compiled plugins are cached.

mod common;

use common::Sandbox;

fn misbehaving(mode: &str, extra: &str) -> Sandbox {
    Sandbox::new(&format!(
        r#"
[services.bad]
plugin = "@MISBEHAVE@"
command = "echo"
{extra}
settings = {{ mode = "{mode}" }}

[services.good]
plugin = "template"
command = "echo"
"#
    ))
}

fn plugin_error(sandbox: &Sandbox) -> String {
    let run = sandbox.run(&["run", "bad", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["error"]["kind"], "plugin-error", "{j}");
    let message = j["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("misbehave_plugin.wasm"), "the message names the plugin: {message}");
    // The host is unharmed: another service still answers.
    let good = sandbox.run(&["run", "good", "still fine"]);
    assert_eq!((good.code, good.stdout.as_str()), (0, "still fine\n"));
    message
}

#[test]
fn a_plugin_that_traps_fails_its_service_with_the_panic_message() {
    let message = plugin_error(&misbehaving("trap", ""));
    assert!(message.contains("trapped") && message.contains("build-command"), "{message}");
    assert!(message.contains("deliberate trap"), "the plugin's stderr is quoted: {message}");
}

#[test]
fn a_plugin_that_loops_forever_is_stopped_by_its_time_limit() {
    let message = plugin_error(&misbehaving("loop", "plugin_time = \"200ms\""));
    assert!(message.contains("CPU time limit of 200ms"), "{message}");
}

#[test]
fn a_slow_plugin_call_within_its_time_limit_answers() {
    for mode in ["slow@build", "slow@parse"] {
        let sandbox = misbehaving(mode, "");
        let run = sandbox.run(&["run", "bad", "the answer"]);
        assert_eq!((run.code, run.stdout.as_str()), (0, "the answer\n"), "{mode}: {run:?}");
    }
}

#[test]
fn a_slow_plugin_call_beyond_its_time_limit_is_stopped() {
    let message = plugin_error(&misbehaving("slow", "plugin_time = \"20ms\""));
    assert!(message.contains("CPU time limit of 20ms"), "{message}");
}

#[test]
fn a_plugin_blocked_in_a_sleep_is_stopped_after_ten_times_its_time_limit() {
    let message = plugin_error(&misbehaving("sleep", "plugin_time = \"20ms\""));
    assert!(message.contains("longer than 200ms of wall time in build-command"), "{message}");
}

#[test]
fn a_looping_plugin_does_not_hold_up_another_service_in_a_fan_out() {
    let sandbox = misbehaving("loop", "plugin_time = \"3s\"");
    let run = sandbox.run(&["run", "bad,good", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let services: Vec<_> = common::json_lines(&run.stdout).into_iter().map(|r| r["service"].clone()).collect();
    assert_eq!(services, ["good", "bad"], "the good service answers while the bad plugin loops: {run:?}");
}

#[test]
fn more_slow_plugin_calls_than_instance_slots_wait_for_a_slot_and_all_answer() {
    // Each call computes until 40 ms have passed, yielding every epoch tick: the 20 calls
    // are in progress together, more than the runtime has instance slots.
    let config: String = (0..20)
        .map(|i| format!("[services.s{i:02}]\nplugin = \"@MISBEHAVE@\"\ncommand = \"echo\"\nsettings = {{ mode = \"slow\" }}\n\n"))
        .collect();
    let sandbox = Sandbox::new(&config);
    let run = sandbox.run(&["run", "all", "--json", "x"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout.lines().count(), 20, "{run:?}");
}

#[test]
fn every_plugin_call_starts_from_a_fresh_instance_with_nothing_left_by_earlier_calls() {
    // Each call finds its zeroed and its initialised memory as built, then scribbles on both;
    // 60 requests, 4 at a time, reuse the runtime's instance slots many times over.
    let sandbox = misbehaving("remember", "");
    let jobs: String = (0..60).map(|i| format!("{{\"id\": {i}, \"service\": \"bad\", \"prompt\": \"x\"}}\n")).collect();
    std::fs::write(sandbox.path("jobs.jsonl"), jobs).unwrap();
    let run = sandbox.run(&["batch", sandbox.path("jobs.jsonl").to_str().unwrap(), "-o", "-", "--jobs", "4"]);
    assert_eq!(run.code, 0, "{run:?}");
    let fresh = "0 calls before, 0 bytes dirty, data as built";
    let results = common::json_lines(&run.stdout);
    assert_eq!(results.len(), 60, "{run:?}");
    for result in results {
        assert_eq!(result["text"], format!("build: {fresh}; parse: {fresh}"), "{result}");
    }
}

#[test]
fn a_plugin_that_allocates_too_much_is_stopped_by_its_memory_limit() {
    let message = plugin_error(&misbehaving("alloc", "plugin_memory = \"16MiB\""));
    assert!(message.contains("memory limit of 16 MiB"), "{message}");
}

#[test]
fn a_plugin_that_traps_while_parsing_output_fails_after_the_command_ran() {
    let message = plugin_error(&misbehaving("trap@parse", ""));
    assert!(message.contains("parse-output"), "{message}");
}

#[test]
fn a_plugin_cannot_set_ld_preload_or_path() {
    for mode in ["hijack-env", "path-env"] {
        let message = plugin_error(&misbehaving(mode, ""));
        assert!(message.contains("may not set"), "{message}");
    }
}

#[test]
fn plugin_stderr_goes_to_the_debug_log_only() {
    let sandbox = misbehaving("stderr", "");
    let quiet = sandbox.run(&["run", "bad", "x"]);
    assert_eq!(quiet.code, 0, "{quiet:?}");
    assert!(!quiet.stderr.contains("a line on the plugin's stderr"), "{}", quiet.stderr);
    let verbose = sandbox.run(&["-vv", "run", "bad", "x"]);
    assert!(verbose.stderr.contains("a line on the plugin's stderr"), "{}", verbose.stderr);
}

#[test]
fn a_plugin_that_needs_file_contents_gets_them_from_the_host() {
    let sandbox = misbehaving("ok", "");
    std::fs::write(sandbox.path("note.txt"), "contents of the note").unwrap();
    let run = sandbox.run(&["run", "bad", "-f", "note.txt", "prompt"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "prompt contents of the note\n");
}

#[test]
fn a_file_over_max_file_size_is_refused() {
    let sandbox = misbehaving("ok", "max_file_size = 10");
    std::fs::write(sandbox.path("big.txt"), "more than ten bytes").unwrap();
    let run = sandbox.run(&["run", "bad", "--json", "-f", "big.txt", "prompt"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["error"]["kind"], "invalid-request");
    assert!(j["error"]["message"].as_str().unwrap().contains("max_file_size"), "{j}");
}

fn with_plugin_file(bytes: &[u8]) -> Sandbox {
    let sandbox = Sandbox::new(
        r#"
[services.broken]
plugin = "broken.wasm"
command = "echo"
"#,
    );
    std::fs::write(sandbox.path("broken.wasm"), bytes).unwrap();
    sandbox
}

fn broken_message(sandbox: &Sandbox) -> String {
    let run = sandbox.run(&["run", "broken", "--json", "x"]);
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["error"]["kind"], "plugin-error");
    let message = j["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(&sandbox.path("broken.wasm").display().to_string()), "names the path: {message}");
    message
}

#[test]
fn a_file_that_is_not_wasm_is_a_clear_plugin_error() {
    let message = broken_message(&with_plugin_file(b"#!/bin/sh\necho hi\n"));
    assert!(message.contains("not a WebAssembly file"), "{message}");
}

#[test]
fn a_core_module_is_not_a_component() {
    let message = broken_message(&with_plugin_file(b"\0asm\x01\0\0\0"));
    assert!(message.contains("core WebAssembly module, not a component"), "{message}");
}

#[test]
fn a_component_of_another_world_is_refused() {
    // The smallest valid component: a header with no sections, so it exports nothing.
    let message = broken_message(&with_plugin_file(b"\0asm\x0d\0\x01\0"));
    assert!(message.contains("does not export exechost:service/plugin@0.1.0"), "{message}");
}

#[test]
fn a_missing_plugin_file_is_a_configuration_error_with_its_position() {
    let sandbox = Sandbox::new("[services.x]\nplugin = \"plugins/missing.wasm\"\ncommand = \"echo\"\n");
    let run = sandbox.run(&["run", "x", "hi"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("services.toml:2:10: service x: plugin file"), "{}", run.stderr);
    assert!(run.stderr.contains("missing.wasm does not exist"), "{}", run.stderr);
}

#[test]
fn the_second_run_loads_the_compiled_plugin_from_the_cache() {
    let sandbox = Sandbox::with_own_cache(common::ECHO);
    assert_eq!(sandbox.run(&["run", "echo", "one"]).code, 0);
    let cached: Vec<_> = std::fs::read_dir(sandbox.cache.join("exechost/plugins")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let written = std::fs::metadata(&cached[0]).unwrap().modified().unwrap();
    let debug = sandbox.run(&["-vv", "run", "echo", "two"]);
    assert_eq!(debug.stdout, "two\n");
    assert_eq!(std::fs::metadata(&cached[0]).unwrap().modified().unwrap(), written, "recompiled");
}

#[test]
fn a_corrupt_cache_entry_is_recompiled() {
    let sandbox = Sandbox::with_own_cache(common::ECHO);
    assert_eq!(sandbox.run(&["run", "echo", "one"]).code, 0);
    let entry = std::fs::read_dir(sandbox.cache.join("exechost/plugins")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&entry, b"garbage").unwrap();
    let run = sandbox.run(&["run", "echo", "two"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "two\n"), "{run:?}");
    assert_ne!(std::fs::read(&entry).unwrap(), b"garbage", "the entry was rewritten");
}

#[test]
fn a_plugin_whose_contract_functions_have_the_wrong_types_is_refused() {
    let sandbox = with_plugin_file(&std::fs::read(common::built_plugin("mistyped_plugin")).unwrap());
    let message = broken_message(&sandbox);
    assert!(message.contains("does not match the exechost:service@0.1.0 contract") && message.contains("in info"), "{message}");
}

#[test]
fn a_plugin_for_an_incompatible_contract_version_is_refused() {
    let sandbox = with_plugin_file(&std::fs::read(common::built_plugin("future_plugin")).unwrap());
    let message = broken_message(&sandbox);
    assert!(message.contains("targets exechost:service/plugin@0.2.0") && message.contains("0.1.x"), "{message}");
}
