//! The `host` command line: parses arguments, runs the subcommand, prints, picks the exit code.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, DAY_MS, SystemClock};
use crate::config::{Config, ConfigError, ServiceConfig, parse_duration, parse_timeout};
use crate::batch;
use crate::dispatch;
use crate::ui::{BatchBar, StatusLines};
use crate::health::check_all;
use crate::report;
use crate::state::State;
use crate::plugin::Runtime;
use crate::process::{self, find_program};
use crate::service::{self, Outcome, Request, Service};

/// Exit codes: 0 success, 1 a service failed, 2 usage or configuration error;
/// 130/143/129 when interrupted by SIGINT/SIGTERM/SIGHUP.
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// One uniform, reliable front end for AI command-line clients, with sandboxed WebAssembly
/// plugins that adapt each service.
#[derive(Debug, Parser)]
#[command(name = "host", version, about, max_term_width = 100)]
pub struct Cli {
    /// The services.toml to use (default: $EXECHOST_CONFIG, ./services.toml,
    /// $XDG_CONFIG_HOME/exechost/services.toml, then the built-in one).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The state file (breakers, quotas, usage ledger); default: $EXECHOST_STATE, else
    /// $XDG_STATE_HOME/exechost/state.db.
    #[arg(long, global = true, value_name = "PATH")]
    state: Option<PathBuf>,
    /// Keep breaker and quota state in memory for this process only, and record no usage.
    #[arg(long, global = true, conflicts_with = "state")]
    no_state: bool,
    /// More diagnostics on stderr (-v: info, -vv: debug, including plugin stderr).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a prompt (and files) to a service and print its answer.
    Run(RunArgs),
    /// List the configured services.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration and load every plugin.
    Check {
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Run many requests from a JSON Lines file, resumably.
    Batch(BatchArgs),
    /// Usage per service and day from the ledger: requests, outcomes, tokens, durations.
    Usage {
        /// How far back, e.g. 1d, 12h, 30m (default: 7d).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "7d")]
        since: Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove ledger rows older than --keep (the state file then stops growing).
    Prune {
        /// How much of the ledger to keep, e.g. 90d; at least a day (quotas count it).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        keep: Duration,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Each service's circuit breaker and quota use.
    Status {
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Run each service's health check (e.g. `--version`) in parallel.
    Health {
        /// Services to check (default: all).
        services: Vec<String>,
        /// Time each check may take.
        #[arg(long, value_parser = parse_timeout, value_name = "DURATION", default_value = "10s")]
        timeout: Duration,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The service's name in services.toml; several separated by commas, or `all`, send the
    /// same request to each at once.
    service: String,
    /// The prompt; `-` reads it from stdin.
    #[arg(allow_hyphen_values = true)]
    prompt: String,
    /// Attach a file (repeatable). It must exist and be readable.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// The model to use (default: the service's default_model, else the CLI's own default).
    #[arg(short, long, value_parser = parse_model)]
    model: Option<String>,
    /// Override the service's timeout, e.g. 90s, 1500ms, 2m.
    #[arg(long, value_parser = parse_timeout, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// A plugin-specific option KEY=VALUE (repeatable).
    #[arg(short = 'o', long = "option", value_parser = parse_option, value_name = "KEY=VALUE")]
    options: Vec<(String, String)>,
    /// Print one JSON object with the full result instead of the answer text (with several
    /// services: one per line as each finishes).
    #[arg(long)]
    json: bool,
    /// Services to try in order, comma-separated, when SERVICE fails.
    #[arg(long, value_name = "SERVICES")]
    fallback: Option<String>,
    /// With several services: how many run at once (default: all of them).
    #[arg(long, value_name = "N", value_parser = parse_jobs)]
    jobs: Option<usize>,
}

#[derive(Debug, Args)]
struct BatchArgs {
    /// A JSON Lines file of jobs, or `-` for stdin. Each line: {"id", "service" or
    /// "services", "prompt", "files", "model", "fallback", "timeout", "options"}.
    jobs_file: PathBuf,
    /// Append results here (one JSON line per job); ids already in it are skipped, so the same
    /// command resumes an interrupted batch. Default (or `-`): stdout.
    #[arg(short, long, value_name = "RESULTS")]
    output: Option<PathBuf>,
    /// How many jobs run at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_jobs)]
    jobs: usize,
    /// Stop at the first invalid line (exit 2) instead of reporting and skipping it.
    #[arg(long)]
    strict: bool,
}

fn parse_model(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("the model name is empty; leave -m out for the service's default".into());
    }
    Ok(text.to_string())
}

fn parse_jobs(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("at least 1 job must run at a time".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{text}` is not a whole number: {e}")),
    }
}

fn parse_option(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some(("", _)) => Err(format!("`{text}` has an empty option name; write KEY=VALUE")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

/// A usage or configuration problem: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

impl From<ConfigError> for Usage {
    fn from(e: ConfigError) -> Self {
        Usage(e.0)
    }
}

/// Entry point: parses arguments, runs, prints errors, returns the exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    init_logging(cli.verbose);
    process::keep_commands_off_the_terminal();
    process::schedule_as_batch();
    // One async thread: it starts fastest, and measured faster for batches too than a
    // multi-threaded runtime. Plugin calls run on it (yielding while they compute); spawns,
    // and state transactions that must wait for a lock, run on the blocking pool's threads.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let result = match runtime {
        Ok(rt) => rt.block_on(dispatch(cli)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the async runtime")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("host: error: {e:#}");
            ExitCode::from(if e.downcast_ref::<Usage>().is_some() { EXIT_USAGE } else { EXIT_FAILED })
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = std::env::var("EXECHOST_LOG").unwrap_or_else(|_| format!("{default},cranelift=warn,wasmtime=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let config = Config::locate(cli.config.as_deref()).map_err(Usage::from)?;
    let state = || open_state(cli.state.as_deref(), cli.no_state);
    match cli.command {
        Command::Run(args) => run(&config, state()?, args).await,
        Command::Batch(args) => batch(&config, state()?, args).await,
        Command::List { json } => list(&config, json),
        Command::Check { json } => check(&config, json).await,
        Command::Usage { since, json } => usage(&*state()?, since, json),
        Command::Status { json } => status(&*state()?, &config, json),
        Command::Prune { keep, json } => prune(&*state()?, &config, keep, json),
        Command::Health { services, timeout, json } => health(&config, &services, timeout, json).await,
    }
}

/// The state store: `--state`, `$EXECHOST_STATE`, the XDG default, or memory with `--no-state`.
fn open_state(explicit: Option<&Path>, none: bool) -> Result<Arc<State>> {
    if none {
        return State::in_memory();
    }
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("EXECHOST_STATE").filter(|p| !p.is_empty()).map(PathBuf::from))
        .or_else(State::default_path)
        .ok_or_else(|| Usage("no place for the state file: set HOME, XDG_STATE_HOME or --state PATH".into()))?;
    State::open(&path).map_err(|e| Usage(format!("{e:#}")).into())
}

fn runtime_for<'a>(services: impl IntoIterator<Item = &'a ServiceConfig>) -> Result<Runtime> {
    let max_memory = services.into_iter().map(|s| s.limits.plugin_memory).max().unwrap_or(64 << 20);
    Runtime::new(max_memory, Runtime::default_cache_dir())
}

/// Service names from a comma-separated list, or every service for `all`; each must exist.
fn service_names(config: &Config, list: &str) -> Result<Vec<String>, Usage> {
    Ok(config.service_list(split_names(list)?)?)
}

/// The names of a comma-separated list, none empty.
fn split_names(list: &str) -> Result<Vec<String>, Usage> {
    let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
    if names.iter().any(String::is_empty) {
        return Err(Usage(format!("`{list}` has an empty service name; separate service names with single commas")));
    }
    Ok(names)
}

async fn run(config: &Config, state: Arc<State>, args: RunArgs) -> Result<ExitCode> {
    let names = service_names(config, &args.service)?;
    let fallback = match &args.fallback {
        Some(list) => split_names(list)?,
        None => Vec::new(),
    };
    if names.len() > 1 && !fallback.is_empty() {
        return Err(Usage("--fallback goes with a single service, not a list".into()).into());
    }
    if !fallback.is_empty() {
        config.check_services(&[names.clone(), fallback.clone()].concat()).map_err(Usage::from)?;
    }
    let files = service::check_files(&args.files).map_err(Usage)?;
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Usage("the prompt on stdin is not UTF-8 text".into()).into(),
            _ => anyhow::Error::new(e).context("reading the prompt from stdin"),
        })?;
        text
    } else {
        args.prompt
    };
    let request = Request { prompt, files, model: args.model, options: args.options, timeout: args.timeout };
    let chain: Vec<&ServiceConfig> = names.iter().chain(&fallback).map(|n| config.service(n)).collect::<Result<_, _>>().map_err(Usage::from)?;
    let runtime = runtime_for(chain.iter().copied())?;
    let cancel = CancellationToken::new();
    let interrupted = watch_signals(cancel.clone());
    let mut ctx = dispatch::Context { state, clock: Arc::new(SystemClock), cancel: cancel.clone(), observer: None };
    let targets: Vec<dispatch::Target> = futures::future::join_all(chain.iter().map(|c| Service::load_or_fail(&runtime, c))).await;
    let all_ok = if names.len() > 1 {
        let lines = StatusLines::new(&names);
        ctx.observer = lines.as_ref().map(|l| l.observer());
        let jobs = within_open_files_limit(args.jobs.unwrap_or(names.len()));
        let mut outcomes = dispatch::fan_out(targets, Arc::new(request), ctx, jobs);
        let mut finished = Vec::new();
        let mut unread = false;
        while let Some(outcome) = outcomes.recv().await {
            if !unread {
                let printed = match &lines {
                    Some(lines) => lines.suspend(|| print_fan_out_result(&outcome, args.json)),
                    None => print_fan_out_result(&outcome, args.json),
                };
                match printed {
                    // No one reads on: the services still running are stopped.
                    Err(e) if reader_gone(&e) => {
                        unread = true;
                        cancel.cancel();
                    }
                    printed => printed.context("writing the results to stdout")?,
                }
            }
            finished.push(outcome);
        }
        if let Some(lines) = &lines {
            lines.clear();
        }
        eprintln!("{}", summary(&finished));
        finished.iter().all(|o| o.success)
    } else {
        let outcome = dispatch::failover(targets, &request, &ctx).await;
        match print_outcome(&outcome, args.json) {
            Err(e) if reader_gone(&e) => {}
            printed => printed.context("writing the result to stdout")?,
        }
        outcome.success
    };
    if let Some(signal) = *interrupted.borrow() {
        return Ok(ExitCode::from(128 + signal as u8));
    }
    Ok(ExitCode::from(if all_ok { 0 } else { EXIT_FAILED }))
}

/// True when `e` comes from writing to a reader that went away (`host run ... | head -1`):
/// like a program ended by SIGPIPE, the host then stops quietly.
fn reader_gone(e: &anyhow::Error) -> bool {
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().map(std::io::Error::kind) == broken
            || cause.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind) == broken
    })
}

/// User and system CPU time of this process (all its threads, not its children).
fn own_cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// "3 ok, 1 failed: qwen rate-limited"
fn summary(outcomes: &[Outcome]) -> String {
    let ok = outcomes.iter().filter(|o| o.success).count();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("{} {}", o.service, e.kind.as_str())))
        .collect();
    if failed.is_empty() {
        format!("{ok} ok")
    } else {
        format!("{ok} ok, {} failed: {}", failed.len(), failed.join(", "))
    }
}

/// One service's result in a fan-out: a JSON line, or a header and the answer (or error).
fn print_fan_out_result(outcome: &Outcome, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, outcome)?;
        writeln!(out)?;
    } else {
        let seconds = outcome.duration_ms as f64 / 1000.0;
        match (&outcome.text, &outcome.error) {
            (Some(text), _) => {
                writeln!(out, "=== {} ({seconds:.1} s) ===", outcome.service)?;
                writeln!(out, "{}", text.strip_suffix('\n').unwrap_or(text))?;
            }
            (None, Some(error)) => {
                writeln!(out, "=== {} FAILED ({}) ===", outcome.service, error.kind.as_str())?;
                writeln!(out, "{}", error.message)?;
            }
            (None, None) => writeln!(out, "=== {} ===", outcome.service)?,
        }
    }
    out.flush()?;
    Ok(())
}

async fn batch(config: &Config, state: Arc<State>, args: BatchArgs) -> Result<ExitCode> {
    let from_stdin = args.jobs_file.as_os_str() == "-";
    // The jobs' file (stdin's, when it is one), so that results are never written into it.
    let (input, input_file): (Box<dyn std::io::Read + Send>, Option<std::fs::Metadata>) = if from_stdin {
        use std::os::fd::AsFd;
        let stdin_file = std::io::stdin().as_fd().try_clone_to_owned().ok().and_then(|fd| std::fs::File::from(fd).metadata().ok());
        (Box::new(std::io::stdin()), stdin_file.filter(|m| m.is_file()))
    } else {
        let file = std::fs::File::open(&args.jobs_file)
            .map_err(|e| Usage(format!("cannot read the jobs file {}: {e}", args.jobs_file.display())))?;
        let meta = file.metadata().ok();
        if meta.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(Usage(format!("the jobs file {} is a directory", args.jobs_file.display())).into());
        }
        (Box::new(file), meta)
    };
    let input = std::io::BufReader::with_capacity(1 << 16, input);
    let results = match &args.output {
        Some(path) if path.as_os_str() != "-" => batch::open_results(path, input_file.as_ref()).map_err(|e| Usage(format!("{e:#}")))?,
        _ => batch::Results { writer: Box::new(std::io::stdout()), done: Vec::new() },
    };
    let runtime = runtime_for(config.services.values())?;
    let cancel = CancellationToken::new();
    let interrupted = watch_signals(cancel.clone());
    let ctx = dispatch::Context { state, clock: Arc::new(SystemClock), cancel, observer: None };
    let total = if from_stdin || !std::io::stderr().is_terminal() { None } else { batch::count_lines(&args.jobs_file) };
    let bar = Arc::new(BatchBar::new(total));
    let bar_for_progress = bar.clone();
    let jobs_file = args.jobs_file.display().to_string();
    let listener = batch::Listener {
        progress: Box::new(move |c| {
            if let Some(bar) = bar_for_progress.as_ref() {
                bar.update(c.ok + c.failed + c.skipped, c.failed, c.running);
            }
        }),
        invalid: Box::new(move |line, message| eprintln!("host: {jobs_file}:{line}: invalid job, skipped: {message}")),
    };
    let options = batch::Options { jobs: within_open_files_limit(args.jobs), strict: args.strict };
    let (counts, end) = batch::run(config, &runtime, ctx, input, results, options, listener).await?;
    if let Some(bar) = bar.as_ref() {
        bar.clear();
    }
    let jobs_run = (counts.ok + counts.failed).max(1);
    let cpu = own_cpu_time();
    tracing::info!("batch: host process CPU {:.0} ms in all, {:.1} us per job", cpu.as_secs_f64() * 1e3, cpu.as_secs_f64() * 1e6 / jobs_run as f64);
    eprintln!(
        "host: batch: {} ok, {} failed, {} invalid lines, {} already done{}",
        counts.ok,
        counts.failed,
        counts.invalid,
        counts.skipped,
        if counts.cancelled > 0 { format!(", {} interrupted (a rerun does them)", counts.cancelled) } else { String::new() }
    );
    if let Some(signal) = *interrupted.borrow() {
        return Ok(ExitCode::from(128 + signal as u8));
    }
    if let batch::End::Unwritable(why) = end {
        let to = args.output.as_ref().map_or_else(|| "stdout".to_string(), |p| p.display().to_string());
        anyhow::bail!("{why} (results: {to}); the batch stopped, and a rerun does the jobs without a result line");
    }
    Ok(ExitCode::from(match end {
        batch::End::Invalid => EXIT_USAGE,
        _ if counts.failed > 0 => EXIT_FAILED,
        _ => 0,
    }))
}

/// `jobs`, or fewer if this process may not open enough files to run that many commands at
/// once (each would fail to start, and count against its service's circuit); says so.
fn within_open_files_limit(jobs: usize) -> usize {
    match process::command_limit() {
        Some((most, files)) if jobs > most => {
            eprintln!(
                "host: warning: running {most} at a time, not {jobs}: each running command needs about {} open files, and this process may open {files} (raise it with `ulimit -n`)",
                process::FILES_PER_COMMAND
            );
            most
        }
        _ => jobs,
    }
}

/// Cancels `cancel` on SIGINT or SIGTERM; the receiver says which arrived.
fn watch_signals(cancel: CancellationToken) -> tokio::sync::watch::Receiver<Option<i32>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return rx;
    };
    // SIGHUP too: a closed terminal or session must not leave the commands running on;
    // unless it is ignored (`nohup host batch ...`), which is a wish to outlive the session.
    let mut hup = if hangup_ignored() { None } else { signal(SignalKind::hangup()).ok() };
    async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
        match hup {
            Some(hup) => drop(hup.recv().await),
            None => std::future::pending().await,
        }
    }
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            () = hangup(&mut hup) => libc::SIGHUP,
        };
        let _ = tx.send(Some(which));
        cancel.cancel();
        // A second signal: no more grace for the commands being stopped.
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            () = hangup(&mut hup) => {}
        }
        eprintln!("host: stopping every command now");
        process::hurry();
    });
    rx
}

/// Whether SIGHUP was set to be ignored when the host started (as `nohup` does).
fn hangup_ignored() -> bool {
    // SAFETY: sigaction with no new action only reads the current one into `current`.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut current) == 0 && current.sa_sigaction == libc::SIG_IGN }
}

fn print_outcome(outcome: &Outcome, json: bool) -> Result<()> {
    if !json {
        for tried in &outcome.tried {
            eprintln!("host: {} failed ({}): {}", tried.service, tried.kind.as_str(), tried.message);
        }
        if outcome.success && !outcome.tried.is_empty() {
            eprintln!("host: answered by {}", outcome.service);
        }
        if !outcome.success && !outcome.tried.is_empty() {
            eprintln!("host: all {} services failed:", outcome.tried.len() + 1);
        }
    }
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut stdout, outcome)?;
        writeln!(stdout)?;
    } else if let Some(text) = &outcome.text {
        stdout.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            writeln!(stdout)?;
        }
    }
    stdout.flush()?;
    if outcome.truncated {
        eprintln!("host: warning: service {}: output was longer than max_output and was truncated", outcome.service);
    }
    if !json && let Some(error) = &outcome.error {
        eprintln!("host: {} failed ({}): {}", outcome.service, error.kind.as_str(), error.message);
    }
    Ok(())
}

#[derive(Serialize)]
struct ListRow<'a> {
    name: &'a str,
    plugin: String,
    command: &'a str,
    command_path: Option<String>,
    models: &'a [String],
    default_model: Option<&'a str>,
    auth_env: Option<&'a str>,
    auth_env_set: Option<bool>,
}

fn list(config: &Config, json: bool) -> Result<ExitCode> {
    let rows: Vec<ListRow> = config
        .services
        .values()
        .map(|s| ListRow {
            name: &s.name,
            plugin: s.plugin.to_string(),
            command: &s.command,
            command_path: find_program(&s.command, s.env.get("PATH").map(String::as_str)).map(|p| p.display().to_string()),
            models: &s.models,
            default_model: s.default_model.as_deref(),
            auth_env: s.auth_env.as_deref(),
            auth_env_set: s.auth_env.as_ref().map(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty())),
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "configuration: {}", config.describe())?;
    for r in &rows {
        let found = r.command_path.as_deref().map_or_else(|| "NOT FOUND".to_string(), |p| format!("-> {p}"));
        let models = if r.models.is_empty() { "any".to_string() } else { r.models.join(", ") };
        let default = r.default_model.map(|m| format!(" (default {m})")).unwrap_or_default();
        let auth = match (r.auth_env, r.auth_env_set) {
            (Some(var), Some(true)) => format!("  auth: {var} set"),
            (Some(var), _) => format!("  auth: {var} NOT SET"),
            _ => String::new(),
        };
        writeln!(out, "{:<12} plugin {:<14} command {} {found}  models: {models}{default}{auth}", r.name, r.plugin, r.command)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct CheckRow {
    name: String,
    ok: bool,
    plugin: String,
    plugin_name: Option<String>,
    plugin_version: Option<String>,
    description: Option<String>,
    command_found: bool,
    error: Option<String>,
}

async fn check(config: &Config, json: bool) -> Result<ExitCode> {
    let runtime = runtime_for(config.services.values())?;
    let rows: Vec<CheckRow> = futures::future::join_all(config.services.values().map(|s| {
        let runtime = &runtime;
        async move {
            let mut row = CheckRow {
                name: s.name.clone(),
                ok: false,
                plugin: s.plugin.to_string(),
                plugin_name: None,
                plugin_version: None,
                description: None,
                command_found: find_program(&s.command, s.env.get("PATH").map(String::as_str)).is_some(),
                error: None,
            };
            let checked = match Service::load(runtime, s).await {
                Ok(svc) => svc.validate().await.map(|verdict| (verdict, svc)),
                Err(e) => Err(e),
            };
            match checked {
                Ok((Ok(()), svc)) => {
                    row.ok = true;
                    row.plugin_name = Some(svc.info.name.clone());
                    row.plugin_version = Some(svc.info.version.clone());
                    row.description = Some(svc.info.description.clone());
                }
                Ok((Err(why), _)) => row.error = Some(format!("service {}: {why}", s.name)),
                Err(e) => row.error = Some(format!("{e:#}")),
            }
            row
        }
    }))
    .await;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
    } else {
        writeln!(out, "configuration: {}", config.describe())?;
        for r in &rows {
            if r.ok {
                let note = match config.services.get(&r.name) {
                    Some(service) if !r.command_found => format!("  (command {})", process::where_not_found(&service.command)),
                    _ => String::new(),
                };
                writeln!(
                    out,
                    "ok    {:<12} {} {}: {}{note}",
                    r.name,
                    r.plugin_name.as_deref().unwrap_or_default(),
                    r.plugin_version.as_deref().unwrap_or_default(),
                    r.description.as_deref().unwrap_or_default()
                )?;
            } else {
                writeln!(out, "FAIL  {:<12} {}", r.name, r.error.as_deref().unwrap_or_default())?;
            }
        }
    }
    Ok(ExitCode::from(if rows.iter().all(|r| r.ok) { 0 } else { EXIT_FAILED }))
}

fn usage(state: &State, since: Duration, json: bool) -> Result<ExitCode> {
    let now = SystemClock.now();
    let rows = report::usage(state, now - since.as_millis() as i64)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        writeln!(out, "no requests recorded in the last {since:?}")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "{:<12} {:<10} {:>8} {:>8} {:>9} {:>12} {:>10} {:>10}  failures", "service", "day", "requests", "ok", "failed", "tokens", "mean ms", "p95 ms")?;
    for r in &rows {
        let failed: u64 = r.failures.values().sum();
        let kinds: Vec<String> = r.failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
        writeln!(
            out,
            "{:<12} {:<10} {:>8} {:>8} {:>9} {:>12} {:>10} {:>10}  {}",
            r.service,
            r.day,
            r.requests,
            r.successes,
            failed,
            r.tokens.total,
            ms(r.mean_duration_ms),
            ms(r.p95_duration_ms.map(|v| v as f64)),
            kinds.join(", ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn prune(state: &State, config: &Config, keep: Duration, json: bool) -> Result<ExitCode> {
    let needed = config.ledger_lookback();
    if keep < needed {
        let days = needed.as_millis() as f64 / DAY_MS as f64;
        return Err(Usage(format!("--keep must be at least {days:.1}d: quotas and circuit breakers read that much of the ledger")).into());
    }
    let before = SystemClock.now().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let removed = crate::state::prune_attempts(state, before)?;
    let when = crate::clock::utc_timestamp(before);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::json!({ "removed": removed, "before": when }))?;
    } else {
        writeln!(out, "removed {removed} ledger rows of requests started before {when}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn status(state: &State, config: &Config, json: bool) -> Result<ExitCode> {
    let rows = report::status(state, config, SystemClock.now())?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    for r in &rows {
        let mut line = format!("{:<12} breaker {}", r.service, r.breaker);
        if let Some(until) = &r.open_until {
            line.push_str(&format!(" until {until}"));
        }
        if let Some(reason) = r.trip_reason.as_ref().filter(|_| r.breaker != "closed") {
            line.push_str(&format!(" ({reason})"));
        }
        for (name, quota) in [("rpm", &r.rpm), ("tpm", &r.tpm), ("daily", &r.daily)] {
            if let Some(q) = quota {
                line.push_str(&format!("  {name} {}/{}", q.used, q.limit));
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn health(config: &Config, names: &[String], timeout: Duration, json: bool) -> Result<ExitCode> {
    let selected: Vec<&ServiceConfig> = if names.is_empty() {
        config.services.values().collect()
    } else {
        let names = config.service_list(names.to_vec()).map_err(Usage::from)?;
        names.iter().map(|n| config.service(n)).collect::<Result<_, _>>().map_err(Usage::from)?
    };
    let runtime = runtime_for(selected.iter().copied())?;
    let cancel = CancellationToken::new();
    let _signals = watch_signals(cancel.clone());
    let results = check_all(&runtime, &selected, timeout, &cancel).await;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &results)?;
        writeln!(out)?;
    } else {
        for h in &results {
            let (word, text) = if h.ok { ("OK    ", h.detail.as_deref()) } else { ("FAILED", h.reason.as_deref()) };
            writeln!(out, "{word} {:<12} {} ({} ms)", h.service, text.unwrap_or_default(), h.duration_ms)?;
        }
    }
    Ok(ExitCode::from(if results.iter().all(|h| h.ok) { 0 } else { EXIT_FAILED }))
}
