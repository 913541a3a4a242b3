//! One filter config of the native build (a listener half or an upstream
//! half): the document, its metrics, and the root work the Wasm build does
//! in its root context — detached calls and timed housekeeping — which here
//! runs on Envoy's main thread through a config scheduler.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::config::{compile, Config};
use crate::host::{CalloutAnswer, DetachedHandler};

use super::abi;
use super::callout::OwnedCallout;
use super::metrics::Metrics;
use super::EnvoyPtr;

/// Scheduler events on the main thread.
pub const EVENT_DETACHED: u64 = 1;
pub const EVENT_TICK: u64 = 2;

/// The module's side of one filter config, shared by every worker.
pub struct NativeConfig {
    /// Envoy's config object: metrics and config-owned callouts go through it.
    pub envoy: EnvoyPtr,
    pub upstream: bool,
    document: Vec<u8>,
    pub metrics: Metrics,
    /// Runs `on_http_filter_config_scheduled` on the main thread.
    scheduler: EnvoyPtr,
    detached: Mutex<Detached>,
}

/// Detached calls: queued by workers, dispatched and answered on the main
/// thread (Envoy's config-owned callouts must start there).
#[derive(Default)]
struct Detached {
    queue: Vec<(OwnedCallout, DetachedHandler)>,
    pending: HashMap<u64, DetachedHandler>,
}

impl NativeConfig {
    /// Compiles `document` (refusing an invalid one), prepares what the
    /// listener half keeps in shared data, and defines the metrics.
    pub fn create(envoy: EnvoyPtr, name: &str, document: Vec<u8>) -> Option<Arc<NativeConfig>> {
        let upstream = name.ends_with(".upstream");
        let compiled = match compile(&document, &|var| std::env::var(var).ok()) {
            Ok(compiled) => compiled,
            Err(e) => {
                log::error!("invalid configuration: {e}");
                return None;
            }
        };
        for warning in &compiled.warnings {
            log::warn!("{warning}");
        }
        let config = compiled.config;
        log::info!(
            "configured {} providers and {} models ({})",
            config.providers.len(),
            config.models.len(),
            if upstream {
                "upstream half"
            } else {
                "listener half"
            }
        );
        let tags: Vec<String> = config.tags.iter().map(|t| t.name.clone()).collect();
        let metrics = Metrics::define(envoy, &tags);
        if !upstream {
            crate::quota::admission::prepare_buckets(&config, &mut super::shared::Store);
        }
        // SAFETY: Envoy's config pointer is live during config creation.
        let scheduler =
            unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy.0) };
        let native = Arc::new(NativeConfig {
            envoy,
            upstream,
            document,
            metrics,
            scheduler: EnvoyPtr(scheduler),
            detached: Mutex::new(Detached::default()),
        });
        remember(&native, Rc::new(config));
        if !upstream {
            *metrics_home() = Arc::downgrade(&native);
        }
        Some(native)
    }

    /// This thread's compiled copy of the config (the compiled form holds
    /// per-thread caches, as each Wasm VM's does); compiled on first use.
    pub fn compiled(self: &Arc<Self>) -> Option<Rc<Config>> {
        let found = COMPILED.with(|c| {
            c.borrow()
                .iter()
                .find(|(weak, _)| std::ptr::eq(weak.as_ptr(), Arc::as_ptr(self)))
                .map(|(_, config)| Rc::clone(config))
        });
        if found.is_some() {
            return found;
        }
        match compile(&self.document, &|var| std::env::var(var).ok()) {
            Ok(compiled) => {
                let config = Rc::new(compiled.config);
                remember(self, Rc::clone(&config));
                Some(config)
            }
            Err(e) => {
                log::error!("invalid configuration: {e}");
                None
            }
        }
    }

    fn detached(&self) -> MutexGuard<'_, Detached> {
        self.detached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a call that must outlive its request; the main thread sends it.
    pub fn queue_detached(&self, call: OwnedCallout, then: DetachedHandler) {
        self.detached().queue.push((call, then));
        self.schedule(EVENT_DETACHED);
    }

    /// Runs `on_http_filter_config_scheduled` with `event` on the main thread.
    pub fn schedule(&self, event: u64) {
        if self.scheduler.0.is_null() {
            log::warn!("no config scheduler: event {event} dropped");
            return;
        }
        // SAFETY: the scheduler lives as long as this config; commit may be
        // called from any thread.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                self.scheduler.0,
                event,
            )
        }
    }

    /// Main thread: sends every queued detached call; those that cannot
    /// leave get their failure at once.
    pub fn send_detached(self: &Arc<Self>) {
        let queued = std::mem::take(&mut self.detached().queue);
        for (call, then) in queued {
            match call.dispatch_from_config(self.envoy) {
                Ok(id) => {
                    self.detached().pending.insert(id, then);
                }
                Err(e) => then(
                    &mut super::host::NativeHost::root(self),
                    CalloutAnswer::Failed(e.0),
                ),
            }
        }
    }

    /// Main thread: the answer of detached call `id`.
    pub fn answer_detached(self: &Arc<Self>, id: u64, answer: CalloutAnswer) {
        let then = self.detached().pending.remove(&id);
        match then {
            Some(then) => then(&mut super::host::NativeHost::root(self), answer),
            None => log::warn!("an answer came for call {id}, which nobody waits for"),
        }
    }
}

impl Drop for NativeConfig {
    fn drop(&mut self) {
        if !self.scheduler.0.is_null() {
            // SAFETY: created in `create`, deleted once here.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
                    self.scheduler.0,
                )
            }
        }
    }
}

/// The listener half's config whose metrics the upstream half updates too:
/// an upstream filter's own metrics would live in its cluster's stats scope
/// (`cluster.<name>.…`), under other names than the listener half's.
static METRICS_HOME: Mutex<Weak<NativeConfig>> = Mutex::new(Weak::new());

fn metrics_home() -> MutexGuard<'static, Weak<NativeConfig>> {
    METRICS_HOME.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NativeConfig {
    /// The config whose Envoy object and metric ids carry this config's
    /// metric updates: its own for a listener half, a listener half's for
    /// an upstream half (its own while no listener half exists).
    pub fn metrics_config(self: &Arc<Self>) -> Arc<NativeConfig> {
        if self.upstream {
            if let Some(home) = metrics_home().upgrade() {
                return home;
            }
        }
        Arc::clone(self)
    }
}

thread_local! {
    /// Compiled configs of this thread, by the config they came from; an
    /// entry whose config is gone is dropped when the next one is added.
    static COMPILED: RefCell<Vec<(Weak<NativeConfig>, Rc<Config>)>> = const { RefCell::new(Vec::new()) };
}

fn remember(native: &Arc<NativeConfig>, config: Rc<Config>) {
    COMPILED.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|(weak, _)| weak.strong_count() > 0);
        c.push((Arc::downgrade(native), config));
    });
}
