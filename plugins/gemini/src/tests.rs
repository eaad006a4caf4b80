//! Parser tests on outputs recorded from the real CLI (see fixtures/README.md), and the
//! command line built for a request.

use super::*;

exechost_plugin_sdk::plugin_tests!(Gemini, "gemini");

#[test]
fn an_untrusted_folder_says_how_to_trust_it() {
    let output = Output {
        status: ExitStatus::Code(55),
        stdout: Vec::new(),
        stderr: b"Gemini CLI is not running in a trusted directory. To proceed, either use --skip-trust, set the GEMINI_CLI_TRUST_WORKSPACE=true environment variable, or trust this directory in interactive mode".to_vec(),
        duration_ms: 900,
        stdout_truncated: false,
        stderr_truncated: false,
    };
    let failure = Gemini::parse_output(service("gemini", "{}"), request("hi"), output).unwrap_err();
    assert_eq!(failure.kind, FailureKind::InvalidRequest);
    assert!(failure.message.contains("trust_workspace"), "{}", failure.message);
}

#[test]
fn the_trust_switch_sets_the_environment_variable_unless_turned_off() {
    let on = Gemini::build_command(service("gemini", "{}"), request("hi")).unwrap();
    assert!(on.env.contains(&("GEMINI_CLI_TRUST_WORKSPACE".into(), "true".into())));
    let off = Gemini::build_command(service("gemini", r#"{"trust_workspace": false}"#), request("hi")).unwrap();
    assert!(off.env.iter().all(|(k, _)| k != "GEMINI_CLI_TRUST_WORKSPACE"));
}
