//! The built-in `claude` plugin: Claude Code (`@anthropic-ai/claude-code`) in print mode with
//! JSON output. Errors arrive on stdout with `is_error` and `api_error_status`; the plugin turns
//! the CLI's own retries off so the host's policy is the only retry loop.

use exechost_plugin_sdk::*;
use serde_json::Value;

struct Claude;

const SETTINGS: &[&str] = &["extra_args", "base_url", "cli_retries"];

impl Guest for Claude {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "claude".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Claude Code CLI (claude -p ... --output-format json)".into(),
            supports_files: true,
            supports_stdin: false,
            needs_file_contents: false,
            models: vec!["claude-opus-4-8".into()],
        }
    }

    fn validate(service: Service) -> Result<(), String> {
        check_settings(&service, SETTINGS)
    }

    fn build_command(service: Service, request: Request) -> Result<Command, Failure> {
        let prompt = prompt_with_at_files(&request);
        let mut args = vec!["--print".into(), "--output-format".into(), "json".into()];
        if let Some(model) = model(&service, &request) {
            args.extend(["--model".into(), model]);
        }
        args.extend(setting_list(&service, "extra_args"));
        // After `--` the prompt is an argument even when it starts with a dash.
        args.extend(["--".into(), prompt]);
        let retries = settings(&service).get("cli_retries").and_then(Value::as_u64).unwrap_or(0);
        let mut env = vec![
            ("CLAUDE_CODE_MAX_RETRIES".into(), retries.to_string()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(), "1".into()),
        ];
        if let Some(url) = setting_str(&service, "base_url") {
            env.push(("ANTHROPIC_BASE_URL".into(), url));
        }
        Ok(Command { args, env, stdin: None })
    }

    fn parse_output(service: Service, request: Request, output: Output) -> Result<Response, Failure> {
        let stdout = text(&output.stdout);
        let hint = |kind: FailureKind| match kind {
            FailureKind::Auth => Some("not authenticated: set ANTHROPIC_API_KEY or run `claude` once to log in".to_string()),
            _ => None,
        };
        let Some(json) = embedded_json(&stdout).filter(|j| j.get("type").and_then(Value::as_str) == Some("result")) else {
            let said = if stdout.trim().is_empty() { text(&output.stderr) } else { stdout.clone() };
            let message = format!("`{}` {}: {}", service.command, how_it_ended(&output), said.trim());
            return Err(classified(&service, &message, None, hint));
        };
        let answer = json.get("result").and_then(Value::as_str).unwrap_or_default();
        if json.get("is_error").and_then(Value::as_bool) == Some(true) || exit_code(&output) != Some(0) {
            let status = json.get("api_error_status").and_then(Value::as_u64);
            return Err(classified(&service, answer, status, hint));
        }
        let usage = json.get("usage").map(|u| {
            let (input, output) = (u64_at(u, &["input_tokens"]), u64_at(u, &["output_tokens"]));
            Usage {
                input,
                output,
                total: input.zip(output).map(|(i, o)| i + o),
                cached: u64_at(u, &["cache_read_input_tokens"]),
                reasoning: None,
            }
        });
        let model_name = json
            .get("modelUsage")
            .and_then(Value::as_object)
            .and_then(|m| m.keys().next().cloned())
            .or_else(|| model(&service, &request));
        Ok(Response {
            text: answer.to_string(),
            model: model_name,
            usage,
            cost_usd: json.get("total_cost_usd").and_then(Value::as_f64),
        })
    }

    fn health_command(_service: Service) -> Option<Command> {
        version_check()
    }
}

export!(Claude with_types_in exechost_plugin_sdk);

#[cfg(test)]
mod tests;
