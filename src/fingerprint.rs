//! The content fingerprint of an image: the digests that determine it ([`Parts`]), the labels
//! that record them on the image, and the decision whether an existing image still serves a
//! request (and if not, what changed).
//!
//! Pure: no I/O. The pipeline computes [`Parts`] and asks [`decide`]; prune finds our images by
//! [`FINGERPRINT_LABEL`].

use sha2::{Digest, Sha256};

use crate::engine::ImageInfo;
use crate::outcome::Reason;

/// Label holding the content fingerprint of an image we built.
pub const FINGERPRINT_LABEL: &str = "io.lambda-imaged.fingerprint";
/// Label holding the per-part digests, so a rebuild can say what changed.
pub const PARTS_LABEL: &str = "io.lambda-imaged.parts";
/// Label naming the daemon version that built the image.
pub const VERSION_LABEL: &str = "io.lambda-imaged.version";

/// The digests that determine an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub base: String,
    pub rie: String,
    pub dockerfile: String,
    /// (layer name, content digest) in request order.
    pub layers: Vec<(String, String)>,
}

impl Parts {
    /// The fingerprint: sha256 over every part.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.to_label().as_bytes()))
    }

    fn names_digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, _) in &self.layers {
            hasher.update(name.as_bytes());
            hasher.update([0]);
        }
        hex::encode(hasher.finalize())
    }

    /// The label form: only hex digests and fixed words, so it is safe inside a Dockerfile
    /// (layer names, which are free text, appear only as a digest).
    pub fn to_label(&self) -> String {
        let layers: Vec<&str> = self
            .layers
            .iter()
            .map(|(_, digest)| digest.as_str())
            .collect();
        format!(
            "v1 base={} rie={} dockerfile={} names={} layers={}",
            self.base,
            self.rie,
            self.dockerfile,
            self.names_digest(),
            layers.join(",")
        )
    }
}

/// The label form of [`Parts`], parsed back (names are only known as a digest).
#[derive(Debug, Default, PartialEq, Eq)]
struct LabelParts {
    base: String,
    rie: String,
    dockerfile: String,
    names: String,
    layers: Vec<String>,
}

fn parse_label(text: &str) -> Option<LabelParts> {
    let mut fields = text.split(' ');
    if fields.next()? != "v1" {
        return None;
    }
    let mut parts = LabelParts::default();
    for field in fields {
        let (key, value) = field.split_once('=')?;
        match key {
            "base" => parts.base = value.to_owned(),
            "rie" => parts.rie = value.to_owned(),
            "dockerfile" => parts.dockerfile = value.to_owned(),
            "names" => parts.names = value.to_owned(),
            "layers" => {
                parts.layers = value
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            _ => return None,
        }
    }
    Some(parts)
}

/// The labels an image we make carries: its fingerprint, the parts it was made of (so a
/// mismatch can say which part changed) and the daemon's version.
pub fn labels(parts: &Parts) -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([
        (FINGERPRINT_LABEL.to_owned(), parts.fingerprint()),
        (PARTS_LABEL.to_owned(), parts.to_label()),
        (
            VERSION_LABEL.to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

/// Why an existing image does (not) serve the request.
pub fn decide(existing: Option<&ImageInfo>, parts: &Parts, force: bool) -> (Reason, String) {
    let Some(existing) = existing else {
        return (Reason::Missing, String::new());
    };
    let Some(old) = existing.labels.get(FINGERPRINT_LABEL) else {
        return (Reason::Missing, String::new());
    };
    if force {
        return (Reason::Forced, String::new());
    }
    if *old == parts.fingerprint() {
        return (Reason::UpToDate, String::new());
    }
    let Some(old) = existing
        .labels
        .get(PARTS_LABEL)
        .and_then(|p| parse_label(p))
    else {
        return (Reason::DefinitionChanged, String::new());
    };
    if old.base != parts.base {
        return (Reason::BaseChanged, String::new());
    }
    if old.rie != parts.rie {
        return (Reason::RieChanged, String::new());
    }
    if old.dockerfile != parts.dockerfile
        || old.names != parts.names_digest()
        || old.layers.len() != parts.layers.len()
    {
        return (Reason::DefinitionChanged, String::new());
    }
    for ((name, digest), old_digest) in parts.layers.iter().zip(&old.layers) {
        if digest != old_digest {
            return (Reason::LayerChanged, name.clone());
        }
    }
    (Reason::DefinitionChanged, String::new())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parts() -> Parts {
        Parts {
            base: "sha256:base".into(),
            rie: "rie".into(),
            dockerfile: "df".into(),
            layers: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
        }
    }

    fn image(parts: &Parts) -> ImageInfo {
        ImageInfo {
            id: "sha256:x".into(),
            labels: HashMap::from([
                (FINGERPRINT_LABEL.into(), parts.fingerprint()),
                (PARTS_LABEL.into(), parts.to_label()),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn reasons_name_what_changed() {
        let old = parts();
        let existing = image(&old);
        assert_eq!(decide(None, &old, false).0, Reason::Missing);
        assert_eq!(
            decide(Some(&ImageInfo::default()), &old, false).0,
            Reason::Missing
        );
        assert_eq!(decide(Some(&existing), &old, false).0, Reason::UpToDate);
        assert_eq!(decide(Some(&existing), &old, true).0, Reason::Forced);
        let mut new = old.clone();
        new.layers[1].1 = "changed".into();
        assert_eq!(
            decide(Some(&existing), &new, false),
            (Reason::LayerChanged, "b".into())
        );
        let mut new = old.clone();
        new.base = "sha256:other".into();
        assert_eq!(decide(Some(&existing), &new, false).0, Reason::BaseChanged);
        let mut new = old.clone();
        new.rie = "other".into();
        assert_eq!(decide(Some(&existing), &new, false).0, Reason::RieChanged);
        let mut new = old.clone();
        new.layers.pop();
        assert_eq!(
            decide(Some(&existing), &new, false).0,
            Reason::DefinitionChanged
        );
    }

    #[test]
    fn labels_round_trip_and_hide_layer_names() {
        let mut p = parts();
        p.layers[0].0 = "evil\"\nRUN rm -rf /".into();
        let labels = labels(&p);
        assert_eq!(labels[FINGERPRINT_LABEL], p.fingerprint());
        assert!(
            labels
                .values()
                .all(|v| !v.contains("evil") && !v.contains('\n'))
        );
        let parsed = parse_label(&p.to_label()).unwrap();
        assert_eq!(parsed.layers, vec!["1".to_owned(), "2".to_owned()]);
        assert_eq!(parsed.names, p.names_digest());
        assert_eq!(parse_label("v2 base=x"), None);
    }
}
