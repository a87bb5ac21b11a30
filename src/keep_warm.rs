//! Keep-warm: the layer sources of the images served within the last `--keep-warm` window are
//! watched, and an image whose source changed is rebuilt in the background (a delta, by the
//! same pipeline a request runs), so the next request is a hit.
//!
//! - One entry per tag: the definition (plan, peer, build key) of the last request served for
//!   it. A later request with other inputs replaces it (SAM's tags name layers, not paths), so
//!   a rebuild never brings back an older definition.
//! - Directory layers are watched recursively through one shared inotify instance (notify's
//!   `INotifyWatcher`, symlinks not followed); a zip layer through its parent directory,
//!   filtered by the file's path (an editor or `zip` replaces the archive by renaming).
//!   Access events (opens and reads, the daemon's own walk among them) are ignored.
//! - Bounded: at most [`MAX_SOURCES`] sources and [`crate::config::MAX_KEEP_WARM_INOTIFY_WATCHES`] inotify watches (one
//!   per directory, counted at registration). Past the budget, or at the kernel's limit
//!   (`fs.inotify.max_user_watches`: notify's `MaxFilesWatch`), a source is watched by a
//!   periodic stat walk (notify's `PollWatcher`, every [`POLL_INTERVAL`]), logged once.
//! - Debounced: a change marks its images due [`QUIET`] after the last event, so a burst of
//!   saves is one rebuild; a change while the image is rebuilding makes one more afterwards.
//! - The rebuild goes through [`Builds::submit`] with the request's own key marked
//!   `background`: a request arriving meanwhile joins it, ListBuilds lists it as such.
//! - A source that is gone (deleted or moved away) ends its watch and its images' entries,
//!   with a log line; the next request for them is told what is missing, as always.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher};

use crate::access::Peer;
use crate::builds::{Builds, Key};
use crate::pipeline::{self, Shared};
use crate::resolve::Plan;

/// Quiet period after a source's last event before its images are rebuilt (the debounce).
pub const QUIET: Duration = Duration::from_millis(100);
/// Most layer sources watched at once; the images of further sources are not kept warm.
pub const MAX_SOURCES: usize = 256;
/// How often a polled source is walked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Longest the loop sleeps without looking (expiry of the window is checked then).
const TICK: Duration = Duration::from_secs(5);

/// The keep-warm state of a daemon; `None` from [`KeepWarm::start`] when it is off.
pub struct KeepWarm {
    window: Duration,
    /// inotify watches it may hold ([`crate::config::MAX_KEEP_WARM_INOTIFY_WATCHES`] unless a test lowers it).
    watch_budget: usize,
    shared: Arc<Shared>,
    builds: Arc<Builds>,
    state: Mutex<State>,
    changes: Arc<Changes>,
    rebuilds: AtomicU64,
}

/// Roots that reported a change since the loop last looked, filled by notify's threads.
#[derive(Default)]
struct Changes {
    /// Watched root -> is a directory (a zip file otherwise); read by the event handlers to
    /// map an event's path to its root.
    roots: Mutex<BTreeMap<PathBuf, bool>>,
    changed: Mutex<BTreeSet<PathBuf>>,
    wake: tokio::sync::Notify,
}

