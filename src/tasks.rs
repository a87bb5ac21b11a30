//! The daemon's background work, owned: every task it starts and does not await on a request's
//! path (registry-cache pushes, superseded-image removal, automatic prune, last-use records,
//! base freshness checks) is spawned here under a name, and the drain at shutdown waits for
//! them up to `--shutdown-timeout`; what is still running then is logged by name (and kept in
//! [`Tasks::cut_off`]), never dropped silently.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

/// A handle to the daemon's background tasks; clones share them.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    /// Running tasks by id: their names; the drain waits for it to be empty.
    running: watch::Sender<BTreeMap<u64, String>>,
    next: AtomicU64,
    /// Test hook (`TestHooks::background`): each task takes one permit before it runs.
    gate: Option<Arc<Semaphore>>,
    /// What the last drain cut off.
    cut_off: Mutex<Vec<String>>,
}

impl Tasks {
    /// No tasks yet; with `gate`, every task waits for (and consumes) one of its permits.
    pub fn new(gate: Option<Arc<Semaphore>>) -> Tasks {
        Tasks {
            inner: Arc::new(Inner {
                running: watch::channel(BTreeMap::new()).0,
                next: AtomicU64::new(0),
                gate,
                cut_off: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Runs `work` in the background under `name` (e.g. "registry-cache push of <tag>").
    pub fn spawn(&self, name: impl Into<String>, work: impl Future<Output = ()> + Send + 'static) {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let name = name.into();
        self.inner.running.send_modify(|running| {
            running.insert(id, name);
        });
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Some(gate) = &inner.gate
                && let Ok(permit) = gate.acquire().await
            {
                permit.forget();
            }
            work.await;
            inner.running.send_modify(|running| {
                running.remove(&id);
            });
        });
    }

    /// [`Tasks::spawn`] for blocking work (file I/O), run on the blocking pool.
    pub fn spawn_blocking(&self, name: impl Into<String>, work: impl FnOnce() + Send + 'static) {
        self.spawn(name, async move {
            let _ = tokio::task::spawn_blocking(work).await;
        });
    }

    /// The names of the tasks running now.
    pub fn running(&self) -> Vec<String> {
        self.inner.running.borrow().values().cloned().collect()
    }

    /// Waits up to `timeout` for every task to end; logs each one still running then by name
    /// and returns their names (also kept for [`Tasks::cut_off`]). Tasks keep running after a
    /// cut-off until the runtime stops.
    pub async fn drain(&self, timeout: Duration) -> Vec<String> {
        let mut running = self.inner.running.subscribe();
        let ended = tokio::time::timeout(timeout, running.wait_for(BTreeMap::is_empty)).await;
        let cut = if ended.is_ok() {
            Vec::new()
        } else {
            self.running()
        };
        for name in &cut {
            tracing::warn!(task = %name, "shutdown timeout passed: background task cut off");
        }
        crate::sync::lock(&self.inner.cut_off).clone_from(&cut);
        cut
    }

    /// What the last [`Tasks::drain`] cut off (empty when everything ended in time).
    pub fn cut_off(&self) -> Vec<String> {
        crate::sync::lock(&self.inner.cut_off).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gated task holds the drain until it ends, or is named as cut off at the timeout.
    #[tokio::test]
    async fn the_drain_waits_for_tasks_or_names_them() {
        let gate = Arc::new(Semaphore::new(0));
        let tasks = Tasks::new(Some(gate.clone()));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tasks.spawn("push of x", async move {
            let _ = done_tx.send(());
        });
        assert_eq!(tasks.running(), ["push of x"]);
        let cut = tasks.drain(Duration::from_millis(50)).await;
        assert_eq!(cut, ["push of x"], "held at its gate: cut off");
        assert_eq!(tasks.cut_off(), cut);
        gate.add_permits(1);
        assert!(tasks.drain(Duration::from_secs(30)).await.is_empty());
        done_rx.await.expect("the task ran to its end");
        assert!(tasks.running().is_empty());
        assert!(tasks.cut_off().is_empty());
    }
}
