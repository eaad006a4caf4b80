//! The plugin runtime: loads WebAssembly components (with an on-disk compile cache) and
//! calls them in a fresh, sandboxed, resource-limited instance per call.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::{
    Component, ComponentExportIndex, ComponentNamedList, Instance, InstancePre, Lift, Linker, Lower, ResourceTable, TypedFunc,
};
use tokio::sync::Semaphore;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::PluginSource;

/// Host-side bindings generated from wit/, the public contract.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "service-plugin",
    });
}

pub use bindings::exechost::service::types as wit;
use bindings::ServicePlugin;

/// The contract package and the versions of it this host accepts (semver-compatible 0.1.x).
const CONTRACT: &str = "exechost:service/plugin";
const CONTRACT_COMPATIBLE: &str = "0.1.";
pub const CONTRACT_VERSION: &str = "0.1.0";

/// How often the epoch ticks; plugin CPU deadlines are counted in ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Plugin calls that may be in progress at once in one process; more wait for a free slot.
/// Calls run on the async thread and most end within microseconds; only calls that compute
/// for longer than an epoch tick (and yield) are in progress together.
const PLUGIN_SLOTS: usize = 16;

/// However a call spends its time (computing, or blocked in a WASI call such as a sleep),
/// it ends after this many times its CPU limit in wall time.
const WALL_LIMIT_FACTOR: u32 = 10;

/// How much of a plugin's stderr is kept per call (for the log and for trap messages).
const PLUGIN_STDERR_CAP: usize = 64 * 1024;

/// Components embedded in the binary, by built-in name, with their SHA-256 (hex) computed
/// when they were built.
fn builtin(name: &str) -> Option<(&'static [u8], &'static str)> {
    macro_rules! embedded {
        ($stem:literal) => {
            (
                &include_bytes!(concat!(env!("EXECHOST_PLUGIN_DIR"), "/", $stem, ".wasm"))[..],
                include_str!(concat!(env!("EXECHOST_PLUGIN_DIR"), "/", $stem, ".sha256")),
            )
        };
    }
    match name {
        "template" => Some(embedded!("template_plugin")),
        "gemini" => Some(embedded!("gemini_plugin")),
        "qwen" => Some(embedded!("qwen_plugin")),
        "claude" => Some(embedded!("claude_plugin")),
        "codex" => Some(embedded!("codex_plugin")),
        "llm" => Some(embedded!("llm_plugin")),
        _ => None,
    }
}

/// Per-call resource limits of a plugin instance.
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// Linear memory an instance may grow to, in bytes.
    pub memory: u64,
    /// CPU time one call may compute (counted in epoch ticks); it also ends after
    /// `WALL_LIMIT_FACTOR` times this in wall time, whatever it does.
    pub time: Duration,
}

/// One process's plugin runtime: a single engine, its linker and compile cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    cache_dir: Option<PathBuf>,
    /// One permit per instance the pool holds: a call waits for an instance rather than
    /// failing for want of one.
    slots: Arc<Semaphore>,
    prepared: std::sync::Mutex<std::collections::HashMap<PluginSource, Arc<Prepared>>>,
}

/// Store state of one call: a WASI context that grants nothing, the limiter, and the CPU
/// time left, in epoch ticks.
struct State {
    /// Made on the plugin's first WASI call (with the pipe that keeps its stderr): most
    /// calls make none, and building one (random generators, stdio) is a measurable part of
    /// a small call's cost.
    wasi: Option<(WasiCtx, MemoryOutputPipe)>,
    table: ResourceTable,
    limiter: Limiter,
    ticks_left: u64,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let (ctx, _) = self.wasi.get_or_insert_with(|| {
            let stderr = MemoryOutputPipe::new(PLUGIN_STDERR_CAP);
            (wasmtime_wasi::WasiCtxBuilder::new().stderr(stderr.clone()).build(), stderr)
        });
        WasiCtxView { ctx, table: &mut self.table }
    }
}

impl bindings::exechost::service::types::Host for State {}

