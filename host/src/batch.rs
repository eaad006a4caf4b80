//! Batch runs: requests read from JSON Lines, run concurrently through the same policies as
//! `host run`, each result appended as one whole line as soon as it is known. A rerun skips
//! the ids already in the results, so a crash or Ctrl-C loses nothing and repeats nothing.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::config::{self, Config, parse_timeout};
use crate::dispatch::{self, Context, Target};
use crate::outcome::{FailureKind, Outcome};
use crate::plugin::Runtime;
use crate::service::{Request, Service, check_files};

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    /// A string or a number, unique in the batch.
    id: serde_json::Value,
    service: Option<String>,
    services: Option<Vec<String>>,
    prompt: String,
    #[serde(default)]
    files: Vec<PathBuf>,
    model: Option<String>,
    #[serde(default)]
    fallback: Vec<String>,
    timeout: Option<String>,
    #[serde(default)]
    options: BTreeMap<String, String>,
}

/// What a job runs.
enum Plan {
    /// One service (with a failover chain when it has fallbacks).
    Chain(Vec<String>),
    /// The same request to several services at once.
    FanOut(Vec<String>),
}

struct Job {
    id: serde_json::Value,
    /// The input line it came from (1-based).
    line: u64,
    plan: Plan,
    request: Request,
}

/// A result line: the job's id and the outcome (or, for a fan-out job, every outcome).
#[derive(Serialize)]
struct ResultLine<'a> {
    id: &'a serde_json::Value,
    #[serde(flatten)]
    outcome: Option<&'a Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    success: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    results: Option<&'a [Outcome]>,
}

/// Counts as the batch goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
    pub running: u64,
    /// Lines that are not valid jobs (reported, not run).
    pub invalid: u64,
    /// Jobs whose id already has a result.
    pub skipped: u64,
    /// Jobs stopped by Ctrl-C; not written, so a rerun does them.
    pub cancelled: u64,
}

/// How the batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every line was read.
    Complete,
    /// A result could not be written (what went wrong): the batch stopped there, and the
    /// jobs without a result line are done by a rerun.
    Unwritable(String),
    /// `strict` and an invalid line: reading stopped there.
    Invalid,
    /// Cancelled.
    Interrupted,
}

pub struct Options {
    pub jobs: usize,
    pub strict: bool,
}

/// Hears of an invalid line: its 1-based number and what is wrong with it.
pub type OnInvalid = Box<dyn Fn(u64, &str) + Send + Sync>;

/// What the caller hears of: progress, and each invalid line.
pub struct Listener {
    pub progress: Box<dyn Fn(Counts) + Send + Sync>,
    pub invalid: OnInvalid,
}

/// Where result lines go, and the ids of the results an earlier run already wrote there.
pub struct Results {
    pub writer: Box<dyn Write + Send>,
    pub done: Vec<IdKey>,
}

/// A job id, compactly (a 96-bit hash: no two ids of a batch collide in practice), for the
/// set of ids already seen; with the line that has it, 16 bytes per id.
pub type IdKey = [u32; 3];

fn id_key(id: &serde_json::Value) -> IdKey {
    let text = id.to_string();
    let mut a = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (text.len(), &text, 0x9e37_79b9_u32).hash(&mut b);
    let (a, b) = (a.finish(), b.finish());
    [a as u32, (a >> 32) as u32, b as u32]
}

