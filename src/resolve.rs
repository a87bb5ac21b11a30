//! Pure resolution: a request becomes a [`Plan`] (tag, base image, layers, Dockerfile).
//!
//! SAM CLI's rules (`LambdaImage.build`, `Runtime.get_image_name_tag` in
//! `samcli/local/docker/lambda_image.py`) live here, so that every tag an existing emulator
//! looks for is byte-identical. The one place we differ on purpose: references are parsed
//! properly ([`ImageRef`]), so a registry port or a digest no longer mangles the repository.
//! No I/O happens here: no engine call, no system call (the service checks that the layer
//! paths exist, with the client's rights).

use std::path::PathBuf;
use std::sync::LazyLock;

use regex::Regex;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::reference::ImageRef;

/// Where SAM's managed runtime images live.
pub const LAMBDA_REPO_PREFIX: &str = "public.ecr.aws/lambda";
/// Repository prefix of SAM's layered images.
pub const SAM_LAYERED_REPO: &str = "samcli/lambda";
/// Where the runtime interface emulator sits in the image (SAM's path).
pub const RIE_IMAGE_PATH: &str = "/var/rapid/aws-lambda-rie";
/// The most layers a request may name (Lambda itself allows 5; SAM does not check).
pub const MAX_LAYERS: usize = 64;

/// Every runtime SAM knows. Anything else is INVALID_ARGUMENT naming this list.
pub const RUNTIMES: &[&str] = &[
    "nodejs16.x",
    "nodejs18.x",
    "nodejs20.x",
    "nodejs22.x",
    "nodejs24.x",
    "python3.8",
    "python3.9",
    "python3.10",
    "python3.11",
    "python3.12",
    "python3.13",
    "python3.14",
    "ruby3.2",
    "ruby3.3",
    "ruby3.4",
    "ruby4.0",
    "java8.al2",
    "java8.al2023",
    "java11",
    "java11.al2023",
    "java17",
    "java17.al2023",
    "java21",
    "java25",
    "go1.x",
    "dotnet6",
    "dotnet8",
    "dotnet10",
    "provided",
    "provided.al2",
    "provided.al2023",
];

/// Runtimes whose images exist for x86_64 only (SAM's `has_multi_arch_image` is false).
const SINGLE_ARCH_RUNTIMES: &[&str] = &["go1.x", "provided"];

/// Instruction set of the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
    Arm64,
}

impl Arch {
    /// SAM's spelling, used in tags: `x86_64`, `arm64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The engine platform string.
    pub fn platform(self) -> &'static str {
        match self {
            Arch::X86_64 => "linux/amd64",
            Arch::Arm64 => "linux/arm64",
        }
    }

    /// Parses SAM's spelling.
    pub fn parse(text: &str) -> Option<Arch> {
        match text {
            "x86_64" => Some(Arch::X86_64),
            "arm64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

/// How the function is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageType {
    Zip,
    Image,
}

impl PackageType {
    /// Upper-case name, as SAM and the proto spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            PackageType::Zip => "ZIP",
            PackageType::Image => "IMAGE",
        }
    }
}

/// A layer as requested: its SAM name and where its content is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerSpec {
    pub name: String,
    pub path: PathBuf,
}

/// An invoke image override; `function` is `None` for the global default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvokeImage {
    pub function: Option<String>,
    pub image: String,
}

/// A request as it arrives, with enums already parsed; strings are validated by [`resolve`].
#[derive(Debug, Clone)]
pub struct Request {
    pub package_type: PackageType,
    pub runtime: String,
    pub image: String,
    pub arch: Arch,
    pub layers: Vec<LayerSpec>,
    pub invoke_images: Vec<InvokeImage>,
    pub function_name: String,
    pub skip_pull_image: bool,
    pub force_image_build: bool,
}