/// Caps linear memory and remembers whether the cap was hit, for a clear error.
struct Limiter {
    max_memory: usize,
    memory_denied: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired <= self.max_memory;
        self.memory_denied |= !ok;
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl Runtime {
    /// Creates the engine. `max_memory` is the largest memory any plugin may use (it sizes the
    /// instance pool); `cache_dir` holds compiled components (`None` disables the cache).
    pub fn new(max_memory: u64, cache_dir: Option<PathBuf>) -> Result<Runtime> {
        let mut pool = PoolingAllocationConfig::new();
        // Sized for PLUGIN_SLOTS concurrent calls: the pool is set up at every start, and a
        // larger one costs start-up time for nothing.
        pool.total_component_instances(PLUGIN_SLOTS as u32)
            .total_core_instances(4 * PLUGIN_SLOTS as u32)
            .total_memories(PLUGIN_SLOTS as u32)
            .total_tables(2 * PLUGIN_SLOTS as u32)
            .total_stacks(PLUGIN_SLOTS as u32)
            .max_memory_size(usize::try_from(max_memory.max(1 << 20)).unwrap_or(usize::MAX))
            .linear_memory_keep_resident(4 << 20)
            .table_keep_resident(64 << 10)
            // Between calls, only the pages a call touched are reset (where the kernel can
            // tell which: Linux 6.7 and later), not the whole of a memory: a small plugin's
            // call touches a few pages of the 192 KiB it starts with.
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = any(Engine::new(&config)).context("creating the WebAssembly engine")?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .context("starting the plugin deadline thread")?;
        let mut linker = Linker::new(&engine);
        any(wasmtime_wasi::p2::add_to_linker_async(&mut linker)).context("linking WASI")?;
        any(ServicePlugin::add_to_linker::<State, wasmtime::component::HasSelf<State>>(&mut linker, |s| s))
            .context("linking the plugin contract")?;
        let slots = Arc::new(Semaphore::new(PLUGIN_SLOTS));
        Ok(Runtime { engine, linker, cache_dir, slots, prepared: Default::default() })
    }

    /// The default compile cache: `$XDG_CACHE_HOME/exechost/plugins`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        crate::dirs::cache_home().map(|d| d.join("exechost").join("plugins"))
    }

    /// Loads a plugin: compiles it (or takes it from the cache), checks that it targets the
    /// contract, and prepares it for instantiation.
    pub fn load(&self, source: &PluginSource, limits: PluginLimits) -> Result<Plugin> {
        // Services sharing a plugin share its compiled, linked form; only limits differ.
        let mut prepared = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        let prepared = match prepared.get(source) {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(self.prepare(source)?);
                prepared.insert(source.clone(), p.clone());
                p
            }
        };
        Ok(Plugin {
            inner: Arc::new(Loaded { prepared, source: source.clone(), limits, slots: self.slots.clone() }),
        })
    }

    fn prepare(&self, source: &PluginSource) -> Result<Prepared> {
        let (bytes, digest): (std::borrow::Cow<'static, [u8]>, String) = match source {
            PluginSource::Builtin(name) => {
                let (bytes, digest) = builtin(name).ok_or_else(|| anyhow!("no built-in plugin called `{name}`"))?;
                (bytes.into(), digest.to_string())
            }
            PluginSource::File(path) => {
                let bytes = std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?;
                let digest = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
                (bytes.into(), digest)
            }
        };
        let component = self.compile(&bytes, &digest).with_context(|| format!("loading plugin {source}"))?;
        check_contract(&self.engine, &component).with_context(|| format!("plugin {source}"))?;
        let pre = any(self.linker.instantiate_pre(&component))
            .with_context(|| format!("plugin {source} imports something this host does not provide (only WASI p2 is available)"))?;
        let not_matching = || format!("plugin {source} does not match the exechost:service@{CONTRACT_VERSION} contract");
        let interface = format!("{CONTRACT}@{CONTRACT_VERSION}");
        let component = pre.component();
        let contract = component.get_export_index(None, &interface).with_context(not_matching)?;
        let export = |name: &str| component.get_export_index(Some(&contract), name).map(Export::new).with_context(not_matching);
        Ok(Prepared {
            info: export("info")?,
            validate: export("validate")?,
            build_command: export("build-command")?,
            parse_output: export("parse-output")?,
            health_command: export("health-command")?,
            pre,
        })
    }

    /// Compiles, or deserializes what an earlier compile of the same bytes left in the cache.
    /// `digest` is the SHA-256 of `bytes`, the cache key's part for the component.
    fn compile(&self, bytes: &[u8], digest: &str) -> Result<Component> {
        if bytes.starts_with(b"\0asm\x01\0\0\0") {
            bail!("this is a core WebAssembly module, not a component: build it for wasm32-wasip2 (or wrap it with `wasm-tools component new`)");
        }
        if !bytes.starts_with(b"\0asm") {
            bail!("this is not a WebAssembly file");
        }
        let Some(dir) = &self.cache_dir else {
            return any(Component::new(&self.engine, bytes)).context("compiling the component");
        };
        let cached = dir.join(format!("{}.cwasm", self.cache_key(digest)));
        if cached.is_file() {
            // SAFETY: the cache holds only artifacts this host serialized itself, named by the
            // hash of their source and of the engine configuration; wasmtime checks the
            // artifact's header against this engine and refuses a mismatch.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::debug!("recompiling: cached {} unusable: {e:#}", cached.display()),
            }
        }
        let component = any(Component::new(&self.engine, bytes)).context("compiling the component")?;
        if let Err(e) = store_atomically(dir, &cached, &component) {
            tracing::warn!("could not cache the compiled plugin in {}: {e:#}", dir.display());
        }
        Ok(component)
    }

    /// The component's digest, the host's version and the engine configuration's hash.
    fn cache_key(&self, digest: &str) -> String {
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut engine_hash);
        format!("{}-{}-{:016x}", digest.trim(), env!("CARGO_PKG_VERSION"), engine_hash.finish())
    }
}

