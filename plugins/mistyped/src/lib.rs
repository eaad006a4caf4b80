//! A test-only plugin that exports the contract's interface, under its name and version
//! (exechost:service/plugin@0.1.0), with functions of the right names but the wrong types,
//! so the host's tests can check that it is refused before any call goes through.

wit_bindgen::generate!({
    inline: "
        package exechost:service@0.1.0;
        interface plugin {
            info: func() -> string;
            validate: func() -> string;
            build-command: func() -> string;
            parse-output: func() -> string;
            health-command: func() -> string;
        }
        world service-plugin {
            export plugin;
        }
    ",
});

struct Mistyped;

impl exports::exechost::service::plugin::Guest for Mistyped {
    fn info() -> String {
        "not plugin info".into()
    }
    fn validate() -> String {
        "no".into()
    }
    fn build_command() -> String {
        "no".into()
    }
    fn parse_output() -> String {
        "no".into()
    }
    fn health_command() -> String {
        "no".into()
    }
}

export!(Mistyped);
