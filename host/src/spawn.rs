//! Starts a command's process: its argv and environment handed straight to exec (no shell),
//! in a process group of its own, stdout and stderr on pipes, its end watched by the runtime.
//!
//! On Linux x86-64 the process is started with `clone3` sharing the host's memory until its
//! exec (as `vfork` and the C library's `posix_spawn` do), with the kernel clearing every
//! signal handler in the child (`CLONE_CLEAR_SIGHAND`, Linux 5.5) and handing back a pidfd
//! (`CLONE_PIDFD`). That spares what `posix_spawn` pays for every command: a stack mapped and
//! unmapped (the unmapping interrupts every CPU the host runs on), a query and reset of each
//! of the 64 signals, and the pidfd opened afterwards. Elsewhere, or where the kernel or a
//! sandbox refuses `clone3`, tokio's spawn (`posix_spawn`) starts it, with the same result.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// A path (with a slash), or a name looked up on the host's PATH as `execvp` does.
    pub program: String,
    /// Arguments after argv[0] (which is `program`), each exactly one argv element.
    pub args: Vec<String>,
    /// Variables set on top of the host's environment (a later one wins over an earlier).
    pub env: Vec<(String, String)>,
    /// Whether stdin is a pipe (see [`Child::stdin`]) or /dev/null.
    pub stdin_piped: bool,
}

/// A started process, the leader of its own process group.
pub struct Child {
    pid: i32,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    exit: Exit,
}

enum Exit {
    /// Started by `clone3`: the pidfd turns readable when the process ends; `status` once reaped.
    Pidfd { fd: Option<AsyncFd<OwnedFd>>, status: Option<ExitStatus> },
    /// Started by tokio, which reaps it (and kills it if dropped before).
    Tokio(tokio::process::Child),
}

impl Child {
    /// The process id, which is also its process group id.
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Waits for the process to end and reaps it. Cancel-safe: it may be called again.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match &mut self.exit {
            Exit::Tokio(child) => child.wait().await,
            Exit::Pidfd { status: Some(status), .. } => Ok(*status),
            Exit::Pidfd { fd: None, .. } => Err(io::Error::other("the process's pidfd is gone")),
            Exit::Pidfd { fd: Some(fd), status } => loop {
                let mut ready = fd.readable().await?;
                if let Some(ended) = reap(self.pid)? {
                    *status = Some(ended);
                    return Ok(ended);
                }
                ready.clear_ready();
            },
        }
    }
}

impl Drop for Child {
    /// A process nobody waits for any more is killed and reaped in the background.
    fn drop(&mut self) {
        let Exit::Pidfd { fd, status: None } = &mut self.exit else { return };
        let (pid, fd) = (self.pid, fd.take());
        // SAFETY: kill(2) only sends a signal; the pid is ours until it is reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        match (fd, tokio::runtime::Handle::try_current()) {
            (Some(fd), Ok(runtime)) => {
                runtime.spawn(async move {
                    while let Ok(mut ready) = fd.readable().await {
                        if !matches!(reap(pid), Ok(None)) {
                            break;
                        }
                        ready.clear_ready();
                    }
                });
            }
            // Without a runtime the host is going away; whatever is left is reaped with it.
            _ => {
                let _ = reap(pid);
            }
        }
    }
}

/// The exit status of `pid` if it has ended (reaping it), without waiting.
fn reap(pid: i32) -> io::Result<Option<ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only `status`.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => return Ok(None),
            n if n > 0 => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// Starts the process. The calling thread is suspended until the child has called exec, so
/// an async caller calls this from a worker thread; it must be within the tokio runtime,
/// whose reactor watches the pipes and the process's end.
pub fn spawn(launch: &Launch) -> io::Result<Child> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    if clone::usable() {
        match clone::spawn(launch) {
            Ok(child) => return Ok(child),
            Err(clone::Failed::Io(e)) => return Err(e),
            Err(clone::Failed::Refused) => {}
        }
    }
    spawn_with_tokio(launch)
}

