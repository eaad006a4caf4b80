//! Runs one command as a subprocess: argv without a shell, its own process group, timeouts
//! that kill the whole group, stdin written while bounded stdout/stderr are read.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::spawn::{self, Child, Launch};

/// What to run and within which limits.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The program: a name looked up on PATH, or a path.
    pub program: String,
    /// Arguments, each passed as exactly one argv element.
    pub args: Vec<String>,
    /// Extra environment variables on top of the host's own.
    pub env: Vec<(String, String)>,
    /// Bytes for stdin (then closed); `None` gives the child /dev/null.
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Cap on captured stdout and on captured stderr, each.
    pub max_output: u64,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Code(i32),
    Signal(i32),
}

/// Why the host stopped the process, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The wall-clock timeout ran out.
    Timeout,
    /// Nothing was printed for the idle timeout.
    Idle,
    /// The caller cancelled (Ctrl-C).
    Cancelled,
}

/// A finished process.
#[derive(Debug, Clone)]
pub struct Finished {
    pub status: Status,
    pub stopped: Option<Stopped>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration: Duration,
}

/// The process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command `{0}` {where}", where = where_not_found(.0))]
    NotFound(String),
    #[error("command `{0}` is not executable (permission denied)")]
    NotExecutable(String),
    #[error("the argument list for `{0}` is too long for the operating system")]
    TooLong(String),
    #[error("an argument or environment variable for `{0}` contains a NUL byte, which a command line cannot carry")]
    NulByte(String),
    #[error("cannot start `{program}` for now: {source}")]
    Resources { program: String, source: io::Error },
    #[error("cannot start `{program}`: {source}")]
    Other { program: String, source: io::Error },
}

/// Where a program was looked for in vain: a path names one file, a name is looked up on PATH.
pub fn where_not_found(program: &str) -> &'static str {
    if program.contains('/') { "does not exist" } else { "not found on PATH" }
}

/// Environment variables a plugin may not set: they change which code a program loads or
/// where it looks programs up.
const FORBIDDEN_ENV: &[&str] = &[
    "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "NODE_OPTIONS", "PYTHONSTARTUP",
    "PYTHONHOME", "PYTHONINSPECT", "PERL5LIB", "PERL5OPT", "PERLLIB", "RUBYOPT", "RUBYLIB",
    "GLIBC_TUNABLES", "MALLOC_CONF", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "HOSTALIASES",
    "RESOLV_HOST_CONF", "LOCPATH", "NLSPATH", "GCONV_PATH", "HOME",
];

/// Checks one environment variable handed over by a plugin; the error says why it is refused.
pub fn check_plugin_env(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(format!("`{name}` is not a valid environment variable name"));
    }
    if value.contains('\0') {
        return Err(format!("the value of `{name}` contains a NUL byte"));
    }
    let upper = name.to_ascii_uppercase();
    let hijack = upper.starts_with("LD_")
        || upper.starts_with("DYLD_")
        || upper.ends_with("PATH")
        || FORBIDDEN_ENV.contains(&upper.as_str());
    if hijack {
        return Err(format!("plugins may not set `{name}`: it changes which code or programs are loaded"));
    }
    Ok(())
}

/// Looks a program up the way the spawn will (see [`spawn::candidates`]): a name with a
/// slash is a path, otherwise each entry of `own_path` (a service's own `PATH` setting) or
/// else of the host's PATH is tried. Returns the executable found, if any.
pub fn find_program(program: &str, own_path: Option<&str>) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let host_path = std::env::var_os("PATH");
    let path = own_path.map(std::ffi::OsStr::new).or(host_path.as_deref());
    spawn::candidates(program, path).into_iter().map(std::path::PathBuf::from).find(|p| executable(p))
}

/// Open files a running command holds in the host (its output pipes and pidfd, and its
/// input pipe), with room for those a spawn holds for a moment.
pub const FILES_PER_COMMAND: u64 = 4;
/// Open files the host keeps for itself: standard streams, the state store, the jobs and
/// results files, the compiled plugins, the runtime's event queue and signal pipes. Files
/// open when the limit is worked out (some perhaps inherited) count beyond half of these.
const FILES_FOR_THE_HOST: u64 = 32;

