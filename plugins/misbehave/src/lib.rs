//! A deliberately misbehaving plugin, used only by the host's tests to prove that a broken
//! or hostile plugin fails its own service and never the host. `settings.mode` picks the
//! misbehaviour; "ok" behaves (the prompt becomes the only argument); "remember" reports
//! whatever an earlier call left in the instance's memory.

wit_bindgen::generate!({
    path: "../../wit",
    world: "service-plugin",
});

use exechost::service::types::{Command, Failure, FailureKind, Output, PluginInfo, Request, Response, Service};
use exports::exechost::service::plugin::Guest;

struct Misbehave;

/// What mode "remember" looks for and leaves behind: a call counter and a buffer in memory
/// a fresh instance starts zeroed, and text in memory it starts initialised.
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static ZEROED: std::sync::Mutex<[u8; 64 * 1024]> = std::sync::Mutex::new([0; 64 * 1024]);
static INITIALISED: std::sync::Mutex<[u8; 8]> = std::sync::Mutex::new(*b"as built");

/// Mode "remember": what this instance finds of earlier calls (a fresh one finds nothing),
/// after which it leaves its own marks for a later call to find.
fn remember() -> String {
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut zeroed = ZEROED.lock().unwrap_or_else(|p| p.into_inner());
    let dirty = zeroed.iter().filter(|b| **b != 0).count();
    zeroed.fill(0xaa);
    let mut initialised = INITIALISED.lock().unwrap_or_else(|p| p.into_inner());
    let text = String::from_utf8_lossy(&*initialised).into_owned();
    initialised.copy_from_slice(b"was used");
    format!("{calls} calls before, {dirty} bytes dirty, data {text}")
}

fn setting(service: &Service, key: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&service.settings).ok()?.get(key).cloned()
}

fn mode(service: &Service) -> String {
    setting(service, "mode").and_then(|m| m.as_str().map(str::to_string)).unwrap_or_else(|| "ok".into())
}

/// Runs the misbehaviour named `mode` if the current phase is the one it targets.
fn misbehave(mode: &str, phase: &str) -> Option<Command> {
    let (what, when) = mode.split_once('@').unwrap_or((mode, "build"));
    if when != phase {
        return None;
    }
    match what {
        "trap" => panic!("misbehave: deliberate trap"),
        "loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "slow" => {
            // Busy for 40 ms, then behaves.
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(40) {
                std::hint::black_box(started);
            }
            None
        }
        "sleep" => {
            // Blocked in a WASI call, not computing: only a wall-time limit can end this.
            std::thread::sleep(std::time::Duration::from_secs(3600));
            None
        }
        "alloc" => {
            let big = vec![1u8; 1 << 30];
            std::hint::black_box(&big);
            None
        }
        "stderr" => {
            eprintln!("misbehave: a line on the plugin's stderr");
            None
        }
        "hijack-env" => Some(Command {
            args: vec!["x".into()],
            env: vec![("LD_PRELOAD".into(), "/tmp/evil.so".into())],
            stdin: None,
        }),
        "remember" => Some(Command { args: vec![remember()], env: Vec::new(), stdin: None }),
        "path-env" => Some(Command {
            args: vec!["x".into()],
            env: vec![("PATH".into(), "/tmp/evil".into())],
            stdin: None,
        }),
        _ => None,
    }
}

impl Guest for Misbehave {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "misbehave".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin that traps, loops or allocates on request".into(),
            supports_files: false,
            supports_stdin: false,
            needs_file_contents: true,
            models: Vec::new(),
        }
    }

    fn validate(service: Service) -> Result<(), String> {
        misbehave(&mode(&service), "validate");
        Ok(())
    }

    fn build_command(service: Service, request: Request) -> Result<Command, Failure> {
        if let Some(cmd) = misbehave(&mode(&service), "build") {
            return Ok(cmd);
        }
        // `settings.args`, then the prompt, then the contents of each file handed over.
        let mut args: Vec<String> = setting(&service, "args")
            .and_then(|a| serde_json::from_value(a).ok())
            .unwrap_or_default();
        args.push(request.prompt);
        for file in request.files {
            let contents = file.contents.ok_or_else(|| Failure {
                kind: FailureKind::PluginError,
                message: "the host did not hand over file contents".into(),
                retry_after_ms: None,
            })?;
            args.push(String::from_utf8_lossy(&contents).into_owned());
        }
        Ok(Command { args, env: vec![("EXECHOST_TEST_VAR".into(), "set-by-plugin".into())], stdin: None })
    }

    fn parse_output(service: Service, _request: Request, output: Output) -> Result<Response, Failure> {
        misbehave(&mode(&service), "parse");
        let mut text = String::from_utf8_lossy(&output.stdout).trim_end().to_string();
        if mode(&service) == "remember" {
            text = format!("build: {text}; parse: {}", remember());
        }
        Ok(Response {
            text,
            model: None,
            usage: None,
            cost_usd: None,
        })
    }

    fn health_command(_service: Service) -> Option<Command> {
        None
    }
}

export!(Misbehave);
