#!/usr/bin/env python3
"""Generate tests/data/sam_tags.json from the REAL AWS SAM CLI code.

For every case we call SAM's own `LambdaImage.build()` (samcli/local/docker/lambda_image.py)
with a mocked docker client (the image "does not exist", so SAM decides to build) and a mocked
`_build_image`, and record the tag and the FROM image SAM would build. Before that we run SAM's
own gate `validate_architecture_runtime()` (what `sam local invoke/start-*` applies before
building): a case it rejects is recorded with "error": true, and what `build()` alone would have
produced is kept in `unvalidated_tag` / `unvalidated_base_image`.

Usage (no docker engine and no network needed once SAM is installed):

    python3 -m venv /tmp/samvenv && /tmp/samvenv/bin/pip install aws-sam-cli==1.170.0
    /tmp/samvenv/bin/python scripts/gen-sam-fixtures.py > tests/data/sam_tags.json
"""

import json
import sys
from importlib.metadata import version
from unittest.mock import MagicMock, Mock, patch

import docker.errors

from samcli.commands.local.lib.exceptions import UnsupportedRuntimeArchitectureError
from samcli.lib.providers.provider import LayerVersion
from samcli.lib.utils.architecture import validate_architecture_runtime
from samcli.lib.utils.packagetype import IMAGE, ZIP
from samcli.local.docker import lambda_image as li
from samcli.local.docker.lambda_image import LambdaImage, Runtime

ARCHS = ["x86_64", "arm64"]
LAYER_SETS = [[], ["layerA"], ["layerA", "layerB", "layerC"]]
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGES = [
    "myrepo/fn:v1",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/fn:latest",
    "fn",
    "localhost:5000/team/fn:v2",
    f"localhost:5000/team/fn@{DIGEST}",
    f"team/fn@{DIGEST}",
]
# Runtimes SAM does not know, and an architecture it does not know: rejected before build().
UNKNOWN_RUNTIMES = ["python2.7", "nodejs14.x", "java8", "provided.al3"]
ARN_LAYERS = [
    "arn:aws:lambda:us-east-1:123456789012:layer:shared:3",
    "arn:aws:lambda:eu-west-1:111122223333:layer:my-deps:12",
]


def proper_repo(ref):
    """Repository part of an image reference: without digest and tag, spelling kept."""
    ref = ref.split("@", 1)[0]
    colon, slash = ref.rfind(":"), ref.rfind("/")
    return ref[:colon] if colon > slash else ref


def make_layer(name):
    # A template-defined layer (logical ID `name`, local codeuri), as SAM's provider builds it.
    return LayerVersion(name, f"/nonexistent/{name}")


def run_build(package_type, runtime, image, arch, layer_names, function_name, invoke_images):
    """Call SAM's LambdaImage.build() with everything docker-related mocked.

    Returns (tag, from_image)."""
    layers = [make_layer(n) for n in layer_names]
    downloader = Mock()
    downloader.download_all.side_effect = lambda ls, force=False: list(ls)
    downloader.layer_cache = "/nonexistent/cache"

    docker_client = MagicMock()
    docker_client.images.get.side_effect = docker.errors.ImageNotFound("not found")
    docker_client.images.list.return_value = []

    lock = Mock()
    lock.acquire_lock.return_value = True

    with patch.object(li, "cleanup_stale_locks"), patch.object(li, "FileLock", return_value=lock), patch.object(
        li, "platform", Mock(system=Mock(return_value="Linux"))
    ):
        img = LambdaImage(downloader, True, False, docker_client=docker_client, invoke_images=invoke_images)
        img._build_image = Mock()
        tag = img.build(runtime, package_type, image, layers, arch, stream=Mock(), function_name=function_name)

    assert img._build_image.call_count == 1, "SAM did not build"
    args, _ = img._build_image.call_args
    from_image, docker_tag, built_layers = args[0], args[1], args[2]
    assert docker_tag == tag, (docker_tag, tag)
    assert [l.name for l in built_layers] == (layer_names if package_type == ZIP else []), built_layers

    # Same tag when the image already exists (no build): SAM returns the tag without building.
    docker_client2 = MagicMock()
    with patch.object(li, "cleanup_stale_locks"), patch.object(li, "FileLock", return_value=lock), patch.object(
        li, "platform", Mock(system=Mock(return_value="Linux"))
    ):
        img2 = LambdaImage(downloader, True, False, docker_client=docker_client2, invoke_images=invoke_images)
        img2._build_image = Mock()
        tag2 = img2.build(
            runtime, package_type, image, [make_layer(n) for n in layer_names], arch, stream=Mock(),
            function_name=function_name,
        )
    assert tag2 == tag, (tag2, tag)
    return tag, from_image