/// How many commands may run at once within this process's limit on open files
/// (`ulimit -n`), and that limit; `None` when there is no limit to speak of.
pub fn command_limit() -> Option<(usize, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let open_now = std::fs::read_dir("/proc/self/fd").map_or(0, |fds| fds.count() as u64);
    let for_the_host = FILES_FOR_THE_HOST.max(open_now + FILES_FOR_THE_HOST / 2);
    let commands = limit.rlim_cur.saturating_sub(for_the_host) / FILES_PER_COMMAND;
    Some((usize::try_from(commands).unwrap_or(usize::MAX).max(1), limit.rlim_cur))
}

/// Keeps commands off the user's terminal. A command runs in a process group of its own, so
/// to the terminal it is a background job: reading it (a login prompt opening /dev/tty, say)
/// would stop the command with SIGTTIN until its timeout. With SIGTTIN and SIGTTOU ignored,
/// which commands inherit across exec, such a read fails at once (EIO) and the command can
/// report it. Call once at start-up, before any command runs; it applies to this process too.
pub fn keep_commands_off_the_terminal() {
    // SAFETY: setting a signal to SIG_IGN installs no handler and touches no memory.
    unsafe {
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
    }
}

/// Runs this process, and so the commands it starts, under Linux's batch scheduling policy
/// (`SCHED_BATCH`, as `chrt --batch` would) when it runs under the normal one. Batch tasks get
/// the same share of the CPU, but waking one does not preempt the task running: handing a
/// spawn to a worker thread, or a command starting, no longer costs the busy thread a
/// context switch, which on a saturated machine is about a seventh of the host's CPU per
/// request. Commands are not interactive (their output is captured), so scheduling them this
/// way costs them nothing noticeable. A host started under another policy (`chrt --idle`,
/// real-time) keeps it. Call once at start-up, before any thread starts: threads and
/// children inherit it.
pub fn schedule_as_batch() {
    #[cfg(target_os = "linux")]
    // SAFETY: sched_getscheduler and sched_setscheduler read and set the calling thread's
    // policy; the parameter is a plain struct on the stack.
    unsafe {
        if libc::sched_getscheduler(0) == libc::SCHED_OTHER {
            let normal = libc::sched_param { sched_priority: 0 };
            // Refused (a sandbox forbidding it): the host runs as it was started.
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &normal);
        }
    }
}

/// Sends `signal` to the whole process group `pgid`; a group that is gone is not an error.
fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid only sends a signal; it touches no memory.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// What to start for `spec`: its argv as given (no shell).
fn launch(spec: &Spec) -> Launch {
    Launch { program: spec.program.clone(), args: spec.args.clone(), env: spec.env.clone(), stdin_piped: spec.stdin.is_some() }
}

/// What a failed spawn of `program` means.
fn spawn_error(program: &str, source: io::Error) -> SpawnError {
    let program = program.to_string();
    match source.kind() {
        io::ErrorKind::NotFound => SpawnError::NotFound(program),
        io::ErrorKind::PermissionDenied => SpawnError::NotExecutable(program),
        _ if source.raw_os_error() == Some(libc::E2BIG) => SpawnError::TooLong(program),
        // The host's or the system's limits on open files, processes or memory: another try
        // may find them freed.
        _ if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM)) => {
            SpawnError::Resources { program, source }
        }
        _ => SpawnError::Other { program, source },
    }
}

/// Runs the command to its end, or until a timeout or `cancel` stops its whole process group.
pub async fn run(spec: &Spec, cancel: &CancellationToken) -> Result<Finished, SpawnError> {
    let mut texts = std::iter::once(&spec.program).chain(&spec.args).chain(spec.env.iter().flat_map(|(k, v)| [k, v]));
    if texts.any(|t| t.contains('\0')) {
        return Err(SpawnError::NulByte(spec.program.clone()));
    }
    let launch = launch(spec);
    // Spawning suspends the calling thread until the child has called exec (vfork), which on
    // a busy machine means until the child gets a CPU: a worker thread does it, never the
    // async thread.
    let spawned = tokio::task::spawn_blocking(move || {
        let at = Instant::now();
        spawn::spawn(&launch).map(|child| {
            let group = GroupGuard::new(&child);
            (child, group, at)
        })
    })
    .await;
    match spawned {
        Ok(Ok((child, group, started))) => Ok(finish(child, group, started, spec, cancel).await),
        Ok(Err(source)) => Err(spawn_error(&spec.program, source)),
        Err(e) => Err(SpawnError::Other { program: spec.program.clone(), source: io::Error::other(format!("the spawning thread failed: {e}")) }),
    }
}

