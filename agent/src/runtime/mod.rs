//! Runs WebAssembly modules as containers: one Wasmtime [`Engine`] per process, one [`Store`] per
//! container run, WASI preview 1 from `wasmtime-wasi`.
//!
//! # Why async
//! Every run is an async call on the tokio runtime (`Config::async_support`). Wasm code yields to the
//! scheduler every [`FUEL_YIELD_INTERVAL`] units of fuel, so a busy module cannot starve the agent's
//! other tasks, and WASI's blocking host calls (`poll_oneoff`, file I/O) are awaited rather than parked
//! on a thread. A hundred idle modules therefore cost a hundred small fiber stacks, not a hundred OS
//! threads, and stopping a container is dropping its future. The synchronous WASI bindings would
//! instead block (and, inside a tokio worker, panic on their own nested runtime).
//!
//! The runtime knows nothing of pods or the API: it takes a [`RunSpec`] and returns a [`RunReport`].

mod limits;
pub mod logs;
pub mod mqtt_api;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store, Trap};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::store::ModuleDigest;
use limits::{ContainerLimits, MemoryLimitExceeded};
use logs::OutputSink;

/// Fuel between cooperative yields to tokio: about 100 µs of wasm on a Raspberry Pi 4.
pub const FUEL_YIELD_INTERVAL: u64 = 100_000;
/// Epoch ticks that stand for "never" (about 1.4 billion years of ticks).
const NO_DEADLINE: u64 = u64::MAX / 2;
/// Granularity of wall-clock deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(100);

/// The Wasmtime version compiled in, reported as the node's container runtime version.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Errors setting up the runtime itself (not a container's outcome).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Wasmtime refused the engine configuration (for example an unsupported CPU).
    #[error("cannot create the WebAssembly engine: {0:#}")]
    Engine(#[source] wasmtime::Error),
}

/// Why `lichen compile` could not precompile a module.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// This build of Wasmtime has no code generator for the target.
    #[error("this lichen cannot compile for {triple}: {source:#}")]
    Target {
        /// The target triple.
        triple: &'static str,
        /// What Wasmtime said.
        #[source]
        source: wasmtime::Error,
    },
    /// Wasmtime refused the engine settings for the target.
    #[error("cannot create an engine for {target:?}: {source:#}")]
    Engine {
        /// The target.
        target: CompileTarget,
        /// What Wasmtime said.
        #[source]
        source: wasmtime::Error,
    },
    /// The bytes are not a module Wasmtime accepts.
    #[error("not a valid WebAssembly module: {0:#}")]
    Invalid(#[source] wasmtime::Error),
}

/// Bytes that are not a WebAssembly module this engine accepts; the message is Wasmtime's.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct InvalidModule(#[source] pub wasmtime::Error);

/// A compiled module ready to instantiate, shared by every container that runs the same bytes.
#[derive(Clone)]
pub struct PreparedModule {
    digest: ModuleDigest,
    pre: InstancePre<ContainerCtx>,
    imports_mqtt: bool,
}

impl PreparedModule {
    /// The module's content address.
    pub fn digest(&self) -> ModuleDigest {
        self.digest
    }

    /// Whether the module imports the `lichen:mqtt` host functions (and so needs a
    /// [`mqtt_api::GuestMqtt`] to run).
    pub fn imports_mqtt(&self) -> bool {
        self.imports_mqtt
    }
}

/// A directory made visible to the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    /// Directory on the host.
    pub host: PathBuf,
    /// Path the module sees.
    pub guest: String,
    /// Whether the module may only read.
    pub read_only: bool,
}

/// Everything one run of a container needs.
pub struct RunSpec {
    /// `argv`, including `argv[0]`.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Preopened directories.
    pub preopens: Vec<Preopen>,
    /// Fuel budget for this run; `None` is unlimited.
    pub fuel: Option<u64>,
    /// Linear memory limit in bytes.
    pub memory_limit: u64,
    /// Wall-clock limit for this run.
    pub timeout: Option<Duration>,
    /// Where stdout goes.
    pub stdout: OutputSink,
    /// Where stderr goes.
    pub stderr: OutputSink,
    /// What the module reads on stdin; `None` is an empty stdin.
    pub stdin: Option<StdinFeed>,
    /// The `lichen:mqtt` connection for a module that imports it. `None` (or a denied one) makes
    /// such a module fail before it starts, saying why; modules that do not import it ignore it.
    pub mqtt: Option<mqtt_api::GuestMqtt>,
    /// Kept at the run's CPU time and memory, for /metrics and the kubelet API.
    pub meter: Option<Arc<crate::metrics::ContainerMeter>>,
}