/// What a request resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The tag SAM would give the image.
    pub tag: ImageRef,
    /// The FROM image.
    pub base: ImageRef,
    pub arch: Arch,
    pub package_type: PackageType,
    /// The runtime of a ZIP function.
    pub runtime: Option<String>,
    /// Layers merged into /opt in this order (always empty for IMAGE functions).
    pub layers: Vec<LayerSpec>,
    /// Layers the request gave an IMAGE function, which are not used: Lambda refuses layers
    /// on image functions and SAM ignores them, so the build goes on without them and says so.
    pub ignored_layers: Vec<LayerSpec>,
    /// True when an invoke image replaced the default base or the tag's repository.
    pub invoke_image_used: bool,
    /// The Dockerfile, without the fingerprint label.
    pub dockerfile: String,
    pub skip_pull_image: bool,
    pub force_image_build: bool,
}

/// SAM's `Runtime.get_image_name_tag`: `python3.12` + x86_64 -> `python:3.12-x86_64`.
pub fn runtime_image_name_tag(runtime: &str, arch: Arch) -> String {
    static NAME_VERSION: LazyLock<Regex> = LazyLock::new(|| {
        // The pattern is a constant; it compiles.
        Regex::new(r"^([a-z]+)([0-9][a-z0-9.]*)$").expect("constant regex")
    });
    let name_tag = if runtime == "provided" {
        "provided:alami".to_owned()
    } else if let Some(version) = runtime.strip_prefix("provided.") {
        format!("provided:{version}")
    } else if let Some(version) = runtime.strip_prefix("dotnet") {
        format!("dotnet:{version}")
    } else {
        NAME_VERSION.replace(runtime, "$1:$2").replace(".x", "")
    };
    if SINGLE_ARCH_RUNTIMES.contains(&runtime) {
        name_tag
    } else {
        format!("{name_tag}-{}", arch.as_str())
    }
}

/// SAM's layered tag: `samcli/lambda-<name:tag>-<sha256("-".join(names))[:25]>`.
fn layered_tag(runtime_name_tag: &str, layers: &[LayerSpec]) -> String {
    let joined = layers
        .iter()
        .map(|layer| layer.name.as_str())
        .collect::<Vec<_>>()
        .join("-");
    let digest = hex::encode(Sha256::digest(joined.as_bytes()));
    format!("{SAM_LAYERED_REPO}-{runtime_name_tag}-{}", &digest[..25])
}

/// The Dockerfile the assembled image is equivalent to (shown by Resolve, part of the
/// fingerprint as the image's definition): no RUN, so the base needs no shell.
pub fn dockerfile(base: &ImageRef, with_layers: bool) -> String {
    let mut text = format!("FROM {base}\nCOPY aws-lambda-rie {RIE_IMAGE_PATH}\n");
    if with_layers {
        text.push_str("COPY opt/ /opt/\n");
    }
    text
}

fn parse_reference(field: &str, text: &str) -> Result<ImageRef> {
    ImageRef::parse(text).map_err(|why| {
        Error::InvalidArgument(format!(
            "{field}: {text:?} is not a valid image reference ({why}); expected \
             [registry[:port]/]path[:tag][@sha256:<64 hex>], lower case"
        ))
    })
}

fn check_layers(layers: &[LayerSpec]) -> Result<()> {
    if layers.len() > MAX_LAYERS {
        return Err(Error::ResourceExhausted(format!(
            "layers: {} layers requested, the limit max_layers is {MAX_LAYERS}",
            layers.len()
        )));
    }
    for (index, layer) in layers.iter().enumerate() {
        if layer.name.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "layers[{index}].name: empty; every layer needs a name (SAM uses the logical ID)"
            )));
        }
        if layers[..index].iter().any(|other| other.name == layer.name) {
            return Err(Error::InvalidArgument(format!(
                "layers[{index}].name: {:?} is used by more than one layer; names must be unique",
                layer.name
            )));
        }
        if !layer.path.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "layers[{index}].path: {:?} is relative; send an absolute path (the daemon's \
                 working directory means nothing)",
                layer.path
            )));
        }
    }
    Ok(())
}

