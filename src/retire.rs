//! Superseded images: an image handed to a client stays what it was told until the client
//! could have used it.
//!
//! SAM's tag for a function with layers hashes the layers' *names* only
//! (`LambdaImage._generate_docker_image_version`, samcli/local/docker/lambda_image.py), so two
//! functions whose layers share names but not contents ask for one tag: the same layer logical
//! ID in two nested stacks (aws-sam-cli#2609, #5728), two templates in one workspace. Each
//! build moves the tag; the image it moved from is *superseded*. Two rules keep every answer
//! true:
//! - every answer for a request with layers also names the image by a **pinned tag**
//!   ([`pin_of`]: the tag plus `-` and 16 hex digits of the image ID), which only ever names
//!   that image; the SAM drop-in hands SAM the pinned tag, so a container created a moment
//!   later runs what the answer said even if the shared tag has moved since;
//! - a superseded image is removed (pins and all) only once it has not been an answer for
//!   `--answer-grace` (5 minutes by default), no container uses it, and no tag but its pins
//!   names it (a tag that moved back to it makes it current again). One that a container
//!   still uses is retried when a container goes (the engine's `destroy` events, see
//!   [`Engine::containers_gone`]), not left to `prune`.
//!
//! An image of ours that loses its tag behind our back (`docker rmi <tag>` leaves the pinned
//! tag) is superseded too: the engine's `untag` event names it ([`Engine::untagged`]), and it
//! goes by the same rules once only pinned tags name it.
//!
//! What is pending lives in memory: after a restart the superseded images left are untagged
//! or pinned-only images with our label, which `prune` removes (least recently used first),
//! never one answered in the grace.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::engine::Engine;
use crate::fingerprint::FINGERPRINT_LABEL;
use crate::image_store;
use crate::reference::ImageRef;
use crate::sync::lock;

/// Hex digits of the image ID a pinned tag ends with (64 bits: two images of one tag never
/// share them in practice, and a pinned tag is only created for the image it names).
const PIN_HEX: usize = 16;

/// Answers kept in memory past which entries older than the grace are dropped.
const MAX_ANSWERS: usize = 4096;

/// Longest wait before a removal the engine could not be asked about is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// How soon a removal put off by builds in flight is tried again.
const BUILDS_WAIT: Duration = Duration::from_millis(500);

/// The pinned tag of `image_id` ("sha256:<hex>") under `tag`: `repository:<tag>-<16 hex>`.
/// `None` when the result is not a valid reference (a tag already at Docker's 128
/// characters) or the ID is not a digest.
pub fn pin_of(tag: &ImageRef, image_id: &str) -> Option<ImageRef> {
    let hex = image_id.strip_prefix("sha256:")?.get(..PIN_HEX)?;
    let text = format!(
        "{}:{}-{hex}",
        tag.repository(),
        tag.tag().unwrap_or("latest")
    );
    ImageRef::parse(&text).ok()
}

/// True when `name` ("repository:tag") is a pinned tag of `image_id` ([`pin_of`]'s form).
pub fn is_pin_of(name: &str, image_id: &str) -> bool {
    let Some(hex) = image_id
        .strip_prefix("sha256:")
        .and_then(|h| h.get(..PIN_HEX))
    else {
        return false;
    };
    name.rsplit_once(':')
        .is_some_and(|(_, tag)| tag.ends_with(&format!("-{hex}")))
}

/// One superseded image waiting for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Tried again at this time (its grace ends, or the engine did not answer).
    At(Instant),
    /// A container uses it: tried again when a container goes.
    InUse,
}

/// What the daemon answered, and the superseded images it removes once no answer needs them
/// (module doc). Shared by every build; [`Retirements::run`] does the removals.
#[derive(Debug)]
pub struct Retirements {
    grace: Duration,
    /// Image ID -> when it was last an answer.
    answers: Mutex<HashMap<String, Instant>>,
    pending: Mutex<HashMap<String, Pending>>,
    wake: Notify,
    /// Builds between their decision to build and their answer ([`Retirements::building`]):
    /// one may be loading an image with the very ID of a pending one (the same content is the
    /// same image), untagged until its tag is set, so no removal runs meanwhile.
    building: std::sync::atomic::AtomicUsize,
}