/// Opens the results file for appending and collects the ids it already holds. A last line
/// cut short (a crash mid-write) is removed. `jobs` is the jobs file's metadata, when the
/// jobs come from a file: results are never written into the jobs file itself.
pub fn open_results(path: &Path, jobs: Option<&std::fs::Metadata>) -> Result<Results> {
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("opening the results file {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("reading the results file {}", path.display()))?;
    if jobs.is_some_and(|jobs| (meta.dev(), meta.ino()) == (jobs.dev(), jobs.ino())) {
        anyhow::bail!("the results file {} is the jobs file; pass another -o file", path.display());
    }
    if !meta.is_file() {
        // A pipe or a device (e.g. /dev/stdout): written to, never read back or cut.
        return Ok(Results { writer: Box::new(file), done: Vec::new() });
    }
    // Two batches appending to one file would each run the jobs the other is running. The
    // lock goes with the file descriptor, so it lasts as long as this process writes.
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("the results file {} is in use by another host batch; wait for it to end, or pass another -o file", path.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking the results file {}", path.display()));
        }
    }
    let mut ids = Vec::new();
    let mut reader = std::io::BufReader::new(&file);
    let mut line = Vec::new();
    let mut complete_len: u64 = 0;
    let mut number = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        number += 1;
        if line.last() != Some(&b'\n') {
            break;
        }
        complete_len += n as u64;
        if line.trim_ascii().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_slice(&line)
            .with_context(|| format!("{}:{number}: not a result line; pass another -o file", path.display()))?;
        let id = value.get("id").with_context(|| format!("{}:{number}: a result line without an id", path.display()))?;
        ids.push(id_key(id));
    }
    drop(reader);
    if file.metadata()?.len() != complete_len {
        tracing::warn!("{}: removing a last line cut short", path.display());
        file.set_len(complete_len)?;
    }
    file.seek(SeekFrom::End(0))?;
    Ok(Results { writer: Box::new(file), done: ids })
}

/// Counts the lines of a file quickly, for the progress bar's total.
pub fn count_lines(path: &Path) -> Option<u64> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut lines = 0;
    let mut last = b'\n';
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        last = buf[n - 1];
    }
    Some(lines + u64::from(last != b'\n'))
}

/// Parses and checks input line `number` against the configuration.
fn parse_job(config: &Config, number: u64, line: &str) -> Result<Job, String> {
    let job: JobLine = serde_json::from_str(line).map_err(|e| {
        let text = e.to_string();
        let what = text.split(" at line ").next().unwrap_or(&text);
        if e.is_syntax() || e.is_eof() {
            format!("not a JSON object: {what} at column {}", e.column())
        } else if !line.trim_start().starts_with('{') {
            r#"not a JSON object: each line is one job, like {"id": 1, "service": "NAME", "prompt": "..."}"#.to_string()
        } else {
            what.to_string()
        }
    })?;
    if !(job.id.is_string() || job.id.is_number()) {
        return Err("`id` must be a string or a number".into());
    }
    let plan = match (job.service, job.services) {
        (Some(service), None) if service != config::ALL => {
            let chain: Vec<String> = std::iter::once(service).chain(job.fallback).collect();
            config.check_services(&chain).map_err(|e| e.0)?;
            Plan::Chain(chain)
        }
        (Some(all), None) if job.fallback.is_empty() => Plan::FanOut(config.service_list(vec![all]).map_err(|e| e.0)?),
        (Some(_), None) => return Err(format!("`fallback` goes with a single service, not `{}`", config::ALL)),
        (None, Some(services)) if !services.is_empty() && job.fallback.is_empty() => {
            Plan::FanOut(config.service_list(services).map_err(|e| e.0)?)
        }
        (None, Some(_)) if !job.fallback.is_empty() => return Err("`fallback` goes with `service`, not `services`".into()),
        _ => return Err("give `service` (optionally with `fallback`) or a non-empty `services`".into()),
    };
    let files = check_files(&job.files)?;
    if job.options.contains_key("") {
        return Err("`options` has an empty option name".into());
    }
    if job.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        return Err("`model` is empty; leave it out for the service's default".into());
    }
    let timeout = job.timeout.as_deref().map(parse_timeout).transpose()?;
    let request = Request { prompt: job.prompt, files, model: job.model, options: job.options.into_iter().collect(), timeout };
    Ok(Job { id: job.id, line: number, plan, request })
}

/// Loads services on first use and keeps them for the batch.
struct Services<'a> {
    config: &'a Config,
    runtime: &'a Runtime,
    loaded: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Target>>>>,
}

impl Services<'_> {
    /// The service, loaded by the first job that needs it while the others wait for it.
    async fn get(&self, name: &str) -> Target {
        let cell = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_string()).or_default().clone();
        cell.get_or_init(|| async {
            let config = self.config.service(name).expect("checked when the line was parsed");
            Service::load_or_fail(self.runtime, config).await
        })
        .await
        .clone()
    }
}

enum Item {
    Job(Job),
    Invalid(u64, String),
    /// The input could not be read (what went wrong); nothing follows.
    Unreadable(String),
}

/// The most parsed lines handed from the reader thread at once.
const READ_BATCH: usize = 64;