impl Changes {
    fn handle(&self, event: notify::Result<notify::Event>) {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        let roots = crate::sync::lock(&self.roots);
        let mut hit = Vec::new();
        for path in &event.paths {
            for ancestor in path.ancestors() {
                match roots.get(ancestor) {
                    Some(true) => hit.push(ancestor.to_owned()),
                    Some(false) if ancestor == path => hit.push(ancestor.to_owned()),
                    _ => {}
                }
            }
        }
        drop(roots);
        if hit.is_empty() {
            return;
        }
        crate::sync::lock(&self.changed).extend(hit);
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct State {
    /// By tag.
    images: HashMap<String, Kept>,
    sources: HashMap<PathBuf, Source>,
    /// Zip layers' parent directories watched (non-recursively): how many zips use each, and
    /// whether it is polled.
    parents: HashMap<PathBuf, (usize, bool)>,
    inotify: Option<notify::INotifyWatcher>,
    poll: Option<notify::PollWatcher>,
    inotify_watches: usize,
    fallback_logged: bool,
}

struct Kept {
    key: Key,
    plan: Plan,
    peer: Peer,
    served: Instant,
    /// When to rebuild (the debounce deadline), if a source changed.
    due: Option<Instant>,
    rebuilding: bool,
}

struct Source {
    /// Watched by a periodic stat walk rather than inotify.
    polled: bool,
    /// inotify watches it holds (its directories).
    watches: usize,
    is_dir: bool,
}

impl KeepWarm {
    /// Keep-warm over `window` (zero: off, `None`) with at most `watch_budget` inotify
    /// watches, rebuilding through `builds` with `shared`. Starts its loop on the current
    /// runtime; the loop ends when the returned `Arc` is dropped.
    pub fn start(
        (window, watch_budget): (Duration, usize),
        shared: Arc<Shared>,
        builds: Arc<Builds>,
    ) -> Option<Arc<KeepWarm>> {
        if window.is_zero() {
            return None;
        }
        let keep = Arc::new(KeepWarm {
            window,
            watch_budget,
            shared,
            builds,
            state: Mutex::new(State::default()),
            changes: Arc::new(Changes::default()),
            rebuilds: AtomicU64::new(0),
        });
        tokio::spawn(run(Arc::downgrade(&keep), keep.changes.clone()));
        Some(keep)
    }

    /// A request for `plan` was served (for `peer`, under build `key`): keep its image warm.
    /// The watches are set up on the blocking pool (a recursive inotify watch walks the tree);
    /// the request never waits for them.
    pub fn served(self: &Arc<Self>, plan: &Plan, peer: &Peer, key: &Key) {
        if plan.layers.is_empty() {
            return;
        }
        let kept = Kept {
            key: Key {
                force: false,
                background: true,
                ..key.clone()
            },
            plan: Plan {
                force_image_build: false,
                ..plan.clone()
            },
            peer: peer.clone(),
            served: Instant::now(),
            due: None,
            rebuilding: false,
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.register(kept));
    }

    fn register(&self, kept: Kept) {
        let mut state = crate::sync::lock(&self.state);
        let tag = kept.key.tag.clone();
        let roots: Vec<PathBuf> = kept.plan.layers.iter().map(|l| l.path.clone()).collect();
        match state.images.get_mut(&tag) {
            Some(old) if old.key.definition == kept.key.definition => old.served = kept.served,
            _ => {
                state.images.insert(tag, kept);
            }
        }
        for root in roots {
            if !state.sources.contains_key(&root) {
                self.watch(&mut state, root);
            }
        }
        self.forget_unused(&mut state);
    }

    /// Starts watching `root`: inotify within the budget, else a periodic stat walk.
    fn watch(&self, state: &mut State, root: PathBuf) {
        if state.sources.len() >= MAX_SOURCES {
            if !state.fallback_logged {
                state.fallback_logged = true;
                tracing::warn!(
                    max_sources = MAX_SOURCES,
                    "keep-warm: watching the most layer sources it may; images of further \
                     sources are built when requested, not kept warm"
                );
            }
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(&root) else {
            return;
        };
        let is_dir = meta.is_dir();
        let (target, mode) = if is_dir {
            (root.clone(), RecursiveMode::Recursive)
        } else {
            match root.parent() {
                Some(parent) => (parent.to_owned(), RecursiveMode::NonRecursive),
                None => return,
            }
        };
        crate::sync::lock(&self.changes.roots).insert(root.clone(), is_dir);
        if let Some((users, polled)) = state.parents.get_mut(&target).filter(|_| !is_dir) {
            *users += 1;
            let polled = *polled;
            state.sources.insert(
                root,
                Source {
                    polled,
                    watches: 0,
                    is_dir,
                },
            );
            return;
        }
        let watches = if is_dir { count_dirs(&root) } else { 1 };
        let polled = match self.add_inotify(state, &target, mode, watches) {
            Ok(()) => false,
            Err(why) => {
                if !state.fallback_logged {
                    state.fallback_logged = true;
                    tracing::warn!(
                        path = %root.display(),
                        "keep-warm: {why}; this and further layer sources are watched by a \
                         stat walk every {}s instead (logged once)",
                        POLL_INTERVAL.as_secs()
                    );
                }
                if let Err(err) = self.add_poll(state, &target, mode) {
                    tracing::warn!(path = %root.display(), "keep-warm: cannot watch: {err}");
                    crate::sync::lock(&self.changes.roots).remove(&root);
                    return;
                }
                true
            }
        };
        if !is_dir {
            state.parents.insert(target, (1, polled));
        }
        let watches = if polled { 0 } else { watches };
        state.inotify_watches += watches;
        state.sources.insert(
            root,
            Source {
                polled,
                watches,
                is_dir,
            },
        );
    }

    fn add_inotify(
        &self,
        state: &mut State,
        target: &Path,
        mode: RecursiveMode,
        watches: usize,
    ) -> Result<(), String> {
        if state.inotify_watches + watches > self.watch_budget {
            return Err(format!(
                "its budget of {} inotify watches is used",
                self.watch_budget
            ));
        }
        let watcher = match &mut state.inotify {
            Some(watcher) => watcher,
            None => {
                let changes = self.changes.clone();
                let config = notify::Config::default().with_follow_symlinks(false);
                let watcher =
                    notify::INotifyWatcher::new(move |event| changes.handle(event), config)
                        .map_err(|err| format!("inotify is not available ({err})"))?;
                state.inotify.insert(watcher)
            }
        };
        watcher.watch(target, mode).map_err(|err| match err.kind {
            notify::ErrorKind::MaxFilesWatch => {
                "the kernel's inotify watch limit (fs.inotify.max_user_watches) is reached"
                    .to_owned()
            }
            _ => format!("inotify refused the watch ({err})"),
        })
    }

    fn add_poll(
        &self,
        state: &mut State,
        target: &Path,
        mode: RecursiveMode,
    ) -> notify::Result<()> {
        let watcher = match &mut state.poll {
            Some(watcher) => watcher,
            None => {
                let changes = self.changes.clone();
                let config = notify::Config::default()
                    .with_poll_interval(POLL_INTERVAL)
                    .with_follow_symlinks(false);
                let watcher = notify::PollWatcher::new(move |event| changes.handle(event), config)?;
                state.poll.insert(watcher)
            }
        };
        watcher.watch(target, mode)
    }

    /// Stops watching `root` (gone, or no longer used by a kept image).
    fn unwatch(&self, state: &mut State, root: &Path) {
        crate::sync::lock(&self.changes.roots).remove(root);
        let Some(source) = state.sources.remove(root) else {
            return;
        };
        state.inotify_watches -= source.watches;
        let target = if source.is_dir {
            root.to_owned()
        } else {
            let Some(parent) = root.parent() else { return };
            let Some((users, _)) = state.parents.get_mut(parent) else {
                return;
            };
            *users -= 1;
            if *users > 0 {
                return;
            }
            state.parents.remove(parent);
            parent.to_owned()
        };
        // A watch on a deleted path is gone already; an error here says only that.
        let _ = match (source.polled, state.poll.as_mut(), state.inotify.as_mut()) {
            (true, Some(poll), _) => poll.unwatch(&target),
            (false, _, Some(inotify)) => inotify.unwatch(&target),
            _ => Ok(()),
        };
    }

    /// Drops images served longer ago than the window, and sources no kept image uses.
    fn forget_unused(&self, state: &mut State) {
        let now = Instant::now();
        state
            .images
            .retain(|_, kept| kept.rebuilding || now.duration_since(kept.served) < self.window);
        let used: BTreeSet<PathBuf> = state
            .images
            .values()
            .flat_map(|kept| kept.plan.layers.iter().map(|l| l.path.clone()))
            .collect();
        let unused: Vec<PathBuf> = state
            .sources
            .keys()
            .filter(|r| !used.contains(*r))
            .cloned()
            .collect();
        for root in unused {
            self.unwatch(state, &root);
        }
    }

    /// Marks the images of the changed `roots` due; ends the watches of roots that are gone.
    fn changed(&self, roots: BTreeSet<PathBuf>) {
        let mut state = crate::sync::lock(&self.state);
        let due = Instant::now() + QUIET;
        for root in roots {
            if std::fs::symlink_metadata(&root).is_err() {
                let tags: Vec<String> = state
                    .images
                    .iter()
                    .filter(|(_, kept)| kept.plan.layers.iter().any(|l| l.path == root))
                    .map(|(tag, _)| tag.clone())
                    .collect();
                tracing::info!(
                    path = %root.display(), ?tags,
                    "keep-warm: layer source is gone; its watch ends and its images are no \
                     longer kept warm"
                );
                state.images.retain(|tag, _| !tags.contains(tag));
                self.unwatch(&mut state, &root);
                continue;
            }
            for kept in state.images.values_mut() {
                if kept.plan.layers.iter().any(|l| l.path == root) {
                    kept.due = Some(due);
                }
            }
        }
        self.forget_unused(&mut state);
    }

    /// Starts the rebuilds that are due; returns when the next one is (if any).
    fn rebuild_due(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut state = crate::sync::lock(&self.state);
        let mut next = None::<Instant>;
        for kept in state.images.values_mut() {
            let Some(due) = kept.due else { continue };
            if kept.rebuilding {
                continue; // after it, once more (`rebuilt` wakes the loop)
            }
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            kept.due = None;
            kept.rebuilding = true;
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
            self.spawn_rebuild(kept.key.clone(), kept.plan.clone(), kept.peer.clone());
        }
        next
    }

    fn spawn_rebuild(self: &Arc<Self>, key: Key, plan: Plan, peer: Peer) {
        let this = self.clone();
        tokio::spawn(async move {
            let tag = key.tag.clone();
            tracing::info!(%tag, "keep-warm: a layer source changed; rebuilding in the background");
            let shared = this.shared.clone();
            let submitted = this
                .builds
                .submit(key, move |reporter| {
                    pipeline::run(shared, plan, peer, reporter)
                })
                .await;
            match submitted {
                Ok((mut subscription, _)) => {
                    while let Some(event) = subscription.next().await {
                        if let Err(err) = event {
                            tracing::info!(%tag, error = %err, "keep-warm: background rebuild failed");
                        }
                    }
                }
                Err(err) => {
                    tracing::info!(%tag, error = %err, "keep-warm: background rebuild not started")
                }
            }
            if let Some(kept) = crate::sync::lock(&this.state).images.get_mut(&tag) {
                kept.rebuilding = false;
            }
            this.changes.wake.notify_one();
        });
    }

    /// What is watched, for GetInfo.
    pub fn info(&self) -> crate::proto::KeepWarmInfo {
        let state = crate::sync::lock(&self.state);
        let mut sources: Vec<crate::proto::WatchedSource> = state
            .sources
            .iter()
            .map(|(root, source)| {
                let mut tags: Vec<String> = state
                    .images
                    .iter()
                    .filter(|(_, kept)| kept.plan.layers.iter().any(|l| &l.path == root))
                    .map(|(tag, _)| tag.clone())
                    .collect();
                tags.sort();
                crate::proto::WatchedSource {
                    path: root.display().to_string(),
                    mode: if source.polled { "poll" } else { "inotify" }.to_owned(),
                    tags,
                }
            })
            .collect();
        sources.sort_by(|a, b| a.path.cmp(&b.path));
        crate::proto::KeepWarmInfo {
            window_seconds: self.window.as_secs(),
            sources,
            inotify_watches: state.inotify_watches as u64,
            rebuilds: self.rebuilds.load(Ordering::Relaxed),
        }
    }
}

/// The loop: wakes on changes, rebuilds what is due, forgets what left the window; ends when
/// the daemon drops its [`KeepWarm`].
async fn run(keep: Weak<KeepWarm>, changes: Arc<Changes>) {
    let mut next: Option<Instant> = None;
    loop {
        let sleep = next.map_or(TICK, |at| {
            at.saturating_duration_since(Instant::now()).min(TICK)
        });
        let _ = tokio::time::timeout(sleep, changes.wake.notified()).await;
        let Some(keep) = keep.upgrade() else { return };
        let roots = std::mem::take(&mut *crate::sync::lock(&changes.changed));
        if roots.is_empty() {
            keep.forget_unused(&mut crate::sync::lock(&keep.state));
        } else {
            // symlink_metadata per changed root: a few system calls, on the loop's own task.
            keep.changed(roots);
        }
        next = keep.rebuild_due();
    }
}

/// Directories under `root`, itself included (each is one inotify watch); links not followed.
fn count_dirs(root: &Path) -> usize {
    let mut count = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        count += 1;
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, path: &str) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(kind).add_path(PathBuf::from(path)))
    }