/// A build in flight, from [`Retirements::building`]; removals wait while one lives.
pub struct Building<'a>(&'a Retirements);

impl Drop for Building<'_> {
    fn drop(&mut self) {
        self.0.building.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Retirements {
    /// Nothing answered or pending; answers are kept for `grace` (`--answer-grace`).
    pub fn new(grace: Duration) -> Retirements {
        Retirements {
            grace,
            answers: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            building: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Marks a build in flight until the guard is dropped (after its answer was noted): no
    /// superseded image is removed meanwhile, since the build may be loading one again.
    pub fn building(&self) -> Building<'_> {
        self.building.fetch_add(1, Ordering::SeqCst);
        Building(self)
    }

    fn builds_in_flight(&self) -> bool {
        self.building.load(Ordering::SeqCst) > 0
    }

    /// Notes that `image_id` was an answer now.
    pub fn answered(&self, image_id: &str) {
        let now = Instant::now();
        let mut answers = lock(&self.answers);
        if answers.len() >= MAX_ANSWERS {
            let grace = self.grace;
            answers.retain(|_, at| now.duration_since(*at) < grace);
        }
        answers.insert(image_id.to_owned(), now);
    }

    /// The images that were an answer within the grace: `prune` leaves them alone.
    pub fn recent_answers(&self) -> HashSet<String> {
        let now = Instant::now();
        lock(&self.answers)
            .iter()
            .filter(|(_, at)| now.duration_since(**at) < self.grace)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// `image_id` was superseded (its tag moved to another image): removed once the rules of
    /// the module doc allow.
    pub fn supersede(&self, image_id: &str) {
        let due = self.grace_end(image_id).unwrap_or_else(Instant::now);
        lock(&self.pending).insert(image_id.to_owned(), Pending::At(due));
        self.wake.notify_one();
    }

    /// The superseded images not removed yet, by ID, each with when it is tried next (`None`:
    /// when a container that uses it goes).
    pub fn pending(&self) -> Vec<(String, Option<Instant>)> {
        lock(&self.pending)
            .iter()
            .map(|(id, state)| {
                let at = match state {
                    Pending::At(at) => Some(*at),
                    Pending::InUse => None,
                };
                (id.clone(), at)
            })
            .collect()
    }

    /// When `image_id`'s grace ends, if it was an answer.
    fn grace_end(&self, image_id: &str) -> Option<Instant> {
        lock(&self.answers).get(image_id).map(|at| *at + self.grace)
    }

    /// The pending images due at `now`, and when the next one is due.
    fn due(&self, now: Instant) -> (Vec<String>, Option<Instant>) {
        let pending = lock(&self.pending);
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, state) in pending.iter() {
            if let Pending::At(at) = state {
                if *at <= now {
                    due.push(id.clone());
                } else {
                    next = Some(next.map_or(*at, |n| n.min(*at)));
                }
            }
        }
        (due, next)
    }

    /// Every image waiting for a container to go is due again.
    fn containers_went(&self) {
        let now = Instant::now();
        for state in lock(&self.pending).values_mut() {
            if *state == Pending::InUse {
                *state = Pending::At(now);
            }
        }
    }

    fn set(&self, image_id: &str, state: Option<Pending>) {
        let mut pending = lock(&self.pending);
        match state {
            Some(state) => pending.insert(image_id.to_owned(), state),
            None => pending.remove(image_id),
        };
    }

    /// Removes superseded images as they become due, for as long as the daemon runs; each
    /// removed image's listing under `cache_dir` goes with it.
    pub async fn run(self: Arc<Self>, engine: Arc<Engine>, cache_dir: PathBuf) {
        let mut gone = engine.containers_gone();
        let mut untagged = engine.untagged();
        loop {
            let (due, next) = self.due(Instant::now());
            if !due.is_empty() {
                for id in due {
                    let state = self.try_remove(&engine, &cache_dir, &id).await;
                    self.set(&id, state);
                }
                // Attempts put off (builds in flight, the engine) are due again soon: look again.
                continue;
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {}
                () = sleep => {}
                changed = gone.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.containers_went();
                }
                id = untagged.recv() => match id {
                    // A name removed behind our back (`docker rmi <tag>`): if that leaves one
                    // of our images with only its pins, it is superseded (checked when due).
                    Ok(id) => {
                        if !lock(&self.pending).contains_key(&id) {
                            self.supersede(&id);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// One removal attempt; returns what is still pending for `image_id` (`None`: done).
    async fn try_remove(
        &self,
        engine: &Engine,
        cache_dir: &std::path::Path,
        id: &str,
    ) -> Option<Pending> {
        if let Some(end) = self.grace_end(id).filter(|end| *end > Instant::now()) {
            // Answered again since it was superseded (a tag moved back to it).
            return Some(Pending::At(end));
        }
        if self.builds_in_flight() {
            return Some(Pending::At(Instant::now() + BUILDS_WAIT));
        }
        let retry = Some(Pending::At(Instant::now() + RETRY));
        let info = match engine.inspect_fresh(id).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                image_store::remove_listing(cache_dir, id);
                return None;
            }
            Err(_) => return retry,
        };
        if !info.labels.contains_key(FINGERPRINT_LABEL)
            || info.tags.iter().any(|tag| !is_pin_of(tag, id))
        {
            // Not ours (an untag event of any image), or a tag names it again: it is current,
            // no longer superseded.
            return None;
        }
        match engine.containers_of(id).await {
            Ok(0) => {}
            Ok(_) => {
                tracing::debug!(
                    image = id,
                    "superseded image in use by a container; kept until it goes"
                );
                return Some(Pending::InUse);
            }
            Err(_) => return retry,
        }
        if self.builds_in_flight() {
            return Some(Pending::At(Instant::now() + BUILDS_WAIT));
        }
        // Keep the untagged parents: they are build cache a concurrent build may be using
        // right now ("unknown parent image ID" otherwise).
        match engine.remove_named(id, &info.tags, false).await {
            Ok(()) => {
                tracing::info!(image = id, "removed superseded image");
                image_store::remove_listing(cache_dir, id);
                None
            }
            // A container created since the check: wait for it to go.
            Err(crate::error::Error::FailedPrecondition(_)) => Some(Pending::InUse),
            Err(err) => {
                tracing::debug!(image = id, error = %err, "removing a superseded image failed; retrying");
                retry
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_pinned_tag_is_the_tag_and_sixteen_hex_digits_of_the_id() {
        let tag =
            ImageRef::parse("samcli/lambda-python:3.12-x86_64-0123456789abcdef012345678").unwrap();
        let pin = pin_of(&tag, ID).unwrap();
        assert_eq!(
            pin.as_str(),
            "samcli/lambda-python:3.12-x86_64-0123456789abcdef012345678-0123456789abcdef"
        );
        assert!(is_pin_of(pin.as_str(), ID));
        assert!(!is_pin_of(tag.as_str(), ID));
        let other = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
        assert!(!is_pin_of(pin.as_str(), other));
        assert_eq!(pin_of(&tag, "not-a-digest"), None);
        // Docker's tags stop at 128 characters.
        let long = ImageRef::parse(&format!("r:{}", "a".repeat(120))).unwrap();
        assert_eq!(pin_of(&long, ID), None);
    }

    #[test]
    fn a_superseded_answer_waits_for_its_grace_and_a_container_for_its_end() {
        let retire = Retirements::new(Duration::from_secs(60));
        retire.answered(ID);
        retire.supersede(ID);
        let now = Instant::now();
        let (due, next) = retire.due(now);
        assert!(due.is_empty(), "answered a moment ago: not due");
        assert!(next.is_some_and(|at| at > now + Duration::from_secs(50)));
        // Never answered: due at once.
        let other = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
        retire.supersede(other);
        assert_eq!(retire.due(Instant::now()).0, vec![other.to_owned()]);
        // In use: not due until a container goes.
        retire.set(other, Some(Pending::InUse));
        assert!(retire.due(Instant::now()).0.is_empty());
        retire.containers_went();
        assert_eq!(retire.due(Instant::now()).0, vec![other.to_owned()]);
        assert!(retire.recent_answers().contains(ID));
        assert!(!retire.recent_answers().contains(other));
    }
}
