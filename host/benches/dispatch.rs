//! Dispatch benchmarks through the release `host` binary:
//! - fan-out of 64 services whose command sleeps 1 s: wall time and peak RSS;
//! - `host batch` of 5,000 jobs running `/bin/true` at --jobs 16, against `xargs -P16` and a
//!   bare tokio loop that spawns the same command with captured output at the same
//!   concurrency; the host's and the bare loop's own CPU time per job, and each runner's CPU
//!   time per job together with the commands it ran;
//! - with `-- --million`: peak RSS of a 1,000,000-line batch (jobs that fail fast: the command
//!   is not installed, so nothing is spawned and the run takes minutes, not hours).
//!
//! Run: `cargo bench -p host --bench dispatch` (add `-- --million` for the large batch).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exechost::cli::own_cpu_time;

const HOST: &str = env!("CARGO_BIN_EXE_host");

struct Measured {
    wall: Duration,
    max_rss_kib: i64,
    /// CPU time of the process and the children it waited for.
    cpu: Duration,
    stderr: String,
}

/// User plus system time in `usage`.
fn cpu(usage: &libc::rusage) -> Duration {
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time of this process's children that have been waited for.
fn children_cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    cpu(&usage)
}

/// Runs a command to its end; wall time, peak RSS and CPU time (wait4: the process and its
/// children).
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
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    Measured { wall: started.elapsed(), max_rss_kib: usage.ru_maxrss, cpu: cpu(&usage), stderr: reader.join().unwrap() }
}

fn host(dir: &Path) -> Command {
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
    measure(host(dir).args(["run", "s00", "warm-up"]));
    let m = measure(host(dir).args(["run", "all", "--json", "x"]));
    println!(
        "fan-out of 64 services sleeping 1 s: {:.3} s wall ({:.1}% over 1 s), peak RSS {:.1} MiB",
        m.wall.as_secs_f64(),
        (m.wall.as_secs_f64() - 1.0) * 100.0,
        m.max_rss_kib as f64 / 1024.0
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
    measure(host(dir).args(["run", "true", "warm-up"]));

    // Interleaved rounds; the medians are compared (single runs vary by ~10% here).
    let results = dir.join("results.jsonl");
    let (mut hosts, mut xargs, mut bares, mut host_cpu, mut bare_cpu, mut rss) = (vec![], vec![], vec![], vec![], vec![], 0);
    // CPU per job of the runner and the commands together: on a machine with few cores the
    // batch is CPU-bound, and jobs per second follow this total.
    let (mut host_all, mut xargs_all, mut bare_all) = (vec![], vec![], vec![]);
    let per_job = |d: Duration| d.as_secs_f64() * 1e6 / JOBS as f64;
    for _ in 0..ROUNDS {
        let _ = std::fs::remove_file(&results);
        let h = measure(host(dir).args(["-v", "batch"]).arg(&jobs).arg("-o").arg(&results).args(["--jobs", "16"]));
        let written = std::fs::read_to_string(&results).unwrap().lines().count();
        assert_eq!(written, JOBS, "{}", h.stderr);
        let cpu_us = h
            .stderr
            .lines()
            .find_map(|l| l.split("CPU ").nth(1)?.split(" ms").next()?.trim().parse::<f64>().ok())
            .expect("the host reports its CPU time with -v");
        host_cpu.push(cpu_us * 1e3 / JOBS as f64);
        hosts.push(h.wall);
        host_all.push(per_job(h.cpu));
        rss = rss.max(h.max_rss_kib);

        let x = measure(Command::new("sh").args(["-c", &format!("seq {JOBS} | xargs -P16 -n1 /bin/true")]));
        xargs.push(x.wall);
        xargs_all.push(per_job(x.cpu));

        let (own_before, children_before) = (own_cpu_time(), children_cpu_time());
        bares.push(bare_tokio_loop(JOBS, 16));
        let own = own_cpu_time() - own_before;
        bare_cpu.push(per_job(own));
        bare_all.push(per_job(own + (children_cpu_time() - children_before)));
    }
    let (h, x, b) = (median(&mut hosts), median(&mut xargs), median(&mut bares));
    let rate = |d: Duration| JOBS as f64 / d.as_secs_f64();
    println!("batch of {JOBS} jobs running /bin/true, 16 at a time (median of {ROUNDS} interleaved rounds):");
    let (host_all, xargs_all, bare_all) = (median_f(&mut host_all), median_f(&mut xargs_all), median_f(&mut bare_all));
    println!("  host batch        {:>7.0} jobs/s ({:.2} s), its own CPU {:.0} us per job, {host_all:.0} us with the commands', peak RSS {:.1} MiB", rate(h), h.as_secs_f64(), median_f(&mut host_cpu), rss as f64 / 1024.0);
    println!("  xargs -P16        {:>7.0} jobs/s ({:.2} s), {xargs_all:.0} us CPU per job with the commands'", rate(x), x.as_secs_f64());
    println!("  bare tokio loop   {:>7.0} jobs/s ({:.2} s), its own CPU {:.0} us per job, {bare_all:.0} us with the commands'", rate(b), b.as_secs_f64(), median_f(&mut bare_cpu));
    println!("  host / xargs = {:.2}x, host / bare tokio = {:.2}x, bare tokio / xargs = {:.2}x", rate(h) / rate(x), rate(h) / rate(b), rate(b) / rate(x));
    println!("  bare tokio / host in CPU per job with the commands' = {:.2}x (what host / bare tokio follows)", bare_all / host_all);
}

const ROUNDS: usize = 5;

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn median_f(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
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
    let m = measure(host(dir).arg("batch").arg(&jobs).arg("-o").arg(&results).args(["--jobs", "16"]));
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