/// Runs the batch: jobs from `input`, result lines to `results` (skipping the jobs whose
/// results are there already).
pub async fn run(
    config: &Config,
    runtime: &Runtime,
    ctx: Context,
    input: std::io::BufReader<Box<dyn Read + Send>>,
    results: Results,
    options: Options,
    listener: Listener,
) -> Result<(Counts, End)> {
    let config_for_reader = config.clone();
    // Parsed lines travel in small batches: one hand-over between threads per batch, not per
    // line. A batch is sent as soon as the input has nothing more buffered, so jobs fed
    // slowly on stdin start at once.
    let (item_tx, mut batches) = tokio::sync::mpsc::channel::<Vec<Item>>(4);
    let cancel = ctx.cancel.clone();
    let batch_len = options.jobs.clamp(1, READ_BATCH);
    // A thread of its own, never waited for when the batch stops early: a read from a
    // terminal or a pipe may block for ever, and must not keep Ctrl-C from ending the host.
    let read = move || {
        let mut input = input;
        let (mut number, mut bytes, mut batch) = (0u64, Vec::new(), Vec::with_capacity(batch_len));
        loop {
            bytes.clear();
            let n = match input.read_until(b'\n', &mut bytes) {
                Ok(n) => n,
                Err(e) => {
                    batch.push(Item::Unreadable(format!("reading line {} of the jobs: {e}", number + 1)));
                    let _ = item_tx.blocking_send(batch);
                    return;
                }
            };
            if n > 0 {
                number += 1;
                let item = match std::str::from_utf8(&bytes) {
                    Ok(line) if line.trim().is_empty() => None,
                    Ok(line) => Some(match parse_job(&config_for_reader, number, line.trim_end_matches(['\n', '\r'])) {
                        Ok(job) => Item::Job(job),
                        Err(message) => Item::Invalid(number, message),
                    }),
                    Err(e) => Some(Item::Invalid(number, format!("not UTF-8 text (at byte {})", e.valid_up_to() + 1))),
                };
                batch.extend(item);
            }
            let more_buffered = n > 0 && !input.buffer().is_empty();
            if !batch.is_empty() && (batch.len() >= batch_len || !more_buffered) {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_len));
                if item_tx.blocking_send(full).is_err() || cancel.is_cancelled() {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
    };
    let reader = std::thread::Builder::new().name("jobs-reader".into()).spawn(read).context("starting the jobs reader")?;
    let mut items = futures::stream::poll_fn(move |cx| batches.poll_recv(cx)).flat_map(futures::stream::iter);

    let services = Arc::new(Services { config, runtime, loaded: Mutex::new(HashMap::new()) });
    // Each id seen: 0 when an earlier run's result has it, else the line that has it first
    // (u32::MAX for any line past that).
    let mut seen: HashMap<IdKey, u32> = results.done.into_iter().map(|id| (id, 0)).collect();
    let counts = Mutex::new(Counts::default());
    // Where results go, and why the first that could not be written was not: nothing is
    // written after it (it may have left part of a line, which must stay last).
    let output: Mutex<(Box<dyn Write + Send>, Option<String>)> = Mutex::new((results.writer, None));
    let permits = tokio::sync::Semaphore::new(options.jobs.max(1));
    let update = |f: &dyn Fn(&mut Counts)| {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
        (listener.progress)(*c);
    };
    let mut end = End::Complete;
    let (mut exhausted, mut unreadable) = (false, None);
    let mut running = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    loop {
        // Once cancelled, no job starts: those running finish (stopped) below.
        let item = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => None,
            Some(()) = running.next(), if !running.is_empty() => continue,
            item = items.next() => {
                exhausted = item.is_none();
                item
            }
        };
        let Some(item) = item else { break };
        let job = match item {
            Item::Unreadable(why) => {
                unreadable = Some(why);
                break;
            }
            Item::Invalid(number, message) => Err((number, message)),
            Item::Job(job) => match seen.entry(id_key(&job.id)) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(u32::try_from(job.line).unwrap_or(u32::MAX));
                    Ok(job)
                }
                std::collections::hash_map::Entry::Occupied(mut slot) => match *slot.get() {
                    0 => {
                        // Done by an earlier run; a later line with this id is a duplicate.
                        slot.insert(u32::try_from(job.line).unwrap_or(u32::MAX));
                        update(&|c| c.skipped += 1);
                        continue;
                    }
                    u32::MAX => Err((job.line, format!("duplicate id {}: an earlier line has it already (ids must be unique)", job.id))),
                    first => Err((job.line, format!("duplicate id {}: line {first} has it already (ids must be unique)", job.id))),
                },
            },
        };
        let job = match job {
            Ok(job) => job,
            Err((number, message)) => {
                (listener.invalid)(number, &message);
                update(&|c| c.invalid += 1);
                if options.strict {
                    end = End::Invalid;
                    break;
                }
                continue;
            }
        };
        // Wait for a free slot while finishing what runs, so results flow out as they come.
        let permit = loop {
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => break None,
                permit = permits.acquire() => break Some(permit),
                Some(()) = running.next(), if !running.is_empty() => {}
            }
        };
        let Some(permit) = permit else { break };
        update(&|c| c.running += 1);
        let (services, ctx, output, update) = (services.clone(), ctx.clone(), &output, &update);
        running.push(async move {
            let _permit = permit;
            let line = run_job(&services, &job, &ctx).await;
            match line {
                None => update(&|c| {
                    c.running -= 1;
                    c.cancelled += 1;
                }),
                Some((text, ok)) => {
                    let written = {
                        let mut guard = output.lock().unwrap_or_else(|p| p.into_inner());
                        let (out, unwritable) = &mut *guard;
                        if unwritable.is_some() {
                            false
                        } else if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                            *unwritable = Some(format!("writing the result of job {}: {e}", job.id));
                            false
                        } else {
                            true
                        }
                    };
                    if !written {
                        ctx.cancel.cancel();
                        update(&|c| {
                            c.running -= 1;
                            c.cancelled += 1;
                        });
                        return;
                    }
                    update(&|c| {
                        c.running -= 1;
                        if ok { c.ok += 1 } else { c.failed += 1 }
                    });
                }
            }
        });
    }
    while running.next().await.is_some() {}
    drop(items);
    if let Some(why) = output.lock().unwrap_or_else(|p| p.into_inner()).1.take() {
        end = End::Unwritable(why);
    } else if ctx.cancel.is_cancelled() {
        end = End::Interrupted;
    }
    if let Some(why) = unreadable {
        anyhow::bail!(why);
    }
    if exhausted {
        // The reader sent all it read and ended; one that died early must not pass for the
        // end of the input.
        reader.join().map_err(|_| anyhow::anyhow!("the jobs reader failed"))?;
    }
    let counts = *counts.lock().unwrap_or_else(|p| p.into_inner());
    Ok((counts, end))
}