/// Resolves a request the way SAM does (see the module doc), with ZIP bases taken from `mirror` (`--base-image-mirror`, a validated prefix
/// without a trailing `/`): `<mirror>/<name:tag>` instead of `public.ecr.aws/lambda/<name:tag>`.
/// The tag stays SAM's (`public.ecr.aws/lambda/...`), so emulators still find the image; an
/// invoke image is used as given.
pub fn resolve_with(request: &Request, mirror: Option<&str>) -> Result<Plan> {
    let mut invoke_images = Vec::with_capacity(request.invoke_images.len());
    for (index, entry) in request.invoke_images.iter().enumerate() {
        let field = format!("invoke_images[{index}].image");
        invoke_images.push((
            entry.function.as_deref(),
            parse_reference(&field, &entry.image)?,
        ));
    }
    // SAM: `invoke_images.get(function_name, invoke_images.get(None))`.
    let invoke_image = invoke_images
        .iter()
        .find(|(function, _)| {
            function
                .is_some_and(|f| !request.function_name.is_empty() && f == request.function_name)
        })
        .or_else(|| {
            invoke_images
                .iter()
                .find(|(function, _)| function.is_none())
        })
        .map(|(_, image)| image.clone());

    match request.package_type {
        PackageType::Zip => zip_plan(request, mirror, invoke_image),
        PackageType::Image => image_plan(request, invoke_image),
    }
}

/// A ZIP function's plan: SAM's runtime base (or the invoke image), its tag with or without
/// layers (`LambdaImage.build`).
fn zip_plan(
    request: &Request,
    mirror: Option<&str>,
    invoke_image: Option<ImageRef>,
) -> Result<Plan> {
    let arch = request.arch;
    let runtime = request.runtime.as_str();
    if runtime.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "runtime: required for package type ZIP; one of: {}",
            RUNTIMES.join(", ")
        )));
    }
    if !RUNTIMES.contains(&runtime) {
        return Err(Error::InvalidArgument(format!(
            "runtime: {runtime:?} is not a runtime SAM supports; one of: {}",
            RUNTIMES.join(", ")
        )));
    }
    if arch == Arch::Arm64 && SINGLE_ARCH_RUNTIMES.contains(&runtime) {
        return Err(Error::InvalidArgument(format!(
            "architecture: runtime {runtime} has images for x86_64 only; use \
             architecture x86_64 or a runtime such as provided.al2023"
        )));
    }
    check_layers(&request.layers)?;
    let name_tag = runtime_image_name_tag(runtime, arch);
    let (base, tag_repo, prefix, invoke_image_used) = match invoke_image {
        Some(image) => {
            let repo = image.repository().to_owned();
            (image, repo, String::new(), true)
        }
        None => {
            let sam_base = parse_reference("runtime", &format!("{LAMBDA_REPO_PREFIX}/{name_tag}"))?;
            let base = match mirror {
                Some(mirror) => {
                    parse_reference("base_image_mirror", &format!("{mirror}/{name_tag}"))?
                }
                None => sam_base.clone(),
            };
            // SAM: the second field of `name:tag` split on ':' or '-'.
            let version = name_tag.split([':', '-']).nth(1).unwrap_or_default();
            let repo = sam_base.repository().to_owned();
            (base, repo, format!("{version}-"), false)
        }
    };
    let tag = if request.layers.is_empty() {
        format!("{tag_repo}:{prefix}rapid-{}", arch.as_str())
    } else {
        layered_tag(&name_tag, &request.layers)
    };
    Ok(Plan {
        tag: parse_reference("tag", &tag)?,
        dockerfile: dockerfile(&base, !request.layers.is_empty()),
        base,
        arch,
        package_type: PackageType::Zip,
        runtime: Some(runtime.to_owned()),
        layers: request.layers.clone(),
        ignored_layers: Vec::new(),
        invoke_image_used,
        skip_pull_image: request.skip_pull_image,
        force_image_build: request.force_image_build,
    })
}

