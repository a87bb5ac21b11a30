//! The blocking-pool hand-off ([`blocking`]), the test hooks' gate ([`pass_gate`]), and locks that recover from poisoning: every mutex and rwlock of the daemon guards plain data
//! that a panicking holder cannot leave half-updated (each update is one insert, remove or
//! assignment), so a panic on one request must not make every later request panic too.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};

/// Locks `mutex`, taking the data of a poisoned one as it is.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Read-locks `lock`, as [`lock`] does.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` on the blocking pool (file I/O, hashing, credential switches: never on an async
/// worker) and returns its result; a panic in `f` is INTERNAL.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| Error::Internal(format!("worker thread failed: {err}")))?
}

/// Write-locks `lock`, as [`lock`] does.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Test hook (`config::TestHooks`): waits for (and consumes) one permit when the gate is set.
pub async fn pass_gate(gate: Option<&std::sync::Arc<tokio::sync::Semaphore>>) {
    if let Some(gate) = gate
        && let Ok(permit) = gate.acquire().await
    {
        permit.forget();
    }
}