/// A stdin fed by a channel of byte chunks (the MQTT bridge's framed messages). The module reads
/// them in order and waits while none is queued; the stream ends when every sender is gone.
/// `guard` is dropped with the run (the bridge uses it to unsubscribe).
#[derive(Clone)]
pub struct StdinFeed(Arc<Mutex<FeedState>>);

struct FeedState {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl StdinFeed {
    /// A stdin reading from `rx`, holding `guard` until the run ends.
    pub fn new(
        rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        guard: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        StdinFeed(Arc::new(Mutex::new(FeedState { rx, chunk: Vec::new(), pos: 0, _guard: guard })))
    }
}

impl wasmtime_wasi::cli::IsTerminal for StdinFeed {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdinStream for StdinFeed {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncRead for StdinFeed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let Ok(mut st) = self.0.lock() else { return Poll::Ready(Ok(())) };
        if st.pos >= st.chunk.len() {
            match st.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => {
                    st.chunk = chunk;
                    st.pos = 0;
                }
                // Every sender is gone: end of input.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.remaining().min(st.chunk.len() - st.pos);
        let pos = st.pos;
        buf.put_slice(&st.chunk[pos..pos + n]);
        st.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// How a run ended. Each maps to a distinct container status reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `_start` returned or the module called `proc_exit`.
    Exited(i32),
    /// The fuel budget ran out.
    OutOfFuel {
        /// The budget.
        fuel: u64,
    },
    /// The module tried to grow memory beyond its limit.
    MemoryLimitExceeded {
        /// The limit in bytes.
        limit: u64,
        /// The size it asked for.
        requested: u64,
    },
    /// The wall-clock limit passed.
    DeadlineExceeded {
        /// The limit.
        timeout: Duration,
    },
    /// The module trapped.
    Trap(String),
    /// The bytes are not a runnable WASI command module.
    InvalidModule(String),
    /// The agent stopped it.
    Killed,
}

impl Outcome {
    /// The exit code shown in the container status, following the container runtimes' conventions
    /// (128 + signal for kills, 128 for "cannot run").
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exited(code) => *code,
            Outcome::OutOfFuel { .. } | Outcome::MemoryLimitExceeded { .. } => 137,
            Outcome::DeadlineExceeded { .. } | Outcome::Killed => 137,
            Outcome::Trap(_) => 134,
            Outcome::InvalidModule(_) => 128,
        }
    }

    /// The container status reason, as `kubectl get pods` shows it.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Exited(0) => "Completed",
            Outcome::Exited(_) => "Error",
            Outcome::OutOfFuel { .. } => "OutOfFuel",
            Outcome::MemoryLimitExceeded { .. } => "OOMKilled",
            Outcome::DeadlineExceeded { .. } => "DeadlineExceeded",
            Outcome::Trap(_) => "Trap",
            Outcome::InvalidModule(_) => "InvalidModule",
            Outcome::Killed => "Killed",
        }
    }

    /// A human-readable explanation for the status message.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::Exited(_) | Outcome::Killed => None,
            Outcome::OutOfFuel { fuel } => Some(format!("fuel budget of {fuel} exhausted")),
            Outcome::MemoryLimitExceeded { limit, requested } => Some(format!(
                "memory limit of {limit} bytes exceeded: the module asked for {requested} bytes"
            )),
            Outcome::DeadlineExceeded { timeout } => {
                Some(format!("run time limit of {}s exceeded", timeout.as_secs_f64()))
            }
            Outcome::Trap(msg) | Outcome::InvalidModule(msg) => Some(msg.clone()),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Fuel burned.
    pub fuel_consumed: u64,
    /// Largest linear memory it had, in bytes.
    pub peak_memory: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

/// The wasm stack one container may use.
pub const WASM_STACK_BYTES: usize = 512 << 10;