/// An IMAGE function's plan: FROM its image, tagged `<repo>:rapid-<arch>` (an invoke image
/// renames the repository only); its layers are ignored, as SAM does.
fn image_plan(request: &Request, invoke_image: Option<ImageRef>) -> Result<Plan> {
    let arch = request.arch;
    if request.image.is_empty() {
        return Err(Error::InvalidArgument(
            "image: required for package type IMAGE (an image reference such as \
             myrepo/fn:v1)"
                .to_owned(),
        ));
    }
    let base = parse_reference("image", &request.image)?;
    // An invoke image renames the tag's repository only; FROM stays the function's image.
    let tag_repo = invoke_image
        .as_ref()
        .unwrap_or(&base)
        .repository()
        .to_owned();
    Ok(Plan {
        tag: parse_reference("tag", &format!("{tag_repo}:rapid-{}", arch.as_str()))?,
        dockerfile: dockerfile(&base, false),
        base,
        arch,
        package_type: PackageType::Image,
        runtime: None,
        layers: Vec::new(),
        ignored_layers: request.layers.clone(),
        invoke_image_used: invoke_image.is_some(),
        skip_pull_image: request.skip_pull_image,
        force_image_build: request.force_image_build,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn resolve(request: &Request) -> Result<Plan> {
        resolve_with(request, None)
    }

    /// A request with every optional part empty.
    fn zip(runtime: &str, arch: Arch) -> Request {
        Request {
            package_type: PackageType::Zip,
            runtime: runtime.to_owned(),
            image: String::new(),
            arch,
            layers: Vec::new(),
            invoke_images: Vec::new(),
            function_name: String::new(),
            skip_pull_image: false,
            force_image_build: false,
        }
    }

    fn layer(dir: &Path, name: &str) -> LayerSpec {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        LayerSpec {
            name: name.to_owned(),
            path,
        }
    }

    fn invalid(request: &Request) -> String {
        match resolve(request) {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    /// Every case in tests/data/sam_tags.json was produced by running SAM CLI's own
    /// `LambdaImage.build` (scripts/gen-sam-fixtures.py); we must give the same tag and base,
    /// except where SAM mangles a reference (`sam_is_wrong`) or rejects the request.
    #[test]
    fn matches_sam_for_every_recorded_case() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sam_tags.json"),
        )
        .unwrap();
        let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() > 200, "fixture looks truncated");
        let mut checked = 0;
        for case in cases {
            let str_of = |key: &str| case[key].as_str().unwrap_or_default().to_owned();
            let Some(arch) = Arch::parse(&str_of("architecture")) else {
                assert!(case["error"].as_bool().unwrap(), "{case}");
                continue;
            };
            let request = Request {
                package_type: match str_of("package_type").as_str() {
                    "Zip" => PackageType::Zip,
                    _ => PackageType::Image,
                },
                runtime: str_of("runtime"),
                image: str_of("image"),
                arch,
                layers: case["layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|name| layer(dir.path(), name.as_str().unwrap()))
                    .collect(),
                invoke_images: case["invoke_images"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(function, image)| InvokeImage {
                        function: (!function.is_empty()).then(|| function.clone()),
                        image: image.as_str().unwrap().to_owned(),
                    })
                    .collect(),
                function_name: str_of("function_name"),
                skip_pull_image: false,
                force_image_build: false,
            };
            if case["error"].as_bool().unwrap() {
                invalid(&request);
            } else {
                let plan = resolve(&request).unwrap_or_else(|e| panic!("{case}: {e}"));
                let expected = if case["sam_is_wrong"].as_bool().unwrap() {
                    str_of("expected_tag")
                } else {
                    str_of("tag")
                };
                assert_eq!(plan.tag.as_str(), expected, "{case}");
                assert_eq!(plan.base.as_str(), str_of("base_image"), "{case}");
            }
            checked += 1;
        }
        assert!(checked > 200);
    }

    #[test]
    fn design_examples() {
        let plan = resolve(&zip("python3.12", Arch::X86_64)).unwrap();
        assert_eq!(
            plan.tag.as_str(),
            "public.ecr.aws/lambda/python:3.12-rapid-x86_64"
        );
        let mirrored = resolve_with(
            &zip("python3.12", Arch::X86_64),
            Some("127.0.0.1:5055/lambda"),
        )
        .unwrap();
        assert_eq!(mirrored.tag, plan.tag, "a mirror keeps SAM's tag");
        assert_eq!(
            mirrored.base.as_str(),
            "127.0.0.1:5055/lambda/python:3.12-x86_64"
        );
        assert_eq!(
            plan.base.as_str(),
            "public.ecr.aws/lambda/python:3.12-x86_64"
        );
        assert_eq!(
            resolve(&zip("go1.x", Arch::X86_64)).unwrap().tag.as_str(),
            "public.ecr.aws/lambda/go:1-rapid-x86_64"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut request = zip("python3.12", Arch::X86_64);
        request.layers = vec![layer(dir.path(), "layerA"), layer(dir.path(), "layerB")];
        let plan = resolve(&request).unwrap();
        assert_eq!(
            plan.tag.as_str(),
            "samcli/lambda-python:3.12-x86_64-826cc3a931cbea33312dcc046"
        );
        assert_eq!(
            plan.dockerfile,
            "FROM public.ecr.aws/lambda/python:3.12-x86_64\n\
             COPY aws-lambda-rie /var/rapid/aws-lambda-rie\nCOPY opt/ /opt/\n"
        );
        let mut image = zip("", Arch::Arm64);
        image.package_type = PackageType::Image;
        image.image = format!("localhost:5000/team/fn@sha256:{}", "a".repeat(64));
        let plan = resolve(&image).unwrap();
        assert_eq!(plan.tag.as_str(), "localhost:5000/team/fn:rapid-arm64");
        assert!(!plan.dockerfile.contains("/opt"));
    }

    #[test]
    fn runtime_name_tags_follow_sam() {
        let cases = [
            ("nodejs20.x", "nodejs:20-x86_64"),
            ("java8.al2", "java:8.al2-x86_64"),
            ("dotnet8", "dotnet:8-x86_64"),
            ("provided", "provided:alami"),
            ("provided.al2023", "provided:al2023-x86_64"),
            ("go1.x", "go:1"),
            ("ruby4.0", "ruby:4.0-x86_64"),
        ];
        for (runtime, expected) in cases {
            assert_eq!(runtime_image_name_tag(runtime, Arch::X86_64), expected);
        }
    }

    #[test]
    fn invalid_requests_name_the_field() {
        assert!(invalid(&zip("python2.7", Arch::X86_64)).contains("python3.12"));
        assert!(invalid(&zip("", Arch::X86_64)).starts_with("runtime:"));
        assert!(invalid(&zip("go1.x", Arch::Arm64)).starts_with("architecture:"));
        assert!(invalid(&zip("provided", Arch::Arm64)).starts_with("architecture:"));

        let mut image = zip("", Arch::X86_64);
        image.package_type = PackageType::Image;
        assert!(invalid(&image).starts_with("image:"));
        image.image = "Bad/Ref".to_owned();
        assert!(invalid(&image).starts_with("image:"));

        let mut bad_invoke = zip("python3.12", Arch::X86_64);
        bad_invoke.invoke_images = vec![InvokeImage {
            function: None,
            image: "a b".into(),
        }];
        assert!(invalid(&bad_invoke).starts_with("invoke_images[0].image"));

        let dir = tempfile::tempdir().unwrap();
        let mut layers = zip("python3.12", Arch::X86_64);
        layers.layers = vec![layer(dir.path(), "a"), layer(dir.path(), "a")];
        assert!(invalid(&layers).contains("more than one layer"));
        layers.layers[1].name = String::new();
        assert!(invalid(&layers).starts_with("layers[1].name"));
        layers.layers[1] = LayerSpec {
            name: "b".into(),
            path: "rel/dir".into(),
        };
        assert!(invalid(&layers).contains("relative"));
        layers.layers[1] = LayerSpec {
            name: "b".into(),
            path: dir.path().join("missing"),
        };
        // Resolving does no I/O: a missing path is the service's NOT_FOUND (it checks the
        // paths with the client's rights), not resolve's.
        assert!(resolve(&layers).is_ok());
    }

    #[test]
    fn function_invoke_image_beats_global() {
        let mut request = zip("python3.12", Arch::X86_64);
        request.function_name = "HelloFn".into();
        request.invoke_images = vec![
            InvokeImage {
                function: None,
                image: "global/img:1".into(),
            },
            InvokeImage {
                function: Some("HelloFn".into()),
                image: "localhost:5000/hello:2".into(),
            },
        ];
        let plan = resolve(&request).unwrap();
        assert_eq!(plan.base.as_str(), "localhost:5000/hello:2");
        assert_eq!(plan.tag.as_str(), "localhost:5000/hello:rapid-x86_64");
        request.function_name = "Other".into();
        let plan = resolve(&request).unwrap();
        assert_eq!(plan.tag.as_str(), "global/img:rapid-x86_64");
    }
}
