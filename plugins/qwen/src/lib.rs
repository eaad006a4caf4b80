//! The built-in `qwen` plugin: Qwen Code (`@qwen-code/qwen-code`, a Gemini CLI fork) in JSON
//! mode. API errors come back with exit code 0 and `[API Error: ...]` as the answer, so the
//! answer text and the error counters are checked, not only the exit code.

use exechost_plugin_sdk::*;
use serde_json::Value;

struct Qwen;

const SETTINGS: &[&str] = &["extra_args", "auth_type", "base_url"];

impl Guest for Qwen {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "qwen".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Qwen Code CLI (qwen --prompt=... -o json)".into(),
            supports_files: true,
            supports_stdin: false,
            needs_file_contents: false,
            models: vec!["qwen3.5-plus".into()],
        }
    }

    fn validate(service: Service) -> Result<(), String> {
        check_settings(&service, SETTINGS)
    }

    fn build_command(service: Service, request: Request) -> Result<Command, Failure> {
        let prompt = prompt_with_at_files(&request);
        let auth = setting_str(&service, "auth_type").unwrap_or_else(|| "openai".into());
        // `--prompt=` keeps a prompt that starts with a dash from being read as an option.
        let mut args = vec![format!("--prompt={prompt}"), "--output-format".into(), "json".into(), "--auth-type".into(), auth];
        if let Some(url) = setting_str(&service, "base_url") {
            args.extend(["--openai-base-url".into(), url]);
        }
        if let Some(model) = model(&service, &request) {
            args.extend(["--model".into(), model]);
        }
        args.extend(setting_list(&service, "extra_args"));
        Ok(Command { args, env: Vec::new(), stdin: None })
    }

    fn parse_output(service: Service, request: Request, output: Output) -> Result<Response, Failure> {
        let stdout = text(&output.stdout);
        let events: Vec<Value> = match embedded_array(&stdout) {
            Some(events) => events,
            None => return Err(unparsed(&service, &output)),
        };
        let result = events.iter().rev().find(|e| e.get("type").and_then(Value::as_str) == Some("result"));
        let Some(result) = result else { return Err(unparsed(&service, &output)) };
        let answer = result.get("result").and_then(Value::as_str).unwrap_or_default();
        let hint = |kind: FailureKind| match kind {
            FailureKind::Auth => Some("not authenticated: set OPENAI_API_KEY (with --auth-type openai) or configure auth in ~/.qwen/settings.json".to_string()),
            _ => None,
        };
        if result.get("is_error").and_then(Value::as_bool) == Some(true) {
            let message = result.pointer("/error/message").and_then(Value::as_str).unwrap_or(answer);
            return Err(classified(&service, message, None, hint));
        }
        // API errors are reported as a successful answer "[API Error: 429 ...]".
        let errors: u64 = result
            .pointer("/stats/models")
            .and_then(Value::as_object)
            .map(|m| m.values().filter_map(|v| u64_at(v, &["api", "totalErrors"])).sum())
            .unwrap_or(0);
        let usage = result.get("usage");
        let produced = usage.and_then(|u| u64_at(u, &["output_tokens"])).unwrap_or(0);
        if let Some(error) = answer.trim_start().strip_prefix("[API Error:")
            && (produced == 0 || errors > 0)
        {
            let status = error.trim_start().split(|c: char| !c.is_ascii_digit()).next().and_then(|d| d.parse().ok());
            return Err(classified(&service, answer, status, hint));
        }
        let model_name = events
            .iter()
            .find(|e| e.get("subtype").and_then(Value::as_str) == Some("init"))
            .and_then(|e| e.get("model").and_then(Value::as_str).map(str::to_string))
            .or_else(|| model(&service, &request));
        Ok(Response {
            text: answer.to_string(),
            model: model_name,
            usage: usage.map(|u| Usage {
                input: u64_at(u, &["input_tokens"]),
                output: u64_at(u, &["output_tokens"]),
                total: u64_at(u, &["total_tokens"]),
                cached: u64_at(u, &["cache_read_input_tokens"]),
                reasoning: None,
            }),
            cost_usd: None,
        })
    }

    fn health_command(_service: Service) -> Option<Command> {
        version_check()
    }
}

/// The JSON array the CLI prints, after any noise.
fn embedded_array(text: &str) -> Option<Vec<Value>> {
    let start = text.find('[')?;
    let mut values = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
    match values.next()?.ok()? {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

fn unparsed(service: &Service, output: &Output) -> Failure {
    let stderr = text(&output.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
    let message = format!("`{}` {}: {}", service.command, how_it_ended(output), last);
    classified(service, &message, None, |kind| match kind {
        FailureKind::Auth => Some("set OPENAI_API_KEY or configure auth in ~/.qwen/settings.json".to_string()),
        _ => None,
    })
}

export!(Qwen with_types_in exechost_plugin_sdk);

#[cfg(test)]
mod tests;