/// Runs one job; the result line (with its newline) and whether it succeeded, or `None`
/// when it was cancelled (nothing is written, so a rerun does it).
async fn run_job(services: &Services<'_>, job: &Job, ctx: &Context) -> Option<(String, bool)> {
    let cancelled = |o: &Outcome| o.error.as_ref().is_some_and(|e| e.kind == FailureKind::Cancelled);
    let line = match &job.plan {
        Plan::Chain(names) => {
            let chain: Vec<Target> = futures::future::join_all(names.iter().map(|n| services.get(n))).await;
            let outcome = dispatch::failover(chain, &job.request, ctx).await;
            if cancelled(&outcome) {
                return None;
            }
            let ok = outcome.success;
            (serde_json::to_string(&ResultLine { id: &job.id, outcome: Some(&outcome), success: None, results: None }), ok)
        }
        Plan::FanOut(names) => {
            let runs = names.iter().map(|n| async move {
                match services.get(n).await {
                    Ok(service) => dispatch::execute(&service, &job.request, ctx).await,
                    Err(outcome) => outcome,
                }
            });
            let outcomes = futures::future::join_all(runs).await;
            if outcomes.iter().any(cancelled) {
                return None;
            }
            let ok = outcomes.iter().all(|o| o.success);
            (serde_json::to_string(&ResultLine { id: &job.id, outcome: None, success: Some(ok), results: Some(&outcomes) }), ok)
        }
    };
    let (text, ok) = line;
    let mut text = text.expect("a result serializes");
    text.push('\n');
    Some((text, ok))
}