/// Stops a command's whole process group if the wait for it is abandoned: when the future
/// running it is dropped (the host exiting on an error, say) before the leader was reaped.
/// Until then the group id is still the leader's, so no other process can have taken it.
struct GroupGuard {
    pgid: i32,
    armed: AtomicBool,
}

impl GroupGuard {
    fn new(child: &Child) -> GroupGuard {
        GroupGuard { pgid: child.id(), armed: AtomicBool::new(true) }
    }

    /// The leader has been reaped: from now on its group id may belong to someone else.
    fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.pgid > 0 && self.armed.load(Ordering::Relaxed) {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Waits for a started process to end, or stops its whole process group when a timeout or
/// `cancel` fires; captures its output meanwhile.
async fn finish(mut child: Child, group: GroupGuard, started: Instant, spec: &Spec, cancel: &CancellationToken) -> Finished {
    let pgid = group.pgid;

    // Everything below runs in this one task: the readers, the stdin writer and the
    // supervisor are polled together, so a request costs no extra task wake-ups.
    let activity = AtomicU64::new(0);
    let (leader_gone, gone) = tokio::sync::watch::channel(false);
    // After the leader exits, readers get `patience` to reach end of file: a pipe held open by
    // a process that escaped the group is given up on, keeping what was read.
    let patience = spec.kill_grace.max(Duration::from_millis(100));
    let give_up = || {
        let mut gone = gone.clone();
        async move {
            let _ = gone.wait_for(|g| *g).await;
            tokio::time::sleep(patience).await;
        }
    };
    let writer = {
        let (pipe, bytes) = (child.stdin.take(), spec.stdin.as_deref());
        let mut gone = gone.clone();
        async move {
            let (Some(mut pipe), Some(bytes)) = (pipe, bytes) else { return };
            // A child that exits without reading its input closes the pipe: not an error.
            tokio::select! {
                _ = async { let _ = pipe.write_all(bytes).await; let _ = pipe.shutdown().await; } => {}
                _ = gone.wait_for(|g| *g) => {}
            }
        }
    };
    let out = capture(child.stdout.take(), spec.max_output, &activity, started, give_up());
    let err = capture(child.stderr.take(), spec.max_output, &activity, started, give_up());
    let supervisor = async {
        let ended = supervise(&mut child, pgid, spec, &activity, started, cancel).await;
        group.disarm();
        let duration = started.elapsed();
        // The leader is gone; nothing it left behind in its group may outlive the request.
        if pgid > 0 {
            signal_group(pgid, libc::SIGKILL);
        }
        let _ = leader_gone.send(true);
        (ended, duration)
    };
    let (((status, stopped), duration), (stdout, stdout_truncated), (stderr, stderr_truncated), ()) =
        tokio::join!(supervisor, out, err, writer);
    Finished { status, stopped, stdout, stderr, stdout_truncated, stderr_truncated, duration }
}

/// Waits for the child while watching the timeouts and `cancel`; stops the group when one fires.
async fn supervise(
    child: &mut Child,
    pgid: i32,
    spec: &Spec,
    activity: &AtomicU64,
    started: Instant,
    cancel: &CancellationToken,
) -> (Status, Option<Stopped>) {
    let deadline = tokio::time::Instant::from_std(started + spec.timeout);
    let reason = loop {
        let idle_check = match spec.idle_timeout {
            Some(idle) => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                tokio::time::Instant::from_std(started + last + idle)
            }
            None => deadline,
        };
        tokio::select! {
            status = child.wait() => return (to_status(status), None),
            _ = cancel.cancelled() => break Stopped::Cancelled,
            _ = tokio::time::sleep_until(deadline) => break Stopped::Timeout,
            _ = tokio::time::sleep_until(idle_check), if spec.idle_timeout.is_some() => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if started.elapsed() >= last + spec.idle_timeout.unwrap_or_default() {
                    break Stopped::Idle;
                }
            }
        }
    };
    if pgid > 0 {
        signal_group(pgid, libc::SIGTERM);
        // A stopped process (one that read the terminal from the background, say) acts on
        // SIGTERM only once it is continued.
        signal_group(pgid, libc::SIGCONT);
    }
    let hurried = HURRY.notified();
    tokio::pin!(hurried);
    hurried.as_mut().enable();
    let status = tokio::select! {
        status = child.wait() => status,
        () = tokio::time::sleep(spec.kill_grace) => stop_now(child, pgid).await,
        () = &mut hurried => stop_now(child, pgid).await,
        () = std::future::ready(()), if HURRIED.load(Ordering::Relaxed) => stop_now(child, pgid).await,
    };
    (to_status(status), Some(reason))
}

