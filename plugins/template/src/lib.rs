//! The built-in `template` plugin: runs any program from an argument template, safely.
//!
//! The template is split into tokens on whitespace *before* anything is substituted, so a
//! prompt is always exactly one argument whatever it contains, and substitution is a single
//! pass: placeholders inside the prompt stay literal. See the README's "template plugin"
//! section for the settings.

mod settings;

use exechost_plugin_sdk::{
    Command, ExitStatus, Failure, FailureKind, Guest, Output, PluginInfo, Request, Response, Service, export, one_line,
    retry_after_ms,
};
use settings::{Piece, Settings, StdinMode, Token};

/// Linux refuses a single argument longer than this (MAX_ARG_STRLEN minus the NUL).
const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

struct Template;

impl Guest for Template {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "template".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Runs any program from an argument template ({prompt}, {files}, {model})"
                .into(),
            supports_files: true,
            supports_stdin: true,
            needs_file_contents: false,
            models: Vec::new(),
        }
    }

    fn validate(service: Service) -> Result<(), String> {
        Settings::parse(&service.settings).map(|_| ())
    }

    fn build_command(service: Service, request: Request) -> Result<Command, Failure> {
        build(&service, &settings_of(&service)?, &request)
    }

    fn parse_output(service: Service, request: Request, output: Output) -> Result<Response, Failure> {
        parse(&service, &request, &output)
    }

    fn health_command(service: Service) -> Option<Command> {
        let settings = Settings::parse(&service.settings).ok()?;
        if settings.health_args.is_empty() {
            return None;
        }
        Some(Command { args: settings.health_args, env: Vec::new(), stdin: None })
    }
}

export!(Template with_types_in exechost_plugin_sdk);

/// The service's settings; a mistake in them is the plugin's failure to run the service.
fn settings_of(service: &Service) -> Result<Settings, Failure> {
    Settings::parse(&service.settings).map_err(|message| Failure {
        kind: FailureKind::PluginError,
        message: format!("service {}: {message}", service.name),
        retry_after_ms: None,
    })
}

fn invalid(service: &Service, message: String) -> Failure {
    Failure {
        kind: FailureKind::InvalidRequest,
        message: format!("service {}: {message}", service.name),
        retry_after_ms: None,
    }
}

fn build(service: &Service, settings: &Settings, request: &Request) -> Result<Command, Failure> {
    let model = request.model.clone().or_else(|| service.default_model.clone());
    let mut args: Vec<String> = Vec::new();
    let mut takes_files = false;
    for token in &settings.tokens {
        match token {
            Token::Files(pieces) => {
                takes_files = true;
                for file in &request.files {
                    let path = format!("{}{}", settings.file_prefix, file.path);
                    args.push(render(pieces, &request.prompt, model.as_deref(), Some(&path)));
                }
            }
            Token::Plain(pieces) => {
                let uses_model = pieces.iter().any(|p| matches!(p, Piece::Model));
                let only_model = uses_model && !pieces.iter().any(|p| matches!(p, Piece::Prompt));
                if uses_model && model.is_none() {
                    if !only_model {
                        return Err(invalid(
                            service,
                            "the template needs a model: pass -m MODEL or set default_model"
                                .into(),
                        ));
                    }
                    // Drop the model token, and the flag before it when it is the model flag.
                    if let (Some(flag), Some(last)) = (&settings.model_flag, args.last())
                        && last == flag
                    {
                        args.pop();
                    }
                    continue;
                }
                args.push(render(pieces, &request.prompt, model.as_deref(), None));
            }
        }
    }
    if !request.files.is_empty() && !takes_files {
        return Err(invalid(
            service,
            "this service takes no files: add {files} to settings.template (or settings.args)"
                .into(),
        ));
    }
    if let Some(long) = args.iter().find(|a| a.len() > MAX_ARG_BYTES) {
        return Err(invalid(
            service,
            format!(
                "an argument is {} bytes, but Linux limits a single argument to 128 KiB; \
                 set settings.stdin = \"prompt\" to send the prompt on stdin instead",
                long.len()
            ),
        ));
    }
    let stdin = settings.stdin.map(|StdinMode::Prompt| request.prompt.as_bytes().to_vec());
    Ok(Command { args, env: Vec::new(), stdin })
}

/// Substitutes one token's pieces: a single pass, so the prompt's own text is never scanned.
fn render(pieces: &[Piece], prompt: &str, model: Option<&str>, file: Option<&str>) -> String {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Literal(text) => out.push_str(text),
            Piece::Prompt => out.push_str(prompt),
            Piece::Model => out.push_str(model.unwrap_or_default()),
            Piece::Files => out.push_str(file.unwrap_or_default()),
        }
    }
    out
}

fn parse(service: &Service, request: &Request, output: &Output) -> Result<Response, Failure> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    if let ExitStatus::Code(0) = output.status {
        let text = stdout.strip_suffix('\n').unwrap_or(&stdout);
        let text = text.strip_suffix('\r').unwrap_or(text);
        return Ok(Response {
            text: text.to_string(),
            model: request.model.clone().or_else(|| service.default_model.clone()),
            usage: None,
            cost_usd: None,
        });
    }
    // Only a failure needs the settings (for the classification patterns).
    let settings = settings_of(service)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let haystack = format!("{stderr}\n{stdout}").to_lowercase();
    let kind = settings.patterns().classify(&haystack);
    let how = match output.status {
        ExitStatus::Code(code) => format!("exited with code {code}"),
        ExitStatus::Signal(signal) => format!("was killed by signal {signal}"),
    };
    let detail = one_line(if stderr.trim().is_empty() { &stdout } else { &stderr });
    let mut message = format!("service {}: `{}` {how}", service.name, service.command);
    if !detail.is_empty() {
        message.push_str(": ");
        message.push_str(&detail);
    }
    Err(Failure { kind, message, retry_after_ms: retry_after_ms(&haystack) })
}

#[cfg(test)]
mod tests;