def sam_gate(package_type, runtime, arch):
    """SAM's pre-build validation (local_lambda.py → validate_architecture_runtime)."""
    fn = Mock(packagetype=package_type, runtime=runtime, architectures=[arch])
    try:
        validate_architecture_runtime(fn)
        return None
    except UnsupportedRuntimeArchitectureError as e:
        return str(e)


def case(package_type, runtime, image, arch, layer_names, function_name=None, invoke_images=None):
    invoke_images = invoke_images or {}
    out = {
        "package_type": "Zip" if package_type == ZIP else "Image",
        "runtime": runtime,
        "image": image,
        "architecture": arch,
        "layers": list(layer_names),
        "function_name": function_name,
        "invoke_images": {("" if k is None else k): v for k, v in invoke_images.items()},
    }
    err = sam_gate(package_type, runtime, arch)
    tag, base = run_build(package_type, runtime, image, arch, layer_names, function_name, invoke_images or None)
    if err is not None:
        out.update(
            tag=None, base_image=None, sam_is_wrong=False, error=True, error_message=err,
            unvalidated_tag=tag, unvalidated_base_image=base,
        )
        return out

    out.update(tag=tag, base_image=base, sam_is_wrong=False)
    # Which reference gives the tag its repository (only for un-layered / IMAGE tags).
    if package_type == IMAGE or not layer_names:
        ref = invoke_images.get(function_name, invoke_images.get(None)) or image or base
        sam_repo = ref.split(":")[0].replace("@", "")
        assert tag.startswith(sam_repo + ":"), (tag, sam_repo)
        expected = proper_repo(ref) + ":" + tag[len(sam_repo) + 1 :]
        if expected != tag:
            out.update(sam_is_wrong=True, expected_tag=expected)
    out["error"] = False
    return out


def main():
    cases = []
    runtimes = [r.value for r in Runtime]

    # 1. Every ZIP runtime x arch x layers.
    for rt in runtimes:
        for arch in ARCHS:
            for ls in LAYER_SETS:
                cases.append(case(ZIP, rt, None, arch, ls))

    # 2. Runtimes / architecture SAM rejects.
    for rt in UNKNOWN_RUNTIMES:
        for arch in ARCHS:
            cases.append(case(ZIP, rt, None, arch, []))
    cases.append(case(ZIP, "python3.12", None, "amd64", []))

    # 3. IMAGE package type (layers are ignored).
    for image in IMAGES:
        for arch in ARCHS:
            for ls in [[], ["layerA"]]:
                cases.append(case(IMAGE, None, image, arch, ls))

    # 4. Invoke images, ZIP python3.12.
    g, h, o = "myimages/base:1", "myimages/hello:2", "myimages/other:3"
    invoke_sets = [
        ("HelloFn", {None: g}),  # global only
        (None, {None: g}),  # global only, no function name
        ("HelloFn", {"HelloFn": h}),  # function entry only
        ("HelloFn", {None: g, "HelloFn": h}),  # both: function wins
        ("HelloFn", {"OtherFn": o}),  # another function's entry only: none applies
        (None, {"HelloFn": h}),  # function entry, no function name: none applies
        ("HelloFn", {None: g, "OtherFn": o}),  # another function's entry + global: global
        ("HelloFn", {None: "localhost:5000/base:1"}),  # registry with port (SAM mangles)
        ("HelloFn", {None: f"myimages/base@{DIGEST}"}),  # digest (SAM mangles)
    ]
    for fn, inv in invoke_sets:
        for arch in ARCHS:
            for ls in [[], ["layerA"]]:
                cases.append(case(ZIP, "python3.12", None, arch, ls, fn, inv))

    # 5. Invoke images, IMAGE package type.
    for fn, inv in invoke_sets[:5]:
        for arch in ARCHS:
            cases.append(case(IMAGE, None, "myrepo/fn:v1", arch, [], fn, inv))

    # SAM's name for ARN (non-template) layers: <name>-<version>-<sha256(arn)[:10]>.
    arn_names = [{"arn": a, "name": LayerVersion(a, None).name} for a in ARN_LAYERS]

    doc = {
        "sam_version": version("aws-sam-cli"),
        "generator": "scripts/gen-sam-fixtures.py",
        "runtimes": runtimes,
        "arn_layer_names": arn_names,
        "cases": cases,
    }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