/// The engine configuration every container runs under (also checked by `lichen check`).
pub fn engine_config() -> Config {
    let mut config = Config::new();
    config.consume_fuel(true).epoch_interruption(true);
    // Named rather than inherited, because it is part of what Lichen promises a board: a module
    // recursing without end traps with "call stack exhausted" at 512 KiB of wasm stack (inside
    // the 2 MiB fiber each run has), whatever a later Wasmtime's default becomes.
    config.max_wasm_stack(WASM_STACK_BYTES);
    // On 64-bit ARM, name the host target explicitly. Left implicit, Wasmtime probes the CPU (LSE
    // atomics, FP16, dot product, pointer authentication) and the engine key differs between a
    // Pi 4, a Pi 5 and QEMU, so no board would accept what `lichen compile --target aarch64` made
    // on a build machine. Named, it compiles for baseline ARMv8.0 everywhere; WASI modules without
    // threads or relaxed SIMD use none of those instructions. The name must be this build's own
    // triple (Wasmtime runs code only for the host), so a static musl build has a key of its own.
    // armv7 needs nothing here: Wasmtime defaults to Pulley (`pulley32`) where Cranelift has no
    // backend, which is what `CompileTarget::Armv7` compiles for.
    #[cfg(all(target_arch = "aarch64", target_os = "linux"))]
    {
        let host = if cfg!(target_env = "musl") {
            "aarch64-unknown-linux-musl"
        } else {
            "aarch64-unknown-linux-gnu"
        };
        // Cannot fail (the triple parses and the aarch64 backend is built in); if it did, the
        // engine would simply keep probing the CPU.
        let _ = config.target(host);
    }
    config
}

/// A key naming everything a precompiled artifact depends on: the Wasmtime version, the target and
/// every setting that changes generated code. An artifact is only ever loaded by an engine with the
/// same key, so upgrading Lichen (or changing its engine settings) recompiles instead of loading
/// stale machine code.
pub fn engine_key(engine: &Engine) -> String {
    use sha2::Digest as _;
    use std::hash::{Hash, Hasher};
    struct Sha(sha2::Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        // Lengths and enum discriminants are hashed as `usize`/`isize`: widened, so a 64-bit build
        // machine computes the key a 32-bit board (armv7) has. Same bytes as before on 64-bit.
        fn write_usize(&mut self, i: usize) {
            self.write(&(i as u64).to_le_bytes());
        }
        fn write_isize(&mut self, i: isize) {
            self.write(&(i as i64).to_le_bytes());
        }
    }
    let mut h = Sha(sha2::Sha256::new());
    WASMTIME_VERSION.hash(&mut h);
    engine.precompile_compatibility_hash().hash(&mut h);
    let digest: [u8; 32] = h.0.finalize().into();
    format!("wasmtime-{WASMTIME_VERSION}-{}", ModuleDigest(digest).hex().get(..16).unwrap_or_default())
}

/// What [`precompile`] builds for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompileTarget {
    /// This machine.
    Host,
    /// 64-bit ARM boards (Raspberry Pi 3/4/5 with a 64-bit OS): native code.
    Aarch64,
    /// 32-bit ARM boards: bytecode for Wasmtime's Pulley interpreter, as Cranelift has no 32-bit
    /// ARM backend.
    Armv7,
    /// x86-64 machines.
    X86_64,
}

impl CompileTarget {
    /// The triple Wasmtime compiles for.
    pub fn triple(self) -> Option<&'static str> {
        match self {
            CompileTarget::Host => None,
            CompileTarget::Aarch64 => Some("aarch64-unknown-linux-gnu"),
            CompileTarget::Armv7 => Some("pulley32"),
            CompileTarget::X86_64 => Some("x86_64-unknown-linux-gnu"),
        }
    }
}

/// A precompiled module for `target` and the engine key the board will need to load it, compiled
/// with exactly the settings containers run under.
pub fn precompile(target: CompileTarget, wasm: &[u8]) -> Result<(Vec<u8>, String), CompileError> {
    let mut config = engine_config();
    if let Some(triple) = target.triple() {
        config.target(triple).map_err(|source| CompileError::Target { triple, source })?;
    }
    let engine = Engine::new(&config).map_err(|source| CompileError::Engine { target, source })?;
    let module = engine.precompile_module(wasm).map_err(CompileError::Invalid)?;
    Ok((module, engine_key(&engine)))
}

/// The per-run store data.
pub struct ContainerCtx {
    wasi: WasiP1Ctx,
    limits: ContainerLimits,
    mqtt: Option<mqtt_api::GuestMqtt>,
}

/// The process's one WebAssembly engine, its WASI linker and its compiled-module cache.
pub struct WasmRuntime {
    engine: Engine,
    key: String,
    linker: Linker<ContainerCtx>,
    compiled: Mutex<HashMap<ModuleDigest, PreparedModule>>,
    ticker: EpochTicker,
}

