"""The LambdaImage.build wrapper, in process: it returns exactly the tag SAM's own
`LambdaImage.build` returns, falls back to SAM when the daemon cannot help, and the .pth hook
installs it only when asked.

SAM's real `build` runs here with a stand-in engine client (no image exists, building is a
no-op), so its tag logic — runtime names, arch suffixes, layer hash, invoke images, image
functions — is SAM 1.170.0's own code, compared with `sam_tag` and with the daemon's Resolve.
"""

import logging
import os
import subprocess
import sys

import docker
import pytest
from samcli.local.docker.lambda_image import LambdaImage

from lambda_imaged_client import connect
from lambda_imaged_client import sam as integration


class FakeImages:
    def get(self, name):
        raise docker.errors.ImageNotFound(f"no such image: {name}")

    def list(self, name=None):
        return []


class FakeEngine:
    images = FakeImages()


class Layer:
    """The attributes SAM's LambdaImage uses of samcli.lib.providers.provider.LayerVersion."""

    def __init__(self, name, codeuri):
        self.name = name
        self.codeuri = codeuri
        self.is_defined_within_template = True


class Downloader:
    layer_cache = "/tmp"

    def download_all(self, layers, force=False):
        return list(layers)


def sam_image(invoke_images=None) -> LambdaImage:
    image = LambdaImage(Downloader(), True, False, docker_client=FakeEngine(), invoke_images=invoke_images)
    image._build_image = lambda *args, **kwargs: None  # the engine build is not what is compared
    return image


def sam_build(image: LambdaImage, *args, **kwargs) -> str:
    original = getattr(LambdaImage.build, "__wrapped_sam_build__", LambdaImage.build)
    return original(image, *args, **kwargs)