/// Converts wasmtime's error type so that context can be added to it.
fn any<T>(result: wasmtime::Result<T>) -> Result<T> {
    result.map_err(anyhow::Error::from)
}

/// Writes the serialized component to a temporary file and renames it into place, so a
/// concurrent reader never sees half a file.
fn store_atomically(dir: &Path, dest: &Path, component: &Component) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize()?;
    let tmp = dir.join(format!(".{}.{}.tmp", std::process::id(), dest.file_name().unwrap_or_default().to_string_lossy()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, dest).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Checks the component exports a compatible version of the contract interface.
fn check_contract(engine: &Engine, component: &Component) -> Result<()> {
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
    if exports.iter().any(|e| e.strip_prefix(CONTRACT).and_then(|v| v.strip_prefix('@')).is_some_and(|v| v.starts_with(CONTRACT_COMPATIBLE))) {
        return Ok(());
    }
    if let Some(other) = exports.iter().find(|e| e.starts_with(CONTRACT)) {
        bail!(
            "it targets {other}, but this host speaks {CONTRACT}@{CONTRACT_VERSION} (compatible: 0.1.x); rebuild the plugin against wit/ of this host"
        );
    }
    bail!(
        "it does not export {CONTRACT}@{CONTRACT_VERSION}: it is not a service plugin (its exports: {})",
        if exports.is_empty() { "none".to_string() } else { exports.join(", ") }
    )
}

/// A plugin compiled and linked, ready to instantiate, with its contract functions.
struct Prepared {
    pre: InstancePre<State>,
    info: Export,
    validate: Export,
    build_command: Export,
    parse_output: Export,
    health_command: Export,
}

/// A function of the contract that a plugin exports: where it is, and whether its type has
/// been checked against the host's signature for it. The check runs once per plugin (the
/// generated bindings would run it for every function at every instantiation).
struct Export {
    index: ComponentExportIndex,
    checked: AtomicBool,
}

impl Export {
    fn new(index: ComponentExportIndex) -> Export {
        Export { index, checked: AtomicBool::new(false) }
    }

    /// The function in `instance`, typed. Each `Export` must be used with one signature
    /// only (each has one caller, in [`Plugin`]'s methods), which is what makes skipping the
    /// check after the first time sound.
    fn typed<P, R>(&self, store: &mut Store<State>, instance: &Instance) -> wasmtime::Result<TypedFunc<P, R>>
    where
        P: ComponentNamedList + Lower,
        R: ComponentNamedList + Lift,
    {
        if self.checked.load(Ordering::Acquire) {
            let func = instance
                .get_func(&mut *store, self.index)
                .ok_or_else(|| wasmtime::format_err!("a contract function vanished from its plugin"))?;
            // SAFETY: the same export of the same component was typechecked as
            // `TypedFunc<P, R>` by `get_typed_func` below before `checked` was set, and
            // this `Export` is only ever used with that `P` and `R` (see above).
            return Ok(unsafe { TypedFunc::new_unchecked(func) });
        }
        let typed = instance
            .get_typed_func::<P, R>(&mut *store, self.index)
            .map_err(|e| wasmtime::format_err!("does not match the exechost:service@{CONTRACT_VERSION} contract ({e})"))?;
        self.checked.store(true, Ordering::Release);
        Ok(typed)
    }
}

struct Loaded {
    prepared: Arc<Prepared>,
    source: PluginSource,
    limits: PluginLimits,
    slots: Arc<Semaphore>,
}

/// A loaded plugin, cheap to clone; every call runs in a fresh instance.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Loaded>,
}

impl Plugin {
    /// Where the plugin came from, for messages.
    pub fn source(&self) -> &PluginSource {
        &self.inner.source
    }

    pub async fn info(&self) -> Result<wit::PluginInfo> {
        self.call("info", |p| &p.info, ()).await
    }

