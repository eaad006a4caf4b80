//! Parser tests on outputs recorded from the real CLI (see fixtures/README.md), and the
//! command line built for a request.

use super::*;
use exechost_plugin_sdk::recorded;
use exechost_plugin_sdk::testing::{check_recorded, request, service};

#[test]
fn recorded_runs_parse_to_answers_and_classified_failures() {
    check_recorded::<Qwen>(
        "qwen",
        &[
            ("ok", recorded!("ok"), None),
            ("429", recorded!("429"), Some(FailureKind::RateLimited)),
            ("401", recorded!("401"), Some(FailureKind::Auth)),
            ("500", recorded!("500"), Some(FailureKind::Transient)),
            ("down", recorded!("down"), Some(FailureKind::Transient)),
        ],
    );
}

#[test]
fn a_prompt_that_looks_like_an_option_stays_one_argument() {
    let prompt = "--help me\nwith \"this\" $(and that)";
    let command = Qwen::build_command(service("qwen", "{}"), request(prompt)).unwrap();
    assert_eq!(command.args.iter().filter(|a| a.contains("$(and that)")).count(), 1, "{:?}", command.args);
    assert!(!command.args.iter().any(|a| a == "--help" || a == "--help me"), "{:?}", command.args);
}

#[test]
fn the_model_is_the_requested_one_else_the_default() {
    let mut svc = service("qwen", "{}");
    svc.default_model = Some("default-m".into());
    let args = Qwen::build_command(svc.clone(), request("hi")).unwrap().args;
    assert!(args.iter().any(|a| a == "default-m"), "{args:?}");
    let mut req = request("hi");
    req.model = Some("asked-m".into());
    let args = Qwen::build_command(svc, req).unwrap().args;
    assert!(args.iter().any(|a| a == "asked-m") && !args.iter().any(|a| a == "default-m"), "{args:?}");
}

#[test]
fn unknown_settings_are_reported() {
    let err = Qwen::validate(service("qwen", r#"{"extra_argz": []}"#)).unwrap_err();
    assert!(err.contains("extra_argz"), "{err}");
}