impl WasmRuntime {
    /// Creates the engine. Call once per process, inside a tokio runtime.
    pub fn new() -> Result<Arc<Self>, RuntimeError> {
        let engine = Engine::new(&engine_config()).map_err(RuntimeError::Engine)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |cx: &mut ContainerCtx| &mut cx.wasi)
            .map_err(RuntimeError::Engine)?;
        mqtt_api::add_to_linker(&mut linker).map_err(RuntimeError::Engine)?;
        let ticker = EpochTicker::start(engine.clone());
        let key = engine_key(&engine);
        Ok(Arc::new(WasmRuntime { engine, key, linker, compiled: Mutex::new(HashMap::new()), ticker }))
    }

    /// The key precompiled artifacts for this engine are stored under.
    pub fn engine_key(&self) -> &str {
        &self.key
    }

    /// Compiles the module with this digest, returning it with its serialized artifact for the
    /// cache (`None` if it was already compiled in memory). Compilation runs on a blocking thread so
    /// the reactor keeps serving other pods.
    pub async fn prepare(
        &self,
        digest: ModuleDigest,
        bytes: Arc<[u8]>,
    ) -> Result<(PreparedModule, Option<Vec<u8>>), Outcome> {
        if let Some(m) = self.cached(&digest) {
            return Ok((m, None));
        }
        let engine = self.engine.clone();
        let (module, artifact) = tokio::task::spawn_blocking(move || {
            let compiled = Module::new(&engine, &bytes).map(|module| {
                let artifact = module.serialize().ok();
                (module, artifact)
            });
            // Cranelift's working memory for a module is many times its code, and most of it is
            // freed now; without this the allocator would keep those pages.
            crate::heap::release_free_memory();
            compiled
        })
        .await
        .map_err(|e| Outcome::InvalidModule(format!("compiler task failed: {e}")))?
        .map_err(|e| Outcome::InvalidModule(format!("not a valid WebAssembly module: {e:#}")))?;
        Ok((self.link(digest, module)?, artifact))
    }

    /// Loads a precompiled artifact that this agent's own engine produced and its cache verified
    /// against the checksum it was stored with. Never call it with bytes from anywhere else.
    pub async fn prepare_precompiled(
        &self,
        digest: ModuleDigest,
        artifact: Vec<u8>,
    ) -> Result<PreparedModule, Outcome> {
        if let Some(m) = self.cached(&digest) {
            return Ok(m);
        }
        let engine = self.engine.clone();
        let module = tokio::task::spawn_blocking(move || deserialize_trusted(&engine, &artifact))
            .await
            .map_err(|e| Outcome::InvalidModule(format!("loader task failed: {e}")))?
            .map_err(|e| Outcome::InvalidModule(format!("cannot load the precompiled module: {e:#}")))?;
        self.link(digest, module)
    }

    /// Checks that `bytes` are a WebAssembly module this engine accepts, without compiling it.
    pub fn validate(&self, bytes: &[u8]) -> Result<(), InvalidModule> {
        Module::validate(&self.engine, bytes).map_err(InvalidModule)
    }

    /// The digests of every module compiled in memory.
    pub fn compiled_digests(&self) -> Vec<ModuleDigest> {
        self.compiled.lock().map(|c| c.keys().copied().collect()).unwrap_or_default()
    }

    /// Whether the module is compiled in memory already.
    pub fn cached(&self, digest: &ModuleDigest) -> Option<PreparedModule> {
        self.compiled.lock().ok()?.get(digest).cloned()
    }

    fn link(&self, digest: ModuleDigest, module: Module) -> Result<PreparedModule, Outcome> {
        if module.get_export("_start").is_none() {
            return Err(Outcome::InvalidModule(
                "the module exports no `_start` function; Lichen runs WASI command modules".into(),
            ));
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| Outcome::InvalidModule(format!("cannot link the module: {e:#}")))?;
        let imports_mqtt = module.imports().any(|i| i.module() == mqtt_api::MODULE);
        let prepared = PreparedModule { digest, pre, imports_mqtt };
        if let Ok(mut cache) = self.compiled.lock() {
            cache.insert(digest, prepared.clone());
        }
        Ok(prepared)
    }

    /// Drops compiled modules whose digests are not in `keep`, so memory follows the running pods.
    pub fn retain_compiled(&self, keep: &std::collections::HashSet<ModuleDigest>) {
        if let Ok(mut cache) = self.compiled.lock() {
            cache.retain(|d, _| keep.contains(d));
        }
    }

    /// Runs the module's `_start` to completion, a limit, or `cancel`.
    pub async fn run(
        &self,
        module: &PreparedModule,
        mut spec: RunSpec,
        cancel: &CancellationToken,
    ) -> RunReport {
        let started = Instant::now();
        let fuel_budget = spec.fuel.unwrap_or(u64::MAX);
        let memory_limit = spec.memory_limit;
        let mqtt = spec.mqtt.take();
        if module.imports_mqtt {
            let refusal = match &mqtt {
                None => Some("MQTT is off on this node (set mqtt.broker)"),
                Some(m) => m.refusal(),
            };
            if let Some(why) = refusal {
                spec.stdout.finish();
                spec.stderr.finish();
                return RunReport {
                    outcome: Outcome::InvalidModule(format!(
                        "the module imports {}, but {why}",
                        mqtt_api::MODULE
                    )),
                    fuel_consumed: 0,
                    peak_memory: 0,
                    elapsed: started.elapsed(),
                };
            }
        }
        let mut store = match self.new_store(&spec, mqtt) {
            Ok(store) => store,
            Err(outcome) => {
                return RunReport { outcome, fuel_consumed: 0, peak_memory: 0, elapsed: started.elapsed() };
            }
        };
        let _deadline_guard = spec.timeout.map(|t| {
            store.set_epoch_deadline(ticks_for(t));
            self.ticker.acquire()
        });
        let call = async {
            let instance = module.pre.instantiate_async(&mut store).await.map_err(not_instantiable)?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        };
        let call = metered(call, spec.meter.clone());
        // The epoch deadline stops wasm code; the sleep also covers a module parked in a host call.
        let deadline = async {
            match spec.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = call => Some(r),
            _ = cancel.cancelled() => None,
            _ = deadline => Some(Err(wasmtime::Error::new(Trap::Interrupt))),
        };
        spec.stdout.finish();
        spec.stderr.finish();
        let outcome = match result {
            None => Outcome::Killed,
            Some(Ok(())) => Outcome::Exited(0),
            Some(Err(e)) => classify(e, spec.fuel, spec.timeout, memory_limit),
        };
        let fuel_left = store.get_fuel().unwrap_or(0);
        RunReport {
            outcome,
            fuel_consumed: fuel_budget.saturating_sub(fuel_left),
            peak_memory: store.data().limits.peak_memory(),
            elapsed: started.elapsed(),
        }
    }

    fn new_store(
        &self,
        spec: &RunSpec,
        mqtt: Option<mqtt_api::GuestMqtt>,
    ) -> Result<Store<ContainerCtx>, Outcome> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.args(&spec.args).envs(&spec.env).stdout(spec.stdout.clone()).stderr(spec.stderr.clone());
        if let Some(stdin) = spec.stdin.clone() {
            wasi.stdin(stdin);
        }
        for p in &spec.preopens {
            let perms = if p.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            wasi.preopened_dir(&p.host, &p.guest, perms).map_err(|e| {
                Outcome::InvalidModule(format!(
                    "cannot open volume {} for {}: {e:#}",
                    p.host.display(),
                    p.guest
                ))
            })?;
        }
        let ctx = ContainerCtx {
            wasi: wasi.build_p1(),
            limits: ContainerLimits::new(spec.memory_limit, spec.meter.clone()),
            mqtt,
        };
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|cx| &mut cx.limits);
        let internal = |e: wasmtime::Error| Outcome::InvalidModule(format!("store setup: {e:#}"));
        store.set_fuel(spec.fuel.unwrap_or(u64::MAX)).map_err(internal)?;
        store.fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL)).map_err(internal)?;
        store.epoch_deadline_trap();
        // "No deadline": Wasmtime adds this to the current epoch, so it must leave room to add.
        store.set_epoch_deadline(NO_DEADLINE);
        Ok(store)
    }
}