    /// An event marks the directory root it lies under, or the zip root it names; opens and
    /// reads (the daemon's own walk) and other files next to a zip mark nothing.
    #[test]
    fn events_mark_their_roots_and_accesses_are_ignored() {
        use notify::event::{AccessKind, CreateKind, ModifyKind};
        let changes = Changes::default();
        {
            let mut roots = crate::sync::lock(&changes.roots);
            roots.insert(PathBuf::from("/src/deps"), true);
            roots.insert(PathBuf::from("/src/layer.zip"), false);
        }
        let modify = EventKind::Modify(ModifyKind::Any);
        changes.handle(event(EventKind::Access(AccessKind::Any), "/src/deps/a.js"));
        changes.handle(event(modify, "/src/other.zip"));
        changes.handle(event(modify, "/src/layer.zip.part"));
        assert!(crate::sync::lock(&changes.changed).is_empty());
        changes.handle(event(modify, "/src/deps/node_modules/x/index.js"));
        changes.handle(event(EventKind::Create(CreateKind::File), "/src/layer.zip"));
        let changed: Vec<PathBuf> = crate::sync::lock(&changes.changed)
            .iter()
            .cloned()
            .collect();
        assert_eq!(
            changed,
            [PathBuf::from("/src/deps"), PathBuf::from("/src/layer.zip")]
        );
    }

    /// Directories are counted (each is one inotify watch), links to directories are not.
    #[test]
    fn count_dirs_counts_directories_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/file"), "x").unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).unwrap();
        assert_eq!(count_dirs(dir.path()), 3);
    }
}
