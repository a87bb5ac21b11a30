//! Image reference parsing that keeps the user's spelling.
//!
//! Validation is the `oci-spec` crate's (the distribution grammar: registry host with port,
//! path components, tag, digest). That crate normalises names (`docker.io/library/...`), which
//! we must not do: SAM compares tags as spelled. So we validate with it and take the repository
//! as the original text minus the `@digest` and `:tag` suffixes it found.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex};

use oci_spec::distribution::Reference;

/// References remembered by [`ImageRef::parse`]; the map is emptied when it would grow past
/// this (a daemon sees a few tags and bases per function).
const MAX_PARSED: usize = 1024;

/// What [`ImageRef::parse`] found for texts it parsed before. Matching the distribution
/// grammar's regex (oci-spec's `Reference::try_from`) costs about 150,000 instructions, and
/// every request parses its base and its tag: a memo of a pure function, held only to look up
/// or insert, never across an `.await`.
static PARSED: LazyLock<Mutex<HashMap<String, ImageRef>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A validated image reference, spelled as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    original: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// Parses `text`; the error says what is wrong with it. A text parsed before is answered
    /// from memory ([`PARSED`]).
    pub fn parse(text: &str) -> Result<ImageRef, String> {
        if let Some(known) = crate::sync::lock(&PARSED).get(text) {
            return Ok(known.clone());
        }
        let parsed = ImageRef::parse_new(text)?;
        let mut known = crate::sync::lock(&PARSED);
        if known.len() >= MAX_PARSED {
            known.clear();
        }
        known.insert(text.to_owned(), parsed.clone());
        Ok(parsed)
    }

    fn parse_new(text: &str) -> Result<ImageRef, String> {
        let parsed = Reference::try_from(text).map_err(|err| err.to_string())?;
        let mut rest = text;
        let digest = parsed.digest().map(str::to_owned);
        if let Some(digest) = &digest {
            rest = rest
                .strip_suffix(digest.as_str())
                .and_then(|r| r.strip_suffix('@'))
                .ok_or_else(|| format!("digest {digest} is not at the end"))?;
        }
        // oci-spec fills in "latest" when neither tag nor digest is given; only a tag that was
        // really written counts.
        let tag = parsed
            .tag()
            .filter(|tag| rest.ends_with(&format!(":{tag}")))
            .map(str::to_owned);
        if let Some(tag) = &tag {
            rest = &rest[..rest.len() - tag.len() - 1];
        }
        Ok(ImageRef {
            original: text.to_owned(),
            repository: rest.to_owned(),
            tag,
            digest,
        })
    }

    /// The reference without tag or digest, as spelled (`localhost:5000/team/fn`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if one was written.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:...`), if one was written.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The reference exactly as given.
    pub fn as_str(&self) -> &str {
        &self.original
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn repository_keeps_spelling_and_drops_tag_and_digest() {
        let cases = [
            ("fn", "fn", None, None),
            ("myrepo/fn:v1", "myrepo/fn", Some("v1"), None),
            (
                "public.ecr.aws/lambda/python:3.12-x86_64",
                "public.ecr.aws/lambda/python",
                Some("3.12-x86_64"),
                None,
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/fn:latest",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/fn",
                Some("latest"),
                None,
            ),
            (
                "localhost:5000/team/fn",
                "localhost:5000/team/fn",
                None,
                None,
            ),
            (
                "localhost:5000/team/fn:v2",
                "localhost:5000/team/fn",
                Some("v2"),
                None,
            ),
            ("team/fn@DIGEST", "team/fn", None, Some(DIGEST)),
            (
                "localhost:5000/team/fn@DIGEST",
                "localhost:5000/team/fn",
                None,
                Some(DIGEST),
            ),
            (
                "localhost:5000/team/fn:v3@DIGEST",
                "localhost:5000/team/fn",
                Some("v3"),
                Some(DIGEST),
            ),
            (
                "docker.io/library/busybox:1",
                "docker.io/library/busybox",
                Some("1"),
                None,
            ),
        ];
        for (text, repo, tag, digest) in cases {
            let text = text.replace("DIGEST", DIGEST);
            let parsed = ImageRef::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.repository(), repo, "{text}");
            assert_eq!(parsed.tag(), tag, "{text}");
            assert_eq!(parsed.digest(), digest, "{text}");
            assert_eq!(parsed.as_str(), text);
            let again = ImageRef::parse(&text).unwrap();
            assert_eq!(again, parsed, "remembered as parsed: {text}");
            assert_eq!(ImageRef::parse_new(&text).unwrap(), parsed, "{text}");
        }
    }

    /// The memo of parsed references stays within its bound however many texts pass, and a
    /// rejected text is rejected every time (errors are not remembered).
    #[test]
    fn parsed_references_are_remembered_within_a_bound() {
        for index in 0..MAX_PARSED + 10 {
            let text = format!("memo/fn{index}:v1");
            assert_eq!(ImageRef::parse(&text).unwrap().tag(), Some("v1"));
            assert!(crate::sync::lock(&PARSED).len() <= MAX_PARSED);
        }
        for _ in 0..2 {
            assert!(ImageRef::parse("upper/Case").is_err());
        }
        assert!(!crate::sync::lock(&PARSED).contains_key("upper/Case"));
    }

    #[test]
    fn malformed_references_are_rejected() {
        for text in [
            "",
            "upper/Case",
            "Repo",
            "a b",
            "fn:",
            "fn@sha256:abc",
            ":tag",
            "fn::x",
            "-lead/x",
        ] {
            assert!(
                ImageRef::parse(text).is_err(),
                "{text:?} should be rejected"
            );
        }
    }
}
