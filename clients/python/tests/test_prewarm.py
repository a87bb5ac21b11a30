"""`lambda-imaged-prewarm` and the background prewarm of `sam local start-lambda`, with the real
SAM CLI reading a template of every kind the prewarm covers: two runtimes, x86_64 and arm64,
Globals giving a layer, a layer shared by several functions, a directory and a zip layer, a
function in a nested stack (`AWS::Serverless::Application` with a local Location), an IMAGE
function, and two functions sharing one image.

Layer logical IDs are unique per test (SAM's tag hashes layer names only), so every test starts
without images of its own; the engine is shared with other tests, so engine events are only
counted for this test's tags, and builds are counted by the test's own daemon.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lambda_imaged_client import connect

from conftest import (
    BOOTSTRAP,
    FINGERPRINT_LABEL,
    SAM,
    SAM_TIMEOUT_S,
    docker,
    engine_tag_events,
    image_label,
    lambda_client,
    sam_layered_tag,
    start_lambda,
    stop_server,
    write_zip_layer,
)

PREWARM = Path(SAM).with_name("lambda-imaged-prewarm")

ROOT_TEMPLATE = """\
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Parameters:
  Arch:
    Type: String
    Default: x86_64
Globals:
  Function:
    Timeout: 30
    Layers:
      - !Ref {shared}
Resources:
  ProvidedFn:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: provided.al2023
      Handler: bootstrap
      CodeUri: fn/
      Architectures: [x86_64]
      Layers: [!Ref {dir}]
  TwinFn:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: provided.al2023
      Handler: bootstrap
      CodeUri: fn/
      Architectures: [!Ref Arch]
      Layers: [!Ref {dir}]
  ArmFn:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: provided.al2023
      Handler: bootstrap
      CodeUri: fn/
      Architectures: [arm64]
      Layers: [!Ref {zip}]
  PythonFn:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: python3.12
      Handler: bootstrap
      CodeUri: fn/
      Architectures: [x86_64]
      Layers: [!Ref {zip}, !Ref {dir}]
  ImageFn:
    Type: AWS::Serverless::Function
    Properties:
      PackageType: Image
      ImageUri: {image}
      ImageConfig:
        Command: [handler]
      Architectures: [x86_64]
  Child:
    Type: AWS::Serverless::Application
    Properties:
      Location: child/template.yaml
  {shared}:
    Type: AWS::Serverless::LayerVersion
    Properties:
      ContentUri: layers/shared/
  {dir}:
    Type: AWS::Serverless::LayerVersion
    Properties:
      ContentUri: layers/dir/
  {zip}:
    Type: AWS::Serverless::LayerVersion
    Properties:
      ContentUri: layers/zip.zip
"""

CHILD_TEMPLATE = """\
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Resources:
  ChildFn:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: python3.12
      Handler: bootstrap
      CodeUri: fn/
      Timeout: 30
      Layers: [!Ref {child}]
  {child}:
    Type: AWS::Serverless::LayerVersion
    Properties:
      ContentUri: layer/
"""

UNSUPPORTED = """\
  OldFn:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: python2.7
      Handler: bootstrap
      CodeUri: fn/
