//! Timed wake-ups of a filter config on the main thread (the Wasm build's
//! root tick): one sleeping thread for the process, which commits the
//! config's scheduler when a deadline passes.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::config::{NativeConfig, EVENT_TICK};

/// A wake-up: when, and for which config.
type Wake = (Instant, Weak<NativeConfig>);
static TIMER: Mutex<Option<Sender<Wake>>> = Mutex::new(None);

/// Asks for an `EVENT_TICK` of `config` in about `ms` milliseconds; nothing
/// happens if the config is gone by then.
pub fn wake(config: Weak<NativeConfig>, ms: u64) -> Result<(), String> {
    let at = Instant::now() + Duration::from_millis(ms.max(1));
    let mut timer = TIMER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(sender) = timer.as_ref() {
        if sender.send((at, config.clone())).is_ok() {
            return Ok(());
        }
    }
    let (sender, receiver) = channel::<Wake>();
    std::thread::Builder::new()
        .name("meshllm-timer".into())
        .spawn(move || {
            let mut due: Vec<Wake> = Vec::new();
            loop {
                let wait = due
                    .iter()
                    .map(|(at, _)| at.saturating_duration_since(Instant::now()))
                    .min()
                    .unwrap_or(Duration::from_secs(3600));
                match receiver.recv_timeout(wait) {
                    Ok(next) => due.push(next),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                let now = Instant::now();
                due.retain(|(at, config)| {
                    if *at > now {
                        return true;
                    }
                    if let Some(config) = config.upgrade() {
                        config.schedule(EVENT_TICK);
                    }
                    false
                });
            }
        })
        .map_err(|e| format!("could not start the timer thread: {e}"))?;
    sender
        .send((at, config))
        .map_err(|_| "the timer thread is gone".to_string())?;
    *timer = Some(sender);
    Ok(())
}
