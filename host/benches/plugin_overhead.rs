//! Plugin overhead per request: a fresh store and instance for build-command, and another
//! for parse-output, on the built-in template plugin. Prints the median and percentiles.
//!
//! Run: `cargo bench -p host --bench plugin_overhead`

use std::time::{Duration, Instant};

use exechost::config::PluginSource;
use exechost::plugin::{PluginLimits, Runtime, wit};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let cache = tempfile_dir();
    let runtime = Runtime::new(64 << 20, Some(cache.clone())).expect("runtime");
    let limits = PluginLimits { memory: 64 << 20, time: Duration::from_secs(1) };
    let started = Instant::now();
    let plugin = runtime.load(&PluginSource::Builtin("template".into()), limits).expect("load");
    let first_load = started.elapsed();
    let service = wit::Service {
        name: "bench".into(),
        command: "echo".into(),
        default_model: None,
        models: Vec::new(),
        settings: r#"{"template": "{command} -p {prompt} {files} --model {model}", "model_flag": "--model", "file_prefix": "@"}"#.into(),
    };
    let request = wit::Request {
        prompt: "Summarise the attached file in three sentences, please.".into(),
        files: vec![wit::File { path: "/tmp/notes.txt".into(), contents: None }],
        model: Some("model-1".into()),
        options: Vec::new(),
    };
    let output = wit::Output {
        status: wit::ExitStatus::Code(0),
        stdout: b"The file says three things. One. Two. Three.\n".to_vec(),
        stderr: Vec::new(),
        duration_ms: 12,
        stdout_truncated: false,
        stderr_truncated: false,
    };
    // The host's own kind of runtime: one thread, plugin calls on the caller's task.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let one = || {
        rt.block_on(async {
            let cmd = plugin.build_command(&service, &request).await.unwrap().unwrap();
            assert_eq!(cmd.args.len(), 5);
            let response = plugin.parse_output(&service, &request, &output).await.unwrap().unwrap();
            assert!(response.text.starts_with("The file"));
        })
    };
    for _ in 0..2_000 {
        one();
    }
    let mut samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        one();
        samples.push(t.elapsed());
    }
    samples.sort();
    println!("plugin overhead per request (build-command + parse-output, each in a fresh instance):");
    println!(
        "  median {:.1} µs   p90 {:.1} µs   p99 {:.1} µs   ({} samples)",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.9).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.len()
    );
    let mut info = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        rt.block_on(plugin.info()).unwrap();
        info.push(t.elapsed());
    }
    info.sort();
    println!("  one bare call (fresh instance + info): median {:.1} µs", percentile(&info, 0.5).as_secs_f64() * 1e6);
    // A new runtime, as in a new process: the compiled plugin comes from the disk cache.
    let fresh = Runtime::new(64 << 20, Some(cache.clone())).expect("runtime");
    let t = Instant::now();
    let _ = fresh.load(&PluginSource::Builtin("template".into()), limits).expect("load");
    println!("  first load (compile + cache write) {:.1} ms, cached load {:.2} ms", first_load.as_secs_f64() * 1e3, t.elapsed().as_secs_f64() * 1e3);
    let _ = std::fs::remove_dir_all(cache);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("exechost-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
