//! Dispatch benchmarks through the release `host` binary:
//! - fan-out of 64 services whose command sleeps 1 s: wall time (median of five runs) and peak RSS;
//! - `host batch` of 5,000 jobs running `/bin/true` at --jobs 16, against `xargs -P16` and a
//!   bare tokio loop that spawns the same command with captured output at the same
//!   concurrency; each runner's CPU time per job: its own, its commands' and both;
//! - with `-- --million`: peak RSS of a 1,000,000-line batch (jobs that fail fast: the command
//!   is not installed, so nothing is spawned and the run takes minutes, not hours).
//!
//! Run: `cargo bench -p host --bench dispatch` (add `-- --million` for the large batch).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST: &str = env!("CARGO_BIN_EXE_host");

struct Measured {
    wall: Duration,
    max_rss_kib: i64,
    /// CPU time of the process and the children it waited for.
    cpu: Duration,
    /// CPU time of the process alone (all its threads).
    own_cpu: Duration,
    stderr: String,
}

/// User plus system time in `usage`.
fn cpu(usage: &libc::rusage) -> Duration {
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time of this process (`RUSAGE_SELF`) or of its children that have been waited for
/// (`RUSAGE_CHILDREN`).
fn rusage_cpu(who: i32) -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    cpu(&usage)
}

/// User plus system time of the exited, not yet reaped process `pid` alone: fields 14 and 15
/// of its /proc stat (its children's are fields 16 and 17).
fn exited_own_cpu(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the exited process's stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
    let ticks = |i: usize| fields[i - 3].parse::<u64>().expect("stat field");
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros((ticks(14) + ticks(15)) * 1_000_000 / hz)
}

/// Runs a command to its end; wall time, peak RSS and CPU time (wait4: the process and its
/// children; /proc before reaping: the process alone).
#[expect(clippy::zombie_processes, reason = "wait4 reaps the child, for its resource usage")]
fn measure(cmd: &mut Command) -> Measured {
    let started = Instant::now();
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let pid = child.id() as i32;
    // SAFETY: waitid with WNOWAIT waits for our own child to exit and leaves it unreaped, so
    // its /proc entry is still there; wait4 then reaps it and fills the zeroed rusage.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
    let wall = started.elapsed();
    let own_cpu = exited_own_cpu(pid);
    let (mut status, mut usage): (i32, libc::rusage) = (0, unsafe { std::mem::zeroed() });
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    Measured { wall, max_rss_kib: usage.ru_maxrss, cpu: cpu(&usage), own_cpu, stderr: reader.join().unwrap() }
}

fn host_command(dir: &Path) -> Command {
    let mut cmd = Command::new(HOST);
    cmd.env("XDG_CACHE_HOME", dir.join("cache"))
        .arg("--config")
        .arg(dir.join("services.toml"))
        .arg("--state")
        .arg(dir.join("state.db"));
    cmd
}

fn fan_out(dir: &Path) {
    let mut config = String::new();
    for i in 0..64 {
        config += &format!("[services.s{i:02}]\nplugin = \"template\"\ncommand = \"sleep\"\nsettings = {{ args = [\"1\"], stdin = \"prompt\" }}\n\n");
    }
    std::fs::write(dir.join("services.toml"), config).unwrap();
    measure(host_command(dir).args(["run", "s00", "warm-up"]));
    // Single runs vary with what else the machine does: the median of ROUNDS, and the range.
    let runs: Vec<Measured> = (0..ROUNDS).map(|_| measure(host_command(dir).args(["run", "all", "--json", "x"]))).collect();
    let walls: Vec<f64> = runs.iter().map(|m| m.wall.as_secs_f64()).collect();
    let (wall, fastest, slowest) = (median_f(&walls), walls.iter().copied().fold(f64::INFINITY, f64::min), walls.iter().copied().fold(0.0, f64::max));
    println!(
        "fan-out of 64 services sleeping 1 s: {wall:.3} s wall ({:.1}% over 1 s; median of {ROUNDS}, {fastest:.3}-{slowest:.3} s), peak RSS {:.1} MiB",
        (wall - 1.0) * 100.0,
        runs.iter().map(|m| m.max_rss_kib).max().unwrap_or(0) as f64 / 1024.0
    );
}

/// Writes `config` as the services.toml in `dir` and a jobs file `name` of `count` lines;
/// returns the jobs file's path.
fn batch_setup(dir: &Path, config: &str, name: &str, count: usize, line: impl Fn(usize) -> String) -> PathBuf {
    std::fs::write(dir.join("services.toml"), config).unwrap();
    let jobs = dir.join(name);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&jobs).unwrap());
    for i in 0..count {
        writeln!(file, "{}", line(i)).unwrap();
    }
    file.flush().unwrap();
    jobs
}