/// `call` with the CPU time of each of its polls added to `meter`.
///
/// The module's code runs only inside these polls: Wasmtime switches to the run's fiber on the
/// polling thread and back when the module yields (every [`FUEL_YIELD_INTERVAL`] units of fuel) or
/// waits in a host call. So the polling thread's CPU clock, read before and after each poll, counts
/// the time spent instantiating and running the module and in its synchronous host calls (writing
/// its output), and nothing of other pods or of the agent. Waiting costs nothing, as it should. Two
/// clock reads per poll are the price: system calls (no vDSO for thread CPU clocks), against
/// ~100 µs of wasm between yields on a Pi 4. Fuel is not used: it counts instructions, not time.
fn metered<F: std::future::Future>(
    call: F,
    meter: Option<Arc<crate::metrics::ContainerMeter>>,
) -> impl std::future::Future<Output = F::Output> {
    let mut call = Box::pin(call);
    std::future::poll_fn(move |cx| {
        let Some(meter) = &meter else { return call.as_mut().poll(cx) };
        let before = thread_cpu_nanos();
        let polled = call.as_mut().poll(cx);
        meter.add_cpu(thread_cpu_nanos().saturating_sub(before));
        polled
    })
}

/// CPU time the calling thread has used, nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// The one place Lichen deserializes machine code.
///
/// `Module::deserialize` is unsafe because Wasmtime cannot tell whether the bytes are machine code
/// it produced itself: loading anything else runs arbitrary native code. The callers uphold that:
/// artifacts come only from the agent's own cache, where this engine (same key: Wasmtime version,
/// target, settings) wrote them with a sha256 that the store checks before handing them out, or from
/// `lichen modules import`, which the board's administrator runs on a file they produced with
/// `lichen compile`. Wasmtime additionally checks the artifact's header against the engine.
#[allow(unsafe_code)]
fn deserialize_trusted(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Module> {
    // SAFETY: see above: the bytes are Wasmtime's own output for this engine, integrity-checked.
    unsafe { Module::deserialize(engine, artifact) }
}

fn ticks_for(t: Duration) -> u64 {
    (t.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
}

/// Instantiation refused by the container's limits (more tables or memories than allowed, a table
/// bigger than allowed) or by the linker: the module cannot run here however often it restarts.
#[derive(Debug, thiserror::Error)]
#[error("cannot instantiate the module: {0}")]
struct NotInstantiable(String);

/// Marks an instantiation failure as [`NotInstantiable`], unless it is a trap or exit of a start
/// function, or the memory limit, which keep their own outcomes.
fn not_instantiable(e: wasmtime::Error) -> wasmtime::Error {
    if e.is::<Trap>() || e.is::<I32Exit>() || e.is::<MemoryLimitExceeded>() {
        e
    } else {
        wasmtime::Error::new(NotInstantiable(format!("{e:#}")))
    }
}

fn classify(e: wasmtime::Error, fuel: Option<u64>, timeout: Option<Duration>, memory_limit: u64) -> Outcome {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return Outcome::Exited(exit.0);
    }
    if let Some(n) = e.downcast_ref::<NotInstantiable>() {
        return Outcome::InvalidModule(n.to_string());
    }
    if let Some(m) = e.downcast_ref::<MemoryLimitExceeded>() {
        return Outcome::MemoryLimitExceeded { limit: memory_limit, requested: m.requested };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Outcome::OutOfFuel { fuel: fuel.unwrap_or(u64::MAX) },
        Some(Trap::Interrupt) => Outcome::DeadlineExceeded { timeout: timeout.unwrap_or_default() },
        Some(trap) => Outcome::Trap(format!("wasm trap: {trap}")),
        // Link and instantiation failures never reach here as text: `link` refuses unknown or
        // mistyped imports before a run, and `not_instantiable` marks the rest by type. What is
        // left is a host function's error or a `_start` of the wrong type, both failures of the run.
        None => Outcome::Trap(format!("{e:#}")),
    }
}

/// Advances the engine's epoch while any run has a deadline, and sleeps otherwise, so an idle agent
/// takes no wake-ups.
struct EpochTicker {
    active: Arc<(Mutex<usize>, tokio::sync::Notify)>,
    task: tokio::task::JoinHandle<()>,
}

struct TickerGuard(Arc<(Mutex<usize>, tokio::sync::Notify)>);

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let active: Arc<(Mutex<usize>, tokio::sync::Notify)> = Arc::default();
        let shared = active.clone();
        let task = tokio::spawn(async move {
            loop {
                let users = shared.0.lock().map(|n| *n).unwrap_or(0);
                if users == 0 {
                    shared.1.notified().await;
                    continue;
                }
                tokio::time::sleep(EPOCH_TICK).await;
                engine.increment_epoch();
            }
        });
        EpochTicker { active, task }
    }

    fn acquire(&self) -> TickerGuard {
        if let Ok(mut n) = self.active.0.lock() {
            *n += 1;
        }
        self.active.1.notify_one();
        TickerGuard(self.active.clone())
    }
}

impl Drop for TickerGuard {
    fn drop(&mut self) {
        if let Ok(mut n) = self.0.0.lock() {
            *n = n.saturating_sub(1);
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.task.abort();
    }
}
