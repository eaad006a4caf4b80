//! Parses and checks the template plugin's `[services.NAME.settings]`.

use serde::Deserialize;

use crate::FailureKind;

/// One part of a template token.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Literal(String),
    Prompt,
    Model,
    Files,
}

/// A template token, parsed before any substitution.
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    /// Becomes exactly one argument (or none, when it only holds an absent model).
    Plain(Vec<Piece>),
    /// Holds `{files}`: becomes one argument per file.
    Files(Vec<Piece>),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdinMode {
    Prompt,
}

/// The settings as written by the user.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    template: Option<String>,
    args: Option<Vec<String>>,
    file_prefix: Option<String>,
    model_flag: Option<String>,
    stdin: Option<StdinMode>,
    patterns: Option<RawPatterns>,
    health_args: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatterns {
    rate_limited: Option<Vec<String>>,
    quota_exhausted: Option<Vec<String>>,
    auth: Option<Vec<String>>,
    invalid_request: Option<Vec<String>>,
    transient: Option<Vec<String>>,
}

/// Case-insensitive substrings that classify a failed run, checked in this order.
#[derive(Debug, Clone)]
pub struct Patterns {
    rules: Vec<(FailureKind, Vec<String>)>,
}

impl Patterns {
    pub fn classify(&self, lowercase_output: &str) -> FailureKind {
        self.rules
            .iter()
            .find(|(_, needles)| needles.iter().any(|n| lowercase_output.contains(n.as_str())))
            .map(|(kind, _)| *kind)
            .unwrap_or(FailureKind::Other)
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The checked settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub tokens: Vec<Token>,
    pub file_prefix: String,
    pub model_flag: Option<String>,
    pub stdin: Option<StdinMode>,
    /// As given: only a failed run needs them (see [`Settings::patterns`]).
    patterns: RawPatterns,
    pub health_args: Vec<String>,
}

impl Settings {
    /// Parses the settings JSON; the error names the setting and what to write instead.
    pub fn parse(json: &str) -> Result<Settings, String> {
        let raw: Raw = if json.trim().is_empty() {
            Raw::default()
        } else {
            serde_json::from_str(json).map_err(|e| {
                let text = e.to_string();
                let text = text.split(" at line ").next().unwrap_or(&text).to_string();
                format!("settings: {text}")
            })?
        };
        let words: Vec<String> = match (&raw.template, &raw.args) {
            (Some(_), Some(_)) => {
                return Err("settings: give either `template` or `args`, not both".into());
            }
            (Some(template), None) => template.split_whitespace().map(str::to_string).collect(),
            (None, Some(args)) => args.clone(),
            (None, None) => strings(&["{command}", "{prompt}"]),
        };
        let words = match words.first().map(String::as_str) {
            Some("{command}") => &words[1..],
            _ => &words[..],
        };
        let tokens = words.iter().map(|w| parse_token(w)).collect::<Result<Vec<_>, _>>()?;
        let stdin = raw.stdin;
        let mentions_prompt = tokens.iter().any(|t| match t {
            Token::Plain(p) | Token::Files(p) => p.contains(&Piece::Prompt),
        });
        if stdin == Some(StdinMode::Prompt) && mentions_prompt {
            return Err(
                "settings: with stdin = \"prompt\" the prompt goes on stdin; remove {prompt} from the template"
                    .into(),
            );
        }
        if stdin.is_none() && !mentions_prompt {
            return Err(
                "settings: the template has no {prompt}; add it, or set stdin = \"prompt\"".into(),
            );
        }
        Ok(Settings {
            tokens,
            file_prefix: raw.file_prefix.unwrap_or_default(),
            model_flag: raw.model_flag,
            stdin,
            patterns: raw.patterns.unwrap_or_default(),
            health_args: raw.health_args.unwrap_or_else(|| strings(&["--version"])),
        })
    }

    /// The patterns that classify a failed run: the service's own for each kind it gives,
    /// the defaults for the others; compared in lower case.
    pub fn patterns(&self) -> Patterns {
        let p = self.patterns.clone();
        Patterns {
            rules: vec![
                (
                    FailureKind::RateLimited,
                    p.rate_limited.unwrap_or_else(|| {
                        strings(&["rate limit", "rate-limit", "ratelimit", "too many requests", "429", "quota"])
                    }),
                ),
                (FailureKind::QuotaExhausted, p.quota_exhausted.unwrap_or_default()),
                (
                    FailureKind::Auth,
                    p.auth.unwrap_or_else(|| {
                        strings(&[
                            "unauthorized",
                            "unauthenticated",
                            "401",
                            "invalid api key",
                            "api key not valid",
                            "not logged in",
                            "authentication",
                        ])
                    }),
                ),
                (
                    FailureKind::InvalidRequest,
                    p.invalid_request
                        .unwrap_or_else(|| strings(&["invalid request", "400 bad request", "model not found", "unknown model"])),
                ),
                (
                    FailureKind::Transient,
                    p.transient.unwrap_or_else(|| {
                        strings(&[
                            "500",
                            "502",
                            "503",
                            "504",
                            "internal server error",
                            "service unavailable",
                            "temporarily unavailable",
                            "overloaded",
                            "connection refused",
                            "connection reset",
                            "timed out",
                        ])
                    }),
                ),
            ]
            .into_iter()
            .map(|(kind, needles)| (kind, needles.into_iter().map(|n| n.to_lowercase()).collect()))
            .collect(),
        }
    }
}

/// Splits one template word into literal text and placeholders. `{{` and `}}` are literal braces.
fn parse_token(word: &str) -> Result<Token, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let piece = match name.as_str() {
                    "prompt" => Piece::Prompt,
                    "model" => Piece::Model,
                    "files" => Piece::Files,
                    "command" => {
                        return Err("settings: {command} may only be the first word of the template".into());
                    }
                    other => {
                        return Err(format!(
                            "settings: unknown placeholder {{{other}}} in `{word}`; use {{prompt}}, {{files}} or {{model}} (write {{{{ for a literal brace)"
                        ));
                    }
                };
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(piece);
            }
            _ => literal.push(c),
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    let has = |p: &Piece| pieces.contains(p);
    if has(&Piece::Files) {
        if has(&Piece::Prompt) {
            return Err(format!("settings: `{word}` mixes {{files}} and {{prompt}}; put them in separate words"));
        }
        return Ok(Token::Files(pieces));
    }
    Ok(Token::Plain(pieces))
}