    pub async fn validate(&self, service: &wit::Service) -> Result<Result<(), String>> {
        self.call("validate", |p| &p.validate, (service,)).await
    }

    pub async fn build_command(&self, service: &wit::Service, request: &wit::Request) -> Result<Result<wit::Command, wit::Failure>> {
        self.call("build-command", |p| &p.build_command, (service, request)).await
    }

    pub async fn parse_output(
        &self,
        service: &wit::Service,
        request: &wit::Request,
        output: &wit::Output,
    ) -> Result<Result<wit::Response, wit::Failure>> {
        self.call("parse-output", |p| &p.parse_output, (service, request, output)).await
    }

    pub async fn health_command(&self, service: &wit::Service) -> Result<Option<wit::Command>> {
        self.call("health-command", |p| &p.health_command, (service,)).await
    }

    /// One call: waits for a free instance slot, instantiates the plugin in a fresh store
    /// (see [`Plugin::store`]), calls `export` with `params` within the wall-time limit, and
    /// explains a failure (see [`Plugin::finish`]). Each export is called with one `P` and
    /// `R` only (the methods above), as [`Export::typed`] requires.
    async fn call<P, R>(&self, function: &str, export: fn(&Prepared) -> &Export, params: P) -> Result<R>
    where
        P: ComponentNamedList + Lower + Send + Sync,
        (R,): ComponentNamedList + Lift + Send + Sync + 'static,
    {
        let inner = &*self.inner;
        let _slot = inner.slots.acquire().await.context("the plugin runtime is shutting down")?;
        let mut store = self.store();
        let run = async {
            let instance = inner.prepared.pre.instantiate_async(&mut store).await?;
            let f = export(&inner.prepared).typed::<P, (R,)>(&mut store, &instance)?;
            Ok(f.call_async(&mut store, params).await?.0)
        };
        let result = tokio::time::timeout(self.wall_limit(), run).await.ok();
        self.finish(function, &store, result)
    }

    /// A fresh store with no capabilities and the limits: its stderr is kept, and every
    /// epoch tick the plugin computes through costs a tick of its CPU time and yields to
    /// the other tasks of this thread.
    fn store(&self) -> Store<State> {
        let inner = &*self.inner;
        let limiter = Limiter { max_memory: usize::try_from(inner.limits.memory).unwrap_or(usize::MAX), memory_denied: false };
        let ticks_left = inner.limits.time.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64;
        let mut store = Store::new(inner.prepared.pre.engine(), State { wasi: None, table: ResourceTable::new(), limiter, ticks_left });
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut store| {
            let state = store.data_mut();
            if state.ticks_left == 0 {
                return Ok(UpdateDeadline::Interrupt);
            }
            state.ticks_left -= 1;
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }

    /// How long a call may take in wall time, whatever it does.
    fn wall_limit(&self) -> Duration {
        self.inner.limits.time * WALL_LIMIT_FACTOR
    }

    /// Turns a trap, an exhausted limit or a call past its wall time into an error naming
    /// the plugin, with the end of what it printed on stderr.
    fn finish<T>(&self, function: &str, store: &Store<State>, result: Option<wasmtime::Result<T>>) -> Result<T> {
        let inner = &*self.inner;
        let stderr = store.data().wasi.as_ref().map(|(_, stderr)| stderr.contents()).unwrap_or_default();
        let printed = String::from_utf8_lossy(&stderr).trim().to_string();
        if !printed.is_empty() {
            tracing::debug!(plugin = %inner.source, "plugin stderr ({function}): {printed}");
        }
        let Some(result) = result else {
            return Err(anyhow!(
                "plugin {} took longer than {:?} of wall time in {function} ({WALL_LIMIT_FACTOR} times plugin_time): it was stopped",
                inner.source,
                self.wall_limit()
            ));
        };
        result.map_err(|e| {
            let what = match e.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => format!("exceeded its CPU time limit of {:?} (plugin_time)", inner.limits.time),
                _ if store.data().limiter.memory_denied => {
                    format!("hit its memory limit of {} MiB (plugin_memory)", inner.limits.memory >> 20)
                }
                Some(trap) => format!("trapped: {trap}"),
                None => format!("failed: {e:#}"),
            };
            // The last two lines that are not hints: a Rust panic prints where, then what.
            let lines: Vec<&str> = printed.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("note:")).collect();
            let tail: String = lines[lines.len().saturating_sub(2)..].join(" ").chars().take(300).collect();
            let said = if tail.is_empty() { String::new() } else { format!(" (its stderr: {tail})") };
            anyhow!("plugin {} {what} in {function}{said}", inner.source)
        })
    }
}
