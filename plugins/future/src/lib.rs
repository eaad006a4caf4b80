//! A test-only plugin built against a future, incompatible version of the contract
//! (exechost:service@0.2.0), so the host's tests can check it is refused with a clear message.

wit_bindgen::generate!({
    inline: "
        package exechost:service@0.2.0;
        interface plugin {
            info: func() -> string;
        }
        world service-plugin {
            export plugin;
        }
    ",
});

struct Future;

impl exports::exechost::service::plugin::Guest for Future {
    fn info() -> String {
        "from the future".into()
    }
}

export!(Future);