/// Starts the process the portable way, with tokio (and the C library's `posix_spawn`).
pub fn spawn_with_tokio(launch: &Launch) -> io::Result<Child> {
    let stdin = if launch.stdin_piped { Stdio::piped() } else { dev_null()?.try_clone().map(Stdio::from)? };
    let mut child = tokio::process::Command::new(&launch.program)
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().map_or(0, |id| id as i32);
    let stdin = child.stdin.take().map(|p| p.into_owned_fd().and_then(pipe::Sender::from_owned_fd)).transpose()?;
    let stdout = child.stdout.take().map(|p| p.into_owned_fd().and_then(pipe::Receiver::from_owned_fd)).transpose()?;
    let stderr = child.stderr.take().map(|p| p.into_owned_fd().and_then(pipe::Receiver::from_owned_fd)).transpose()?;
    Ok(Child { pid, stdin, stdout, stderr, exit: Exit::Tokio(child) })
}

/// /dev/null for children's stdin, opened once (as descriptor 3 or above, see [`pipe_pair`]).
fn dev_null() -> io::Result<&'static OwnedFd> {
    static DEV_NULL: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    DEV_NULL
        .get_or_init(|| std::fs::File::open("/dev/null").map(OwnedFd::from).and_then(above_stdio).ok())
        .as_ref()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "/dev/null cannot be opened"))
}

/// Where exec looks for `program`, in order, as `execvp` does: a name with a slash is a
/// path; otherwise each entry of `path` (the C library's "/bin:/usr/bin" without one), an
/// empty entry meaning the current directory. `path` is the command's own PATH setting (a
/// service's `env`) if it has one, else the host's, as with Rust's and tokio's spawn.
pub fn candidates(program: &str, path: Option<&OsStr>) -> Vec<OsString> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    if program.contains('/') {
        return vec![program.into()];
    }
    let path = path.unwrap_or(OsStr::new("/bin:/usr/bin"));
    path.as_bytes()
        .split(|b| *b == b':')
        .map(|dir| {
            if dir.is_empty() {
                return OsString::from(program);
            }
            let mut full = dir.to_vec();
            if !dir.ends_with(b"/") {
                full.push(b'/');
            }
            full.extend_from_slice(program.as_bytes());
            OsString::from_vec(full)
        })
        .collect()
}

