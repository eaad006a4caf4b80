//! The built-in `llm` plugin: Simon Willison's `llm` (PyPI) as `llm prompt --json`. Files go
//! in as fragments (`-f path`); errors are one `Error: ...` line on stderr.

use exechost_plugin_sdk::*;
use serde_json::Value;

struct Llm;

const SETTINGS: &[&str] = &["extra_args", "log"];

impl Guest for Llm {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "llm".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "llm CLI (llm prompt --json)".into(),
            supports_files: true,
            supports_stdin: false,
            needs_file_contents: false,
            models: Vec::new(),
        }
    }

    fn validate(service: Service) -> Result<(), String> {
        check_settings(&service, SETTINGS)
    }

    fn build_command(service: Service, request: Request) -> Result<Command, Failure> {
        let mut args: Vec<String> = vec!["prompt".into(), "--json".into()];
        if !setting_bool(&service, "log").unwrap_or(false) {
            args.push("--no-log".into());
        }
        if let Some(model) = model(&service, &request) {
            args.extend(["--model".into(), model]);
        }
        for file in &request.files {
            args.extend(["--fragment".into(), file.path.clone()]);
        }
        args.extend(setting_list(&service, "extra_args"));
        args.extend(["--".into(), request.prompt.clone()]);
        Ok(Command { args, env: Vec::new(), stdin: None })
    }

    fn parse_output(service: Service, request: Request, output: Output) -> Result<Response, Failure> {
        let stdout = text(&output.stdout);
        let row = json_values(&stdout).into_iter().find_map(|v| match v {
            Value::Array(rows) => rows.into_iter().next(),
            _ => None,
        });
        if let (Some(row), Some(0)) = (row, exit_code(&output))
            && let Some(answer) = row.get("response").and_then(Value::as_str)
        {
            let (input, output) = (u64_at(&row, &["input_tokens"]), u64_at(&row, &["output_tokens"]));
            let model_name = row
                .get("resolved_model")
                .and_then(Value::as_str)
                .or_else(|| row.get("model").and_then(Value::as_str))
                .map(str::to_string)
                .or_else(|| model(&service, &request));
            return Ok(Response {
                text: answer.to_string(),
                model: model_name,
                usage: Some(Usage { input, output, total: input.zip(output).map(|(i, o)| i + o), cached: None, reasoning: None }),
                cost_usd: None,
            });
        }
        let stderr = text(&output.stderr);
        let line = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        // "Error: Error code: 429 - Rate limit reached ..."
        let status = line.find("Error code:").and_then(|at| {
            let digits: String = line[at + "Error code:".len()..].trim_start().chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        });
        let message = format!("`{}` {}: {line}", service.command, how_it_ended(&output));
        Err(classified(&service, &message, status, |kind| match kind {
            FailureKind::Auth => Some("not authenticated: set the model's key with `llm keys set` or OPENAI_API_KEY".to_string()),
            _ => None,
        }))
    }

    fn health_command(_service: Service) -> Option<Command> {
        version_check()
    }
}

export!(Llm with_types_in exechost_plugin_sdk);

#[cfg(test)]
mod tests;
