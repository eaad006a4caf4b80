//! services.toml errors through the real binary: file, line, column, service, exit code 2.

mod common;

use common::Sandbox;

fn config_error(text: &str) -> String {
    let sandbox = Sandbox::new(text);
    let run = sandbox.run(&["run", "x", "hi"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains(&sandbox.path("services.toml").display().to_string()), "names the file: {}", run.stderr);
    run.stderr
}

#[test]
fn a_syntax_error_names_line_and_column() {
    let err = config_error("[services.x]\nplugin = \"template\"\ncommand = \"echo\n");
    assert!(err.contains("line 3, column"), "{err}");
    assert!(err.contains("service x"), "{err}");
}

#[test]
fn an_unknown_key_is_an_error_naming_the_service() {
    let err = config_error("[services.x]\nplugin = \"template\"\ncommand = \"echo\"\n\n[services.y]\nplugin = \"template\"\ncommand = \"echo\"\ntimout = \"1s\"\n");
    assert!(err.contains("line 8") && err.contains("service y") && err.contains("timout"), "{err}");
}

#[test]
fn a_bad_duration_says_how_to_write_one() {
    let err = config_error("[services.x]\nplugin = \"template\"\ncommand = \"echo\"\ntimeout = \"ten\"\n");
    assert!(err.contains("line 4") && err.contains("\"90s\""), "{err}");
}

#[test]
fn a_duration_too_long_for_the_clock_is_an_error_not_a_crash() {
    let err = config_error("[services.x]\nplugin = \"template\"\ncommand = \"echo\"\ntimeout = \"99999999999999999999999999d\"\n");
    assert!(err.contains("line 4") && err.contains("longer than the longest allowed"), "{err}");
}

#[test]
fn command_line_timeouts_and_job_counts_out_of_range_are_usage_errors() {
    let sandbox = Sandbox::new("[services.x]\nplugin = \"template\"\ncommand = \"echo\"\n");
    for (args, says) in [
        (&["run", "x", "--timeout", "0s", "hi"][..], "must be more than 0"),
        (&["run", "x", "--timeout", "99999999999999999999999999d", "hi"], "longer than the longest allowed"),
        (&["run", "x", "--jobs", "0", "hi"], "at least 1 job"),
        (&["batch", "-", "--jobs", "0"], "at least 1 job"),
        (&["health", "--timeout", "0ms"], "must be more than 0"),
        (&["run", "x", "-o", "=value", "hi"], "empty option name"),
    ] {
        let run = sandbox.run(args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    }
}

#[test]
fn limits_out_of_range_are_errors_naming_the_service_and_the_key() {
    for (line, says) in [
        ("plugin_memory = \"100GiB\"", "`plugin_memory` must be from 1MiB to 4GiB"),
        ("plugin_memory = \"1KiB\"", "`plugin_memory` must be from 1MiB to 4GiB"),
        ("plugin_time = \"0s\"", "`plugin_time` must be more than 0"),
        ("max_output = 0", "`max_output` must be more than 0"),
    ] {
        let err = config_error(&format!("[services.x]\nplugin = \"template\"\ncommand = \"echo\"\n{line}\n"));
        assert!(err.contains(&format!("service x: {says}")), "{line}: {err}");
    }
}

#[test]
fn an_unknown_builtin_plugin_lists_the_builtins() {
    let err = config_error("[services.x]\nplugin = \"gemeni\"\ncommand = \"echo\"\n");
    assert!(err.contains(":2:10: service x: unknown built-in plugin `gemeni`"), "{err}");
}

#[test]
fn the_reserved_name_all_is_refused() {
    let err = config_error("[services.all]\nplugin = \"template\"\ncommand = \"echo\"\n");
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn exechost_config_is_used_when_no_option_is_given() {
    let sandbox = Sandbox::new("[services.viaenv]\nplugin = \"template\"\ncommand = \"echo\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
        .args(["run", "viaenv", "found"])
        .current_dir(std::env::temp_dir())
        .env("EXECHOST_CONFIG", sandbox.path("services.toml"))
        .env("XDG_CACHE_HOME", &sandbox.cache)
        .arg("--no-state")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "found\n");
}

#[test]
fn the_builtin_configuration_is_the_last_resort() {
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
        .args(["run", "echo", "built in"])
        .current_dir(empty.path())
        .env_remove("EXECHOST_CONFIG")
        .env("XDG_CONFIG_HOME", empty.path())
        .env("XDG_CACHE_HOME", common::shared_cache())
        .env("XDG_STATE_HOME", empty.path())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "built in\n", "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_relative_command_path_is_taken_from_the_configuration_file_not_the_current_directory() {
    let sandbox = Sandbox::new("[services.x]\nplugin = \"template\"\ncommand = \"bin/tool\"\n");
    let elsewhere = tempfile::tempdir().unwrap();
    for (dir, says) in [(sandbox.path(""), "configured"), (elsewhere.path().to_path_buf(), "decoy")] {
        common::write_script(&dir.join("bin/tool"), &format!("echo {says} \"$@\""));
    }
    let run: common::Run = sandbox.host().current_dir(elsewhere.path()).args(["--no-state", "run", "x", "hi"]).output().unwrap().into();
    assert_eq!((run.code, run.stdout.as_str()), (0, "configured hi\n"), "{run:?}");
    std::fs::remove_file(sandbox.path("bin/tool")).unwrap();
    let gone: common::Run = sandbox.host().current_dir(elsewhere.path()).args(["--no-state", "run", "x", "hi"]).output().unwrap().into();
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(gone.stderr.contains(&format!("command `{}` does not exist", sandbox.path("bin/tool").display())), "{}", gone.stderr);
}

#[test]
fn command_and_plugin_paths_may_start_with_the_home_directory() {
    let sandbox = Sandbox::new("[services.x]\nplugin = \"template\"\ncommand = \"~/bin/tool\"\n\n[services.y]\nplugin = \"~/plugins/y.wasm\"\ncommand = \"echo\"\n");
    let home = tempfile::tempdir().unwrap();
    common::write_script(&home.path().join("bin/tool"), "echo from home \"$@\"");
    let run: common::Run = sandbox.host().env("HOME", home.path()).args(["--no-state", "run", "x", "hi"]).output().unwrap().into();
    assert_eq!(run.code, 2, "y's plugin is not there: {run:?}");
    assert!(run.stderr.contains(&format!("plugin file {}/plugins/y.wasm does not exist", home.path().display())), "{}", run.stderr);
    std::fs::create_dir_all(home.path().join("plugins")).unwrap();
    std::fs::write(home.path().join("plugins/y.wasm"), b"not wasm").unwrap();
    let run: common::Run = sandbox.host().env("HOME", home.path()).args(["--no-state", "run", "x", "hi"]).output().unwrap().into();
    assert_eq!((run.code, run.stdout.as_str()), (0, "from home hi\n"), "{run:?}");
}