CASES = [
    # (runtime, packagetype, image, layer names, architecture, function_name, invoke_images)
    ("python3.12", "Zip", None, [], "x86_64", "Fn", None),
    ("nodejs20.x", "Zip", None, [], "arm64", "Fn", None),
    ("provided", "Zip", None, [], "x86_64", "Fn", None),
    ("go1.x", "Zip", None, [], "x86_64", "Fn", None),
    ("java8.al2", "Zip", None, [], "arm64", "Fn", None),
    ("dotnet8", "Zip", None, [], "x86_64", "Fn", None),
    ("provided.al2023", "Zip", None, ["MessageLayer"], "x86_64", "Fn", None),
    ("python3.12", "Zip", None, ["layerA", "layerB"], "x86_64", "Fn", None),
    ("ruby3.3", "Zip", None, ["b", "a"], "arm64", "Fn", None),
    ("python3.12", "Zip", None, [], "x86_64", "Fn", {None: "myrepo/emu:latest"}),
    ("python3.12", "Zip", None, [], "x86_64", "Fn", {None: "myrepo/emu:latest", "Fn": "other/emu:v2"}),
    ("python3.12", "Zip", None, ["L1"], "x86_64", "Fn", {"Fn": "other/emu:v2"}),
    (None, "Image", "myrepo/fn:v1", [], "arm64", "Fn", None),
    (None, "Image", "myrepo/fn", [], "x86_64", "Fn", None),
    (None, "Image", "myrepo/fn:v1", [], "x86_64", "Fn", {"Fn": "emu/override:1"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[0] or c[2]}-{c[4]}-{len(c[3])}L")
def test_tag_is_sams(case, shared_daemon, tmp_path):
    """SAM's build, sam_tag and the daemon's Resolve agree on the tag."""
    runtime, packagetype, image, names, arch, function_name, invoke_images = case
    layers = [Layer(n, str(tmp_path / n)) for n in names]
    for layer in layers:
        os.mkdir(layer.codeuri)
    expected = sam_build(
        sam_image(invoke_images), runtime, packagetype, image, layers, arch, function_name=function_name
    )
    ours = integration.sam_tag(sam_image(invoke_images), runtime, packagetype, image, layers, arch, function_name)
    assert ours == expected
    with connect(shared_daemon.socket) as client:
        plan = client.resolve(
            package_type=packagetype,
            runtime=runtime or "",
            image=image or "",
            architecture=arch,
            layers=[(layer.name, layer.codeuri) for layer in layers],
            invoke_images=invoke_images,
            function_name=function_name,
        )
    assert plan.tag == expected


def test_malformed_sam_tag_is_left_to_sam(daemon, monkeypatch):
    """For `host:port/repo@digest` SAM's tag is `host:rapid-arm64`; the daemon will not make
    that, so the wrapper lets SAM build and returns SAM's tag, having built nothing."""
    ref = "localhost:5000/team/fn@sha256:" + "a" * 64
    calls = []

    def original(self, *args):
        calls.append(args)
        return "from-sam"

    monkeypatch.setenv("LAMBDA_IMAGED_SOCKET", daemon.socket)
    image = sam_image()
    tag = integration.build_with_daemon(original, image, None, "Image", ref, [], "arm64", None, "Fn")
    assert tag == "from-sam" and len(calls) == 1
    assert integration.sam_tag(image, None, "Image", ref, [], "arm64", "Fn") == "localhost:rapid-arm64"
    with connect(daemon.socket) as client:
        assert not client.list_builds().in_flight and not client.list_builds().recent


def hooked(env) -> str:
    code = (
        "import samcli.local.docker.lambda_image as m, samcli.local.lambdafn.runtime as r, sys; "
        "print(getattr(m.LambdaImage.build, '__lambda_imaged__', False), "
        "getattr(r.LambdaRuntime._unarchived_layer, '__lambda_imaged__', False), 'grpc' in sys.modules)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()


def test_pth_hook_patches_sam_only_when_asked():
    """The installed .pth wraps LambdaImage.build and LambdaRuntime._unarchived_layer on import
    when the variables ask for it, and leaves SAM alone otherwise; it never imports grpc before
    a build."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_IMAGED")}
    assert hooked(base) == "False False False"
    assert hooked({**base, "LAMBDA_IMAGED_SOCKET": "/nonexistent.sock"}) == "True True False"
    assert hooked({**base, "LAMBDA_IMAGED": "1"}) == "True True False"
    assert hooked({**base, "LAMBDA_IMAGED_SOCKET": "/x.sock", "LAMBDA_IMAGED": "0"}) == "False False False"


def recording_original(calls):
    def original(self, *args):
        calls.append(args)
        return "built-by-sam"

    return original


def test_daemon_refusal_falls_back_with_the_daemons_error(daemon, tmp_path, monkeypatch, caplog):
    """A request the daemon refuses (here a layer that is a plain file) is built by SAM, after a
    warning carrying the daemon's status and message."""
    not_a_layer = tmp_path / "layer.txt"
    not_a_layer.write_text("x")
    monkeypatch.setenv("LAMBDA_IMAGED_SOCKET", daemon.socket)
    calls = []
    with caplog.at_level(logging.WARNING, logger="samcli.lambda_imaged"):
        tag = integration.build_with_daemon(
            recording_original(calls),
            sam_image(),
            "python3.12",
            "Zip",
            None,
            [Layer("FileLayer", str(not_a_layer))],
            "x86_64",
            None,
            "Fn",
        )
    assert tag == "built-by-sam" and len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lambda-imaged could not build" in warnings[0], warnings
    assert "SAM builds it itself" in warnings[0]


def test_unreachable_daemon_warns_once_per_process(workdir, monkeypatch, caplog):
    """Every build falls back to SAM while the socket is dead, with a single warning."""
    monkeypatch.setattr(integration, "_warned_unreachable", False)
    monkeypatch.setenv("LAMBDA_IMAGED_SOCKET", str(workdir / "gone.sock"))
    calls = []
    with caplog.at_level(logging.WARNING, logger="samcli.lambda_imaged"):
        for _ in range(3):
            integration.build_with_daemon(
                recording_original(calls), sam_image(), "python3.12", "Zip", None, [], "x86_64", None, "Fn"
            )
    assert len(calls) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is not reachable at" in warnings[0], warnings
