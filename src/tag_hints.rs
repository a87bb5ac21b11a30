//! Small per-tag hints (when a tag's use was last written, how big its layers' last walk was,
//! which layers it was last asked for with), bounded so a daemon that sees ever new tags stays
//! small.

use std::time::Instant;

/// Most tags each [`TagHints`] remembers (a few hundred bytes each).
pub const MAX_TAG_HINTS: usize = 4096;

/// A per-tag hint and when it was last set, for at most `cap` tags: setting a new tag when the
/// map is full first forgets the older half (by when each was set). Every hint only saves
/// work (a blocking-pool hand-off, a small file write) or words (a `shared_tag` warning not
/// given once), so forgetting one is always safe; a
/// daemon that sees ever new tags keeps at most `cap` of them (plus, briefly, one per
/// concurrent request racing past the size check).
pub struct TagHints<V> {
    /// DashMap: read on every request from many tasks; no reference is held across `.await`.
    map: dashmap::DashMap<String, (V, Instant)>,
    cap: usize,
}

impl<V: Clone> TagHints<V> {
    /// An empty map that remembers at most `cap` tags.
    pub fn new(cap: usize) -> TagHints<V> {
        TagHints {
            map: dashmap::DashMap::new(),
            cap,
        }
    }

    /// The hint for `tag` and when it was set.
    pub fn get(&self, tag: &str) -> Option<(V, Instant)> {
        self.map.get(tag).map(|entry| entry.clone())
    }

    /// Sets the hint for `tag`, set at `now`.
    pub fn set(&self, tag: &str, value: V, now: Instant) {
        if self.map.len() >= self.cap && !self.map.contains_key(tag) {
            self.forget_older_half();
        }
        self.map.insert(tag.to_owned(), (value, now));
    }

    /// How many tags are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn forget_older_half(&self) {
        let mut times: Vec<Instant> = self.map.iter().map(|entry| entry.value().1).collect();
        if times.is_empty() {
            return;
        }
        let middle = (times.len() - 1) / 2;
        let cut = *times.select_nth_unstable(middle).1;
        self.map.retain(|_, (_, at)| *at > cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The per-tag hints stay within their cap however many tags pass, keep the recently set
    /// ones, and a known tag is updated in place even when the map is full.
    #[test]
    fn tag_hints_are_bounded_and_keep_the_recent_half() {
        let hints = TagHints::new(4);
        let start = Instant::now();
        let at = |i: u64| start + Duration::from_millis(i);
        for i in 0..4 {
            hints.set(&format!("tag{i}"), i, at(i));
        }
        hints.set("tag0", 10, at(10));
        assert_eq!(hints.len(), 4, "a known tag does not evict");
        hints.set("tag4", 4, at(11));
        assert_eq!(hints.get("tag1"), None, "the oldest went");
        assert_eq!(hints.get("tag2"), None);
        assert_eq!(hints.get("tag0"), Some((10, at(10))), "recently set, kept");
        assert_eq!(hints.get("tag3"), Some((3, at(3))));
        assert_eq!(hints.get("tag4"), Some((4, at(11))));
        for i in 0..1000 {
            hints.set(&format!("many{i}"), i, at(100 + i));
            assert!(hints.len() <= 4, "{} tags after {i} inserts", hints.len());
        }
        assert_eq!(hints.get("many999"), Some((999, at(1099))));
    }
}