/// SIGKILL to the whole group, and the leader's end.
async fn stop_now(child: &mut Child, pgid: i32) -> io::Result<std::process::ExitStatus> {
    if pgid > 0 {
        signal_group(pgid, libc::SIGKILL);
    }
    child.wait().await
}

/// Set once the user insists on stopping (a second Ctrl-C): see [`hurry`].
static HURRIED: AtomicBool = AtomicBool::new(false);
static HURRY: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Commands being stopped get SIGKILL now instead of the rest of their `kill_grace`, and so
/// does every command stopped from now on.
pub fn hurry() {
    HURRIED.store(true, Ordering::Relaxed);
    HURRY.notify_waiters();
}

fn to_status(status: io::Result<std::process::ExitStatus>) -> Status {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Status::Code(code),
            (None, Some(signal)) => Status::Signal(signal),
            (None, None) => Status::Code(-1),
        },
        Err(_) => Status::Code(-1),
    }
}

/// The most bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;

/// Reads a stream to its end (or until `give_up` completes), keeping at most `cap` bytes and
/// draining the rest.
async fn capture<R: AsyncRead + Unpin>(
    stream: Option<R>,
    cap: u64,
    activity: &AtomicU64,
    started: Instant,
    give_up: impl std::future::Future<Output = ()>,
) -> (Vec<u8>, bool) {
    let Some(mut stream) = stream else { return (Vec::new(), false) };
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    let (mut kept, mut truncated) = (Vec::new(), false);
    // Output is read straight into what is kept, whose buffer starts small and grows with
    // the output (a silent process costs 4 KiB, not a zeroed 64 KiB chunk); past the cap, it
    // is read into `spill` and thrown away.
    let mut spill = Vec::new();
    tokio::pin!(give_up);
    loop {
        let room = cap - kept.len();
        let (into, limit) = if room > 0 {
            kept.reserve(room.min(READ_CHUNK).min(kept.len().max(4096)));
            let spare = kept.capacity() - kept.len();
            (&mut kept, room.min(spare))
        } else {
            spill.clear();
            spill.reserve(READ_CHUNK);
            (&mut spill, READ_CHUNK)
        };
        let mut limited = (&mut stream).take(limit as u64);
        tokio::select! {
            read = limited.read_buf(into) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    truncated |= room == 0;
                }
            },
            _ = &mut give_up => break,
        }
    }
    (kept, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_cannot_set_loader_or_lookup_variables() {
        for name in ["LD_PRELOAD", "ld_library_path", "DYLD_INSERT_LIBRARIES", "PATH", "NODE_OPTIONS", "PYTHONPATH", "HOME", "A=B", ""] {
            assert!(check_plugin_env(name, "x").is_err(), "{name} should be refused");
        }
        for name in ["CLAUDE_CODE_MAX_RETRIES", "GEMINI_CLI_TRUST_WORKSPACE", "NO_COLOR"] {
            assert!(check_plugin_env(name, "1").is_ok(), "{name} should be allowed");
        }
    }
}
