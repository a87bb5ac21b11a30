//! Lambda's own rules for layers that do not stop a local build (issue 25): what Lambda would
//! refuse at deploy, or fail on at run time, said as warnings with a stable code, the layer,
//! the first few entries, what Lambda does and the rule's source. Local work goes on: the
//! image is built as the rule-breaking layer is normalised (modes 0755/0644). Pure: the callers
//! (`archive`, `layers`) gather the facts.

/// Entries named in a warning; the rest are counted.
pub const SHOWN_ENTRIES: usize = 5;

/// Most layers a function may have (Lambda quotas: "Function layers: five layers").
pub const MAX_LAYERS: usize = 5;

/// Lambda's limit on a function's unzipped deployment package, its layers included (Lambda
/// quotas: "Deployment package (.zip file archive) size: 250 MB (unzipped)", 262,144,000 bytes).
pub const MAX_UNZIPPED_BYTES: u64 = 262_144_000;

/// The paths found breaking one rule: the first [`SHOWN_ENTRIES`], and how many in all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    first: Vec<String>,
    count: usize,
}

impl Found {
    /// Notes one more path.
    pub fn add(&mut self, path: &str) {
        self.count += 1;
        if self.first.len() < SHOWN_ENTRIES {
            self.first.push(path.to_owned());
        }
    }

    /// How many paths were noted.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `"a", "b" and 3 more`.
    pub fn listed(&self) -> String {
        let mut text = self
            .first
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        if self.count > self.first.len() {
            text.push_str(&format!(" and {} more", self.count - self.first.len()));
        }
        text
    }
}

/// Code of the warning about files Lambda cannot read.
pub const UNREADABLE: &str = "unreadable_in_lambda";

/// Sorts a file's permission bits into the two rules about reading: without the owner's
/// read bit Lambda refuses the layer at publish ("Some files do not have read permissions",
/// aws-cdk#11776); without read for others the function cannot read it at run time, since it
/// does not run as the file's owner (aws-sam-cli#2344).
pub fn note_readability(mode: u32, path: &str, owner: &mut Found, others: &mut Found) {
    if mode & 0o400 == 0 {
        owner.add(path);
    } else if mode & 0o004 == 0 {
        others.add(path);
    }
}

/// The [`UNREADABLE`] warning's text (without the layer) for what [`note_readability`] found.
pub fn unreadable(owner: &Found, others: &Found) -> Option<String> {
    let mut parts = Vec::new();
    if owner.count() > 0 {
        parts.push(format!(
            "{} file(s) without read permission for their owner ({}): Lambda refuses to publish \
             such a layer (\"Some files do not have read permissions\", aws-cdk#11776)",
            owner.count(),
            owner.listed()
        ));
    }
    if others.count() > 0 {
        parts.push(format!(
            "{} file(s) without read permission for others ({}): the function cannot read them \
             in Lambda, which does not run it as the files' owner (aws-sam-cli#2344)",
            others.count(),
            others.listed()
        ));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "{}; the image has them readable (0644, or 0755 when executable), so this runs \
             locally only; make them readable (chmod a+r) before deploying",
            parts.join("; ")
        )
    })
}

/// The [`UNREADABLE`] warning's text (without the layer) when a layer writes `found` into
/// directories that the earlier layers `owners` ship without write permission for their
/// owner: Lambda refuses the function ("Some files need to be overridden by layers but don't
/// have write permissions", its error at deploy, issue 25).
pub fn writes_into_locked(found: &Found, owners: &[&str]) -> Option<String> {
    (found.count() > 0).then(|| {
        format!(
            "it writes {} into directories that layer(s) {} ship without write permission for \
             their owner: Lambda refuses such a function (\"Some files need to be overridden by \
             layers but don't have write permissions\"); the image has the directories 0755, so \
             this builds locally only; make them writable (chmod u+w) before deploying",
            found.listed(),
            owners
                .iter()
                .map(|o| format!("{o:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The `too_many_layers` warning, when a function has more than [`MAX_LAYERS`].
pub fn too_many_layers(count: usize) -> Option<String> {
    (count > MAX_LAYERS).then(|| {
        format!(
            "the function has {count} layers; Lambda allows at most {MAX_LAYERS} per function \
             and refuses the deploy (Lambda quotas, \"Function layers\")"
        )
    })
}

/// The `layers_too_large` warning, when the layers unzip to more than [`MAX_UNZIPPED_BYTES`].
pub fn too_large(bytes: u64) -> Option<String> {
    (bytes > MAX_UNZIPPED_BYTES).then(|| {
        format!(
            "the layers hold {bytes} bytes unzipped, more than the {MAX_UNZIPPED_BYTES} bytes \
             Lambda allows for a function and its layers together, so Lambda refuses the deploy \
             (Lambda quotas, \"Deployment package size\"); only the layers are counted here, the \
             function's own code adds to it"
        )
    })
}

/// The ELF machine (`e_machine`) of a little-endian ELF file starting with `header` (at least
/// 20 bytes), `None` for anything else (a script, a big-endian ELF).
pub fn elf_machine(header: &[u8]) -> Option<u16> {
    // ELF magic, EI_DATA = 1 (little-endian) at 5, e_machine at 18 (System V ABI, ELF header).
    if header.len() < 20 || header[..4] != *b"\x7fELF" || header[5] != 1 {
        return None;
    }
    Some(u16::from_le_bytes([header[18], header[19]]))
}

/// `e_machine` of x86_64 (EM_X86_64) and arm64 (EM_AARCH64) executables.
pub const EM_X86_64: u16 = 62;
/// See [`EM_X86_64`].
pub const EM_AARCH64: u16 = 183;

/// The `extension_arch_mismatch` warning: `found` (`/opt/bootstrap`, `/opt/extensions/*`)
/// are ELF executables for `their` architecture, not the function's `ours`.
pub fn arch_mismatch(found: &Found, ours: &str, their: &str) -> Option<String> {
    (found.count() > 0).then(|| {
        format!(
            "{} is an executable for {their}, but the function is {ours}: it may run here under \
             binfmt emulation, while Lambda fails to start it (Extension.LaunchError for an \
             extension, Runtime.InvalidEntrypoint for a bootstrap); build it for {ours}",
            found.listed()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fire_only_past_their_limits() {
        let (mut owner, mut others) = (Found::default(), Found::default());
        note_readability(0o100_644, "ok", &mut owner, &mut others);
        assert_eq!(unreadable(&owner, &others), None);
        note_readability(0o100_200, "w-only", &mut owner, &mut others);
        for index in 0..7 {
            note_readability(0o100_640, &format!("g{index}"), &mut owner, &mut others);
        }
        let text = unreadable(&owner, &others).unwrap();
        assert!(text.contains("1 file(s) without read permission for their owner (\"w-only\")"));
        assert!(
            text.contains("7 file(s)") && text.contains("\"g4\" and 2 more"),
            "{text}"
        );
        assert_eq!(too_many_layers(5), None);
        assert!(too_many_layers(6).unwrap().contains("6 layers"));
        assert_eq!(too_large(MAX_UNZIPPED_BYTES), None);
        assert!(too_large(MAX_UNZIPPED_BYTES + 1).is_some());
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(18, 0);
        elf.extend_from_slice(&EM_AARCH64.to_le_bytes());
        assert_eq!(elf_machine(&elf), Some(EM_AARCH64));
        assert_eq!(elf_machine(b"#!/bin/sh\necho hi there\n"), None);
    }
}