"""


class PrewarmProject:
    """The template above in `root`, with layers whose /opt/message.txt names the layer, and
    an image function's image (the stand-in base plus the bootstrap) tagged uniquely."""

    def __init__(self, root: Path):
        suffix = os.urandom(5).hex()
        self.root = root
        self.ids = {k: f"{k.capitalize()}Layer{suffix}" for k in ("shared", "dir", "zip", "child")}
        self.image = f"limg-prewarm-{suffix}:v1"
        (root / "layers" / "shared").mkdir(parents=True)
        (root / "layers" / "dir").mkdir()
        (root / "child" / "layer").mkdir(parents=True)
        for fn_dir in (root / "fn", root / "child" / "fn"):
            fn_dir.mkdir()
            shutil.copy(BOOTSTRAP, fn_dir / "bootstrap")
            os.chmod(fn_dir / "bootstrap", 0o755)
        (root / "layers" / "shared" / "message.txt").write_text("shared")
        (root / "layers" / "shared" / "shared.txt").write_text("shared")
        (root / "layers" / "dir" / "message.txt").write_text("dir")
        write_zip_layer(root / "layers" / "zip.zip", {"message.txt": "zip"})
        (root / "child" / "layer" / "message.txt").write_text("child")
        (root / "template.yaml").write_text(ROOT_TEMPLATE.format(image=self.image, **self.ids))
        (root / "child" / "template.yaml").write_text(CHILD_TEMPLATE.format(child=self.ids["child"]))
        self._make_image()
        i = self.ids
        shared_dir = sam_layered_tag("provided:al2023-x86_64", [i["shared"], i["dir"]])
        #: function full path -> (SAM's tag, what the function answers as "layer")
        self.functions = {
            "ProvidedFn": (shared_dir, "dir"),
            "TwinFn": (shared_dir, "dir"),
            "ArmFn": (sam_layered_tag("provided:al2023-arm64", [i["shared"], i["zip"]]), "zip"),
            "PythonFn": (sam_layered_tag("python:3.12-x86_64", [i["shared"], i["zip"], i["dir"]]), "dir"),
            "ImageFn": (f"{self.image.split(':')[0]}:rapid-x86_64", ""),
            "Child/ChildFn": (sam_layered_tag("python:3.12-x86_64", [i["child"]]), "child"),
        }

    def _make_image(self) -> None:
        context = self.root / "image"
        context.mkdir()
        shutil.copy(BOOTSTRAP, context / "bootstrap")
        (context / "Dockerfile").write_text(
            "FROM public.ecr.aws/lambda/provided:al2023-x86_64\nCOPY bootstrap /var/runtime/bootstrap\n"
        )
        docker("build", "-q", "-t", self.image, str(context), timeout=180)

    def tags(self) -> set:
        return {tag for tag, _ in self.functions.values()}

    def env(self, socket=None, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_IMAGED")}
        env.update(SAM_CLI_TELEMETRY="0", AWS_EC2_METADATA_DISABLED="true")
        if socket is not None:
            env["LAMBDA_IMAGED_SOCKET"] = str(socket)
        env.update(extra)
        return env

    def prewarm(self, socket, *args):
        """Runs `lambda-imaged-prewarm --json`; returns (exit code, events, stderr)."""
        proc = subprocess.run(
            [str(PREWARM), "--json", "--skip-pull-image", "--socket", str(socket), *args],
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=SAM_TIMEOUT_S * 2,
            stdin=subprocess.DEVNULL,
        )
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        return proc.returncode, events, proc.stderr

    def invoke(self, function, socket):
        """`sam local invoke FUNCTION`; returns (completed process, the last stdout line)."""
        (self.root / "event.json").write_text("{}")
        proc = subprocess.run(
            [str(SAM), "local", "invoke", function, "--skip-pull-image", "-e", "event.json"],
            cwd=self.root,
            env=self.env(socket),
            capture_output=True,
            text=True,
            timeout=SAM_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        return proc, (lines[-1] if lines else "")

    def cleanup(self) -> None:
        docker("image", "rm", "-f", *self.tags(), self.image, check=False)


@pytest.fixture
def project(engine, tmp_path):
    p = PrewarmProject(tmp_path / "app")
    yield p
    p.cleanup()


def _engine_builds(daemon) -> int:
    with connect(daemon.socket) as client:
        return client.info().stats.engine_builds


def _tag_events(tags, since, until) -> int:
    return sum(engine_tag_events(tag, since, until) for tag in tags)


def test_prewarm_builds_every_image_and_invokes_then_build_nothing(daemon, project):
    """One prewarm builds the five distinct images of six functions (two share one), with the
    tags SAM computes; then `sam local invoke` of each function builds and loads nothing and
    answers with its own layers (the arm64 one cannot run on this x86_64 machine: its image's
    /opt is read instead)."""
    t0 = time.time()
    code, events, stderr = project.prewarm(daemon.socket)
    assert code == 0, (events, stderr)
    plan = [e for e in events if e["event"] == "plan"][0]
    planned = {tuple(sorted(image["functions"])): image["tag"] for image in plan["images"]}
    expected = {}
    for function, (tag, _) in project.functions.items():
        expected.setdefault(tag, []).append(function)
    assert planned == {tuple(sorted(fns)): tag for tag, fns in expected.items()}
    ready = {e["tag"] for e in events if e["event"] == "ready"}
    assert ready == project.tags()
    assert events[-1] == {"event": "done", "ready": 5, "failed": 0, "unpreparable": 0}
    assert _tag_events(project.tags(), t0, time.time()) == 5
    for tag in project.tags():
        assert image_label(tag, FINGERPRINT_LABEL), tag

    builds = _engine_builds(daemon)
    for function, (tag, message) in project.functions.items():
        t1 = time.time()
        proc, answer = project.invoke(function, daemon.socket)
        assert f"lambda-imaged: image {tag} is up to date" in proc.stderr, (function, proc.stderr)
        if function == "ArmFn":
            continue
        assert proc.returncode == 0, (function, proc.stderr)
        assert json.loads(answer) == {"echo": {}, "layer": message}, (function, answer)
        assert _tag_events(project.tags(), t1, time.time()) == 0
    assert _engine_builds(daemon) == builds, "an invoke after the prewarm built an image"
    arm_tag = project.functions["ArmFn"][0]
    opt = docker("run", "--rm", "--entrypoint", "/bin/cat", arm_tag, "/opt/message.txt", "/opt/shared.txt")
    assert opt == "zipshared"


def test_prewarm_of_chosen_functions_and_a_second_run_is_all_up_to_date(daemon, project):
    """`--function` limits the prewarm (a nested function by its full path); a repeat finds
    every image up to date and builds nothing."""
    code, events, _ = project.prewarm(daemon.socket, "--function", "Child/ChildFn", "--function", "ProvidedFn")
    assert code == 0
    assert {e["tag"] for e in events if e["event"] == "ready"} == {
        project.functions["Child/ChildFn"][0],
        project.functions["ProvidedFn"][0],
    }
    builds = _engine_builds(daemon)
    code, events, _ = project.prewarm(daemon.socket, "--function", "Child/ChildFn", "--function", "ProvidedFn")
    assert code == 0
    assert all(e["cached"] for e in events if e["event"] == "ready")
    assert _engine_builds(daemon) == builds


def test_unpreparable_function_is_named_and_the_exit_code_is_non_zero(daemon, project):
    """An unsupported runtime is named with SAM's reason and makes the exit code non-zero; the
    other functions' images are still built. An unknown `--function` is named too."""
    template = project.root / "template.yaml"
    text = template.read_text()
    template.write_text(text.replace("Resources:\n", "Resources:\n" + UNSUPPORTED, 1))
    code, events, stderr = project.prewarm(daemon.socket)
    assert code == 1, (events, stderr)
    unpreparable = [e for e in events if e["event"] == "unpreparable"]
    assert unpreparable == [{"event": "unpreparable", "function": "OldFn", "reason": unpreparable[0]["reason"]}]
    assert "Unsupported Lambda runtime: python2.7" in unpreparable[0]["reason"]
    assert {e["tag"] for e in events if e["event"] == "ready"} == project.tags()
    assert events[-1] == {"event": "done", "ready": 5, "failed": 0, "unpreparable": 1}

    code, events, _ = project.prewarm(daemon.socket, "--function", "NoSuchFn")
    assert code == 1
    assert [e["function"] for e in events if e["event"] == "unpreparable"] == ["NoSuchFn"]


def test_prewarm_uses_sams_built_template_and_parameter_overrides(daemon, project):
    """With `.aws-sam/build/template.yaml` present (as `sam build` leaves it) the prewarm reads
    that one, as SAM does; `--parameter-overrides` reach SAM's providers (TwinFn's Arch)."""
    build = project.root / ".aws-sam" / "build"
    shutil.copytree(project.root, build, ignore=shutil.ignore_patterns(".aws-sam"))
    # Only TwinFn in the built template.
    (build / "template.yaml").write_text(
        ROOT_TEMPLATE.format(image=project.image, **project.ids).split("  ArmFn:")[0]
        + "  {shared}:\n    Type: AWS::Serverless::LayerVersion\n    Properties:\n      ContentUri: layers/shared/\n"
        "  {dir}:\n    Type: AWS::Serverless::LayerVersion\n    Properties:\n      ContentUri: layers/dir/\n".format(
            **project.ids
        )
    )
    code, events, stderr = project.prewarm(
        daemon.socket, "--function", "TwinFn", "--parameter-overrides", "ParameterKey=Arch,ParameterValue=arm64"
    )
    assert code == 0, (events, stderr)
    arm = sam_layered_tag("provided:al2023-arm64", [project.ids["shared"], project.ids["dir"]])
    try:
        assert [e["tag"] for e in events if e["event"] == "ready"] == [arm]
    finally:
        docker("image", "rm", "-f", arm, check=False)


def test_start_lambda_prewarms_every_function_before_any_request(daemon, project):
    """`sam local start-lambda` with the drop-in: every function's image exists before any
    request (polled in the engine), then each request is answered without a build."""
    tags = project.tags()
    log_path = project.root / "start-lambda.log"
    server, port = start_lambda(project.root, project.env(daemon.socket), log_path)
    try:
        deadline = time.monotonic() + SAM_TIMEOUT_S
        missing = set(tags)
        while missing:
            if server.poll() is not None:
                raise AssertionError(f"start-lambda exited ({server.returncode}):\n{log_path.read_text()}")
            assert time.monotonic() < deadline, f"not prewarmed: {missing}\n{log_path.read_text()}"
            missing = {tag for tag in missing if image_label(tag, FINGERPRINT_LABEL) is None}
            time.sleep(0.2)  # a poll interval, not a synchronisation: the loop checks the engine
        _wait_for_log(log_path, "lambda-imaged: prewarmed 5 of 5 image(s)", server)
        with connect(daemon.socket) as client:
            assert client.info().stats.engine_builds == 5

        lambda_api = lambda_client(port)
        t0 = time.time()
        for function, full_path in [
            ("ProvidedFn",) * 2,
            ("PythonFn",) * 2,
            ("ImageFn",) * 2,
            ("ChildFn", "Child/ChildFn"),
        ]:
            out = lambda_api.invoke(FunctionName=function, Payload=b"{}")
            answer = json.loads(out["Payload"].read())
            assert answer == {"echo": {}, "layer": project.functions[full_path][1]}, (
                function,
                answer,
                log_path.read_text(),
            )
        assert _tag_events(tags, t0, time.time()) == 0
        with connect(daemon.socket) as client:
            assert client.info().stats.engine_builds == 5
    finally:
        stop_server(server)


def test_start_lambda_prewarm_off_with_lambda_imaged_prewarm_0(daemon, project):
    """LAMBDA_IMAGED_PREWARM=0: start-lambda prewarms nothing; a request builds its own image
    only (one request, one build in the daemon)."""
    log_path = project.root / "start-lambda.log"
    server, port = start_lambda(project.root, project.env(daemon.socket, LAMBDA_IMAGED_PREWARM="0"), log_path)
    try:
        _wait_for_log(log_path, "Running on http://127.0.0.1", server)
        out = lambda_client(port).invoke(FunctionName="ProvidedFn", Payload=b"{}")
        assert json.loads(out["Payload"].read()) == {"echo": {}, "layer": "dir"}
        with connect(daemon.socket) as client:
            stats = client.info().stats
        assert (stats.requests, stats.engine_builds) == (1, 1), log_path.read_text()
        assert "lambda-imaged: prewarmed" not in log_path.read_text()
    finally:
        stop_server(server)


def _wait_for_log(path, text, server, timeout=SAM_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}):\n{path.read_text()}")
        assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{path.read_text()}"
        time.sleep(0.1)