/// `fd`, or a copy of it numbered 3 or above if it has the number of stdin, stdout or stderr.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor, which we then own.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if moved < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod clone {
    //! `clone3` + exec: the child shares the host's memory until exec, on a stack of its own,
    //! and does only what it must: join a new process group, put its stdin, stdout and stderr
    //! in place, restore SIGPIPE and the signal mask, and exec each candidate path in turn.

    use super::*;
    use std::borrow::Cow;
    use std::ffi::{CStr, c_int, c_void};
    use std::os::fd::FromRawFd;
    use std::os::raw::c_char;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    // From <linux/sched.h>.
    const CLONE_VM: u64 = 0x100;
    const CLONE_PIDFD: u64 = 0x1000;
    const CLONE_VFORK: u64 = 0x4000;
    const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

    /// `struct clone_args` as of Linux 5.3 (CLONE_ARGS_SIZE_VER0), all the fields used here.
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
    }

    /// Everything the child uses, prepared by the parent (the child allocates nothing), and
    /// what it reports back: the parent reads `errno` once the child has exec'd or exited.
    #[repr(C)]
    struct Plan {
        /// Null-terminated lists of C strings.
        paths: *const *const c_char,
        argv: *const *const c_char,
        envp: *const *const c_char,
        /// The descriptors to become stdin, stdout and stderr (all 3 or above).
        stdio: [c_int; 3],
        /// Why the child could not exec; 0 if it did.
        errno: c_int,
    }

    /// Why `clone3` did not start the process.
    pub enum Failed {
        /// The kernel or a sandbox does not offer it (too old, seccomp): use the portable way.
        Refused,
        Io(io::Error),
    }

    static REFUSED: AtomicBool = AtomicBool::new(false);

    /// Whether `clone3` is worth trying: not refused before.
    pub fn usable() -> bool {
        !REFUSED.load(Ordering::Relaxed)
    }

    /// The host's environment (`NAME=value` entries by name) and PATH, taken once: the host
    /// never changes its own.
    struct HostEnvironment {
        entries: Vec<(OsString, CString)>,
        path: Option<OsString>,
    }

    fn host_environment() -> &'static HostEnvironment {
        use std::os::unix::ffi::OsStrExt;
        static BASE: OnceLock<HostEnvironment> = OnceLock::new();
        BASE.get_or_init(|| HostEnvironment {
            entries: std::env::vars_os()
                .filter_map(|(name, value)| {
                    let mut entry = name.as_bytes().to_vec();
                    entry.push(b'=');
                    entry.extend_from_slice(value.as_bytes());
                    CString::new(entry).ok().map(|entry| (name, entry))
                })
                .collect(),
            path: std::env::var_os("PATH"),
        })
    }

    /// The child's stack: one mapping per spawning thread, reused (a thread starts one child
    /// at a time, and the child is done with it once it has exec'd or exited, before the
    /// thread goes on). The child uses well under a kilobyte of its 64 KiB, and only the pages
    /// it touches take memory; below them a guard page turns an overflow into a fault.
    struct ChildStack {
        mapping: *mut c_void,
        len: usize,
        guard: usize,
    }

    const STACK_BYTES: usize = 64 << 10;

    impl ChildStack {
        fn new() -> io::Result<ChildStack> {
            // SAFETY: sysconf reads a constant.
            let guard = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096);
            let len = guard + STACK_BYTES;
            // SAFETY: a fresh anonymous mapping, owned by the ChildStack (unmapped on drop).
            let mapping = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK, -1, 0)
            };
            if mapping == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = ChildStack { mapping, len, guard };
            // SAFETY: the first page of our own mapping.
            if unsafe { libc::mprotect(mapping, guard, libc::PROT_NONE) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    impl Drop for ChildStack {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no longer used (the thread is ending).
            unsafe { libc::munmap(self.mapping, self.len) };
        }
    }

    thread_local! {
        static STACK: std::cell::RefCell<Option<ChildStack>> = const { std::cell::RefCell::new(None) };
    }

    /// The environment for a command: the host's (as it was when the first command started,
    /// borrowed, not copied), with `extra` set on top. Entries are `NAME=value`.
    pub(super) fn environment<'a>(base: &'a [(OsString, CString)], extra: &[(String, String)]) -> io::Result<Vec<Cow<'a, CStr>>> {
        let overridden = |name: &OsString| extra.iter().any(|(k, _)| name.as_os_str() == k.as_str());
        let mut env: Vec<Cow<CStr>> = base.iter().filter(|(name, _)| !overridden(name)).map(|(_, entry)| Cow::Borrowed(entry.as_c_str())).collect();
        for (i, (name, value)) in extra.iter().enumerate() {
            // A later setting of the same name wins.
            if extra[i + 1..].iter().all(|(later, _)| later != name) {
                env.push(Cow::Owned(c_string(format!("{name}={value}"))?));
            }
        }
        Ok(env)
    }

    fn c_string(text: impl Into<Vec<u8>>) -> io::Result<CString> {
        CString::new(text).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument or environment variable"))
    }

    /// A pipe whose ends are closed on exec; the end the child gets is moved to 3 or above, so
    /// that putting it in place as stdin, stdout or stderr cannot clobber another.
    fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((above_stdio(read)?, above_stdio(write)?))
    }

    /// Puts the host's end of a pipe in non-blocking mode, for the reactor.
    fn nonblocking(fd: &OwnedFd) -> io::Result<()> {
        // SAFETY: F_SETFL changes only the descriptor's status flags; a fresh pipe end has none
        // but its access mode, which F_SETFL leaves alone.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn null_terminated<S: AsRef<CStr>>(strings: &[S]) -> Vec<*const c_char> {
        strings.iter().map(|s| s.as_ref().as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
    }

    pub fn spawn(launch: &Launch) -> Result<Child, Failed> {
        use std::os::unix::ffi::OsStringExt;
        let HostEnvironment { entries: base, path } = host_environment();
        let c = |text: &str| c_string(text).map_err(Failed::Io);
        let own_path = launch.env.iter().rev().find(|(name, _)| name == "PATH").map(|(_, value)| OsStr::new(value));
        let paths: Vec<CString> = candidates(&launch.program, own_path.or(path.as_deref()))
            .into_iter()
            .map(|p| c_string(p.into_vec()))
            .collect::<io::Result<_>>()
            .map_err(Failed::Io)?;
        let mut argv = vec![c(&launch.program)?];
        for arg in &launch.args {
            argv.push(c(arg)?);
        }
        let envp = environment(base, &launch.env).map_err(Failed::Io)?;
        let (paths_p, argv_p, envp_p) = (null_terminated(&paths), null_terminated(&argv), null_terminated(&envp));

        let io = |r: io::Result<(OwnedFd, OwnedFd)>| r.map_err(Failed::Io);
        let (out_read, out_write) = io(pipe_pair())?;
        let (err_read, err_write) = io(pipe_pair())?;
        let (stdin_write, stdin_read) = if launch.stdin_piped {
            let (read, write) = io(pipe_pair())?;
            (Some(write), Some(read))
        } else {
            (None, None)
        };
        let stdin_source = match &stdin_read {
            Some(read) => read.as_raw_fd(),
            None => dev_null().map_err(Failed::Io)?.as_raw_fd(),
        };

        let mut plan = Plan {
            paths: paths_p.as_ptr(),
            argv: argv_p.as_ptr(),
            envp: envp_p.as_ptr(),
            stdio: [stdin_source, out_write.as_raw_fd(), err_write.as_raw_fd()],
            errno: 0,
        };
        let mut pidfd: c_int = -1;
        let pid = STACK.with(|stack| {
            let mut slot = stack.borrow_mut();
            let stack = match &mut *slot {
                Some(stack) => stack,
                empty => empty.insert(ChildStack::new()?),
            };
            let mut args = CloneArgs {
                flags: CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_CLEAR_SIGHAND,
                pidfd: &mut pidfd as *mut c_int as u64,
                exit_signal: libc::SIGCHLD as u64,
                stack: stack.mapping as u64 + stack.guard as u64,
                stack_size: STACK_BYTES as u64,
                ..CloneArgs::default()
            };
            // SAFETY: the child runs `child_main` on its own stack, reads only `plan` and what
            // it points to (alive here until the call returns, which is after the child's exec
            // or exit, CLONE_VFORK), and never returns.
            Ok(unsafe { clone3(&mut args, child_main, &mut plan as *mut Plan as *mut c_void) })
        })
        .map_err(Failed::Io)?;
        if pid < 0 {
            let errno = (-pid) as i32;
            return Err(match errno {
                libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG => {
                    tracing::debug!("clone3 refused ({}): commands start with posix_spawn", io::Error::from_raw_os_error(errno));
                    REFUSED.store(true, Ordering::Relaxed);
                    Failed::Refused
                }
                _ => Failed::Io(io::Error::from_raw_os_error(errno)),
            });
        }
        let pid = pid as i32;
        // SAFETY: the kernel wrote a new pidfd, which we now own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        drop((out_write, err_write, stdin_read));
        if plan.errno != 0 {
            // The child has exited (127) without exec'ing: reap it, report why.
            let mut status = 0;
            // SAFETY: waitpid writes only `status`; the child has already exited.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Err(Failed::Io(io::Error::from_raw_os_error(plan.errno)));
        }
        let watched = (|| {
            tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
            // SAFETY: the OwnedFd keeps the pidfd open, the same descriptor, while registered.
            let exit = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }?;
            let receiver = |fd: OwnedFd| nonblocking(&fd).and_then(|()| pipe::Receiver::from_owned_fd_unchecked(fd));
            let (stdout, stderr) = (receiver(out_read)?, receiver(err_read)?);
            let stdin = stdin_write.map(|fd| nonblocking(&fd).and_then(|()| pipe::Sender::from_owned_fd_unchecked(fd))).transpose()?;
            Ok::<_, io::Error>((exit, stdin, stdout, stderr))
        })();
        match watched {
            Ok((exit, stdin, stdout, stderr)) => Ok(Child {
                pid,
                stdin,
                stdout: Some(stdout),
                stderr: Some(stderr),
                exit: Exit::Pidfd { fd: Some(exit), status: None },
            }),
            Err(e) => {
                // Not watchable (no runtime, say): it must not run unwatched.
                // SAFETY: kill and waitpid on our own unreaped child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                Err(Failed::Io(e))
            }
        }
    }

    /// The child, between clone and exec. It runs on its own stack in the host's memory with
    /// every signal handler cleared (by the kernel), so it uses nothing but system calls and
    /// what `plan` holds, and ends in exec or `_exit`.
    unsafe extern "C" fn child_main(plan: *mut c_void) -> ! {
        // SAFETY (whole body): `plan` is the parent's Plan, alive until exec or exit.
        unsafe {
            let plan = &mut *(plan as *mut Plan);
            let fail = |plan: &mut Plan| -> ! {
                plan.errno = *libc::__errno_location();
                libc::_exit(127)
            };
            if libc::setpgid(0, 0) != 0 {
                fail(plan);
            }
            for target in 0..3 {
                if libc::dup2(plan.stdio[target as usize], target) < 0 {
                    fail(plan);
                }
            }
            // The host ignores SIGPIPE (Rust's runtime does); the command gets the default.
            // Other ignored signals (SIGTTIN, SIGTTOU; SIGHUP under nohup) stay ignored.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // As execvp: a permission refused is remembered while later entries are tried;
            // "not there" moves on; anything else ends the search.
            let mut denied = false;
            let mut path = plan.paths;
            while !(*path).is_null() {
                libc::execve(*path, plan.argv, plan.envp);
                match *libc::__errno_location() {
                    libc::EACCES => denied = true,
                    libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                    _ => fail(plan),
                }
                path = path.add(1);
            }
            plan.errno = if denied { libc::EACCES } else { libc::ENOENT };
            libc::_exit(127)
        }
    }

    /// `clone3(args)`; in the child, calls `entry(data)` on the stack `args` gives.
    /// Returns the child's pid, or minus the error number.
    unsafe fn clone3(args: &mut CloneArgs, entry: unsafe extern "C" fn(*mut c_void) -> !, data: *mut c_void) -> isize {
        let ret: isize;
        // SAFETY: the caller's. The child starts on the new stack (16-byte aligned top, so
        // aligned as the ABI wants after `call` pushes the return address), clears the frame
        // pointer and never comes back to Rust code of the parent's frames.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r12",
                "call r13",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 as isize => ret,
                in("rdi") args as *mut CloneArgs,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") data,
                in("r13") entry,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Feeds `input` to the started process, and returns its exit status and stdout.
    async fn output(started: io::Result<Child>, input: &[u8]) -> (ExitStatus, String) {
        let mut child = started.expect("starting the process");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input).await.unwrap();
        }
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
        (child.wait().await.unwrap(), out)
    }

    fn launch(program: &str, args: &[&str], env: &[(&str, &str)], stdin_piped: bool) -> Launch {
        Launch {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            stdin_piped,
        }
    }

    /// What a command's /proc/self/status says of how it was started: in a process group of
    /// its own, signals blocked, and ignored; then the rest of its output.
    fn start_of(status: &str) -> (bool, u64, u64, String) {
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name} in {status}"));
            line[name.len() + 1..].trim().to_string()
        };
        let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        let rest = status.lines().skip_while(|l| !l.starts_with("nonvoluntary_ctxt_switches")).skip(1).collect::<Vec<_>>().join("\n");
        (field("NSpgid") == field("Pid"), mask("SigBlk"), mask("SigIgn"), rest)
    }

    #[tokio::test]
    async fn both_ways_of_starting_a_process_start_it_alike() {
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        let mut seen = Vec::new();
        for start in [spawn, spawn_with_tokio] {
            let argv = output(start(&launch("printf", &["%s|", "a b", "", "c"], &[], false)), b"").await;
            assert_eq!((argv.0.code(), argv.1.as_str()), (Some(0), "a b||c|"));
            let env = output(start(&launch("env", &[], &[("EXECHOST_A", "1"), ("EXECHOST_A", "2 3")], false)), b"").await;
            assert!(env.1.lines().any(|l| l == "EXECHOST_A=2 3"), "{}", env.1);
            assert_eq!(env.1.lines().find(|l| l.starts_with("PATH=")), Some(format!("PATH={}", std::env::var("PATH").unwrap()).as_str()));
            let status = output(start(&launch("cat", &["/proc/self/status", "-"], &[], true)), b"from stdin").await;
            let (own_group, blocked, ignored, rest) = start_of(&status.1);
            assert!(own_group, "{}", status.1);
            assert_eq!((blocked, ignored & sigpipe, rest.as_str()), (0, 0, "from stdin"));
            let failed = output(start(&launch("cat", &["/exechost/nothing/here"], &[], false)), b"").await;
            assert_eq!(failed.0.code(), Some(1));
            // The standard signals: posix_spawn also leaves the C library's own realtime
            // signals (32, 33) ignored in the child, which clone3 leaves as the host has them.
            seen.push((argv, env.0, ignored & 0x7fff_ffff));
        }
        assert_eq!(seen[0], seen[1], "the ignored signals too are the same both ways");
    }

    /// The state letter of process `pid` (`Z` for a zombie), or `None` once it is reaped.
    fn process_state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
    }

    #[tokio::test]
    async fn a_child_dropped_while_running_is_killed_and_reaped() {
        for start in [spawn, spawn_with_tokio] {
            let child = start(&launch("sleep", &["30"], &[], false)).unwrap();
            let pid = child.id();
            assert!(matches!(process_state(pid), Some(state) if state != 'Z'), "running before the drop");
            drop(child);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while process_state(pid).is_some() && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(process_state(pid), None, "killed and reaped, not left a zombie");
        }
    }

    #[tokio::test]
    async fn a_program_that_is_missing_or_not_executable_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("tool");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        for start in [spawn, spawn_with_tokio] {
            let not_executable = start(&launch(script.to_str().unwrap(), &[], &[], false)).err().unwrap();
            assert_eq!(not_executable.kind(), io::ErrorKind::PermissionDenied);
            let missing = start(&launch("exechost-no-such-program", &[], &[], false)).err().unwrap();
            assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        }
    }

    #[test]
    fn a_name_is_looked_up_in_each_path_entry_and_an_empty_entry_is_the_current_directory() {
        let path = OsStr::new("/usr/local/bin::/bin/");
        assert_eq!(candidates("tool", Some(path)), ["/usr/local/bin/tool", "tool", "/bin/tool"].map(OsString::from));
        assert_eq!(candidates("tool", None), ["/bin/tool", "/usr/bin/tool"].map(OsString::from));
        assert_eq!(candidates("./bin/tool", Some(path)), [OsString::from("./bin/tool")]);
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn settings_replace_the_hosts_variables_and_the_last_of_a_name_wins() {
        use std::borrow::Cow;
        let base = [("HOME", "/root"), ("LANG", "C")].map(|(k, v)| (OsString::from(k), CString::new(format!("{k}={v}")).unwrap()));
        let extra = [("LANG", "fr"), ("X", "1"), ("X", "2")].map(|(k, v)| (k.to_string(), v.to_string()));
        let env: Vec<CString> = clone::environment(&base, &extra).unwrap().into_iter().map(Cow::into_owned).collect();
        assert_eq!(env, ["HOME=/root", "LANG=fr", "X=2"].map(|e| CString::new(e).unwrap()));
    }
}