fn batch_vs_xargs(dir: &Path) {
    const JOBS: usize = 5_000;
    let jobs = batch_setup(
        dir,
        "[services.true]\nplugin = \"template\"\ncommand = \"/bin/true\"\nsettings = { args = [\"{prompt}\"] }\n",
        "jobs.jsonl",
        JOBS,
        |i| format!(r#"{{"id": {i}, "service": "true", "prompt": "job {i}"}}"#),
    );
    measure(host_command(dir).args(["run", "true", "warm-up"]));

    let numbers = dir.join("numbers.txt");
    std::fs::write(&numbers, (1..=JOBS).map(|i| format!("{i}\n")).collect::<String>()).unwrap();

    // Interleaved rounds; the medians are compared (single runs vary by ~10% here).
    let results = dir.join("results.jsonl");
    let (mut host, mut xargs, mut bare, mut rss) = (Rounds::default(), Rounds::default(), Rounds::default(), 0);
    for _ in 0..ROUNDS {
        let _ = std::fs::remove_file(&results);
        let h = measure(host_command(dir).arg("batch").arg(&jobs).arg("-o").arg(&results).args(["--jobs", "16"]));
        let written = std::fs::read_to_string(&results).unwrap().lines().count();
        assert_eq!(written, JOBS, "{}", h.stderr);
        host.push(h.wall, h.own_cpu, h.cpu, JOBS);
        rss = rss.max(h.max_rss_kib);

        let x = measure(Command::new("xargs").args(["-P16", "-n1", "/bin/true"]).stdin(std::fs::File::open(&numbers).unwrap()));
        xargs.push(x.wall, x.own_cpu, x.cpu, JOBS);

        let (own_before, children_before) = (rusage_cpu(libc::RUSAGE_SELF), rusage_cpu(libc::RUSAGE_CHILDREN));
        let wall = bare_tokio_loop(JOBS, 16);
        let own = rusage_cpu(libc::RUSAGE_SELF) - own_before;
        bare.push(wall, own, own + (rusage_cpu(libc::RUSAGE_CHILDREN) - children_before), JOBS);
    }
    println!("batch of {JOBS} jobs running /bin/true, 16 at a time (median of {ROUNDS} interleaved rounds;");
    println!("CPU per job: the runner's own, its commands', both: on a machine with few cores the batch is");
    println!("CPU-bound, and jobs per second are the CPUs kept busy over the CPU per job):");
    let (h, x, b) = (host.report("host batch", JOBS), xargs.report("xargs -P16", JOBS), bare.report("bare tokio loop", JOBS));
    println!("  host batch peak RSS {:.1} MiB", rss as f64 / 1024.0);
    println!("  host / xargs = {:.2}x, host / bare tokio = {:.2}x, bare tokio / xargs = {:.2}x", h / x, h / b, b / x);
    println!(
        "  in CPU per job with the commands': xargs / host = {:.2}x, bare tokio / host = {:.2}x",
        xargs.median_all() / host.median_all(),
        bare.median_all() / host.median_all()
    );
}

/// One runner's measurements over the rounds: wall time, its own CPU per job and its CPU
/// per job with its commands'.
#[derive(Default)]
struct Rounds {
    walls: Vec<Duration>,
    own: Vec<f64>,
    all: Vec<f64>,
}

impl Rounds {
    fn push(&mut self, wall: Duration, own: Duration, all: Duration, jobs: usize) {
        let per_job = |d: Duration| d.as_secs_f64() * 1e6 / jobs as f64;
        self.walls.push(wall);
        self.own.push(per_job(own));
        self.all.push(per_job(all));
    }

    fn median_all(&self) -> f64 {
        median_f(&self.all)
    }

    /// Prints the medians; returns the median jobs per second.
    fn report(&self, name: &str, jobs: usize) -> f64 {
        let wall = median_f(&self.walls.iter().map(Duration::as_secs_f64).collect::<Vec<_>>());
        let rate = jobs as f64 / wall;
        let (own, all) = (median_f(&self.own), self.median_all());
        println!(
            "  {name:<17} {rate:>7.0} jobs/s ({wall:.2} s), CPU per job: own {own:.0} us, commands' {:.0} us, both {all:.0} us; {:.2} CPUs busy",
            all - own,
            all * rate / 1e6
        );
        rate
    }
}

const ROUNDS: usize = 5;

fn median_f(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The floor: spawn the same command with captured output, `concurrency` at a time.
fn bare_tokio_loop(jobs: usize, concurrency: usize) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(jobs);
        for i in 0..jobs {
            let permit = permits.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let out = tokio::process::Command::new("/bin/true")
                    .arg(format!("job {i}"))
                    .stdin(Stdio::null())
                    .output()
                    .await
                    .unwrap();
                drop(permit);
                out.status.success()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        started.elapsed()
    })
}

fn million(dir: &Path) {
    const JOBS: usize = 1_000_000;
    let jobs = batch_setup(
        dir,
        "[services.absent]\nplugin = \"template\"\ncommand = \"exechost-bench-absent\"\nretry = { max_attempts = 1 }\nbreaker = { enabled = false }\n",
        "million.jsonl",
        JOBS,
        |i| format!(r#"{{"id": {i}, "service": "absent", "prompt": "job number {i} with a prompt of some length"}}"#),
    );
    let results = dir.join("million-results.jsonl");
    let m = measure(host_command(dir).arg("batch").arg(&jobs).arg("-o").arg(&results).args(["--jobs", "16"]));
    let written = std::fs::read_to_string(&results).unwrap().lines().count();
    println!(
        "batch of {JOBS} lines (command not installed): {:.0} s, {written} results, peak RSS {:.1} MiB",
        m.wall.as_secs_f64(),
        m.max_rss_kib as f64 / 1024.0
    );
}

fn main() {
    let dir: PathBuf = std::env::temp_dir().join(format!("exechost-dispatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    fan_out(&dir);
    let _ = std::fs::remove_file(dir.join("state.db"));
    batch_vs_xargs(&dir);
    if std::env::args().any(|a| a == "--million") {
        million(&dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
