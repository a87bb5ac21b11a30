"""Fixtures: the private test engine (scripts/test-env.sh), a real daemon on a temp socket, and
SAM projects with a provided.al2023 function (tests/fixtures/bootstrap) and a template layer.

Everything is real: the pinned aws-sam-cli from PyPI in this venv, the daemon binary
(`LAMBDA_IMAGED_BIN`, default target/debug/lambda-imaged), a private dockerd with the busybox
stand-in base images. Every wait is bounded.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BOOTSTRAP = ROOT / "tests" / "fixtures" / "bootstrap"
SAM = Path(sys.executable).with_name("sam")

SAM_TIMEOUT_S = 180
DAEMON_START_S = 30


def _load_test_env() -> None:
    """Exports DOCKER_HOST and LAMBDA_IMAGED_RIE_DIR from scripts/test-env.sh (idempotent)."""
    if os.environ.get("LAMBDA_IMAGED_TEST_ENV_LOADED"):
        return
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test-env.sh")],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    ).stdout
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            os.environ[key] = value
    os.environ["LAMBDA_IMAGED_TEST_ENV_LOADED"] = "1"


@pytest.fixture(scope="session")
def engine():
    """The private dockerd's DOCKER_HOST; the base images and RIE exist there."""
    _load_test_env()
    for var in ("LAMBDA_IMAGED_SOCKET", "LAMBDA_IMAGED"):
        os.environ.pop(var, None)
    return os.environ["DOCKER_HOST"]


def docker(*args, timeout=60, check=True) -> str:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True, timeout=timeout).stdout


def engine_tag_events(tag: str, since: float, until: float) -> int:
    """How many times the engine itself tagged `tag` between the two times (one per build)."""
    out = docker(
        "events",
        "--since",
        f"{since:.6f}",
        "--until",
        f"{until:.6f}",
        "--filter",
        "type=image",
        "--filter",
        "event=tag",
        "--format",
        "{{.Actor.Attributes.name}}",
    )
    return sum(1 for line in out.splitlines() if line.strip() == tag)


def image_label(tag: str, label: str):
    """The image's label value, None when the image or the label is missing."""
    out = docker("image", "inspect", "-f", "{{json .Config.Labels}}", tag, check=False).strip()
    if not out:
        return None
    return (json.loads(out) or {}).get(label)


FINGERPRINT_LABEL = "io.lambda-imaged.fingerprint"


class Daemon:
    """A lambda-imaged process on its own socket and cache dir."""

    def __init__(self, binary: Path, workdir: Path, *, engine: Optional[str] = None, keep_warm: str = "0"):
        self.binary = binary
        #: `--engine` for the daemon; None: $DOCKER_HOST, the private test engine.
        self.engine = engine
        #: `--keep-warm`; off by default, so background rebuilds never race with counted builds.
        self.keep_warm = keep_warm
        self.socket = str(workdir / "d.sock")
        self.cache = workdir / "cache"
        self.log_path = workdir / "daemon.log"
        self.proc = None

    def start(self) -> "Daemon":
        """Starts the daemon and waits until it answers GetInfo."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_IMAGED_SOCKET")}
        engine = ["--engine", self.engine] if self.engine else []
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "--socket",
                self.socket,
                "--cache-dir",
                str(self.cache),
                "--rie-dir",
                os.environ["LAMBDA_IMAGED_RIE_DIR"],
                "--shutdown-timeout",
                "10",
                "--keep-warm",
                self.keep_warm,
                *engine,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        from lambda_imaged_client import DaemonError, connect

        deadline = time.monotonic() + DAEMON_START_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lambda-imaged exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with connect(self.socket, timeout=2) as client:
                    client.info()
                return self
            except DaemonError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"lambda-imaged did not answer in {DAEMON_START_S} s:\n{self.log()}") from err
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def daemon_binary():
    path = Path(os.environ.get("LAMBDA_IMAGED_BIN", ROOT / "target" / "debug" / "lambda-imaged"))
    if not path.is_file():
        pytest.fail(f"no daemon binary at {path}: run `cargo build --bins` (or set LAMBDA_IMAGED_BIN)")
    return path


@pytest.fixture
def workdir():
    # Short: a Unix socket path must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="limg-py-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(engine, daemon_binary, workdir):
    """A daemon of this test's own (it may be stopped, its builds are counted)."""
    d = Daemon(daemon_binary, workdir).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def shared_daemon(engine, daemon_binary):
    """One daemon for the tests that only resolve (no engine state, never stopped)."""
    path = Path(tempfile.mkdtemp(prefix="limg-py-"))
    d = Daemon(daemon_binary, path).start()
    yield d
    d.stop()
    shutil.rmtree(path, ignore_errors=True)


def sam_layered_tag(runtime_image_tag: str, layer_names) -> str:
    """SAM's tag for a zip function with layers (samcli/local/docker/lambda_image.py)."""
    digest = hashlib.sha256("-".join(layer_names).encode()).hexdigest()[:25]
    return f"samcli/lambda-{runtime_image_tag}-{digest}"


TEMPLATE = """\
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Resources:
  EchoFunction:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: provided.al2023
      Handler: bootstrap
      CodeUri: fn/
      Architectures: [x86_64]
      Timeout: 30
      Layers:
        - !Ref {layer}
  {layer}:
    Type: AWS::Serverless::LayerVersion
    Properties:
      ContentUri: {content_uri}
"""


def write_zip_layer(path: Path, files: dict) -> None:
    """A layer archive at `path` holding `files` (name -> text), written whole, then renamed."""
    import zipfile

    part = path.with_name(path.name + ".part")
    with zipfile.ZipFile(part, "w") as archive:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, text)
    os.replace(part, path)


class SamProject:
    """A SAM app: EchoFunction (provided.al2023, the busybox bootstrap) with one template layer
    whose logical ID is unique per test, so every test starts without an image for its tag.
    The layer is the directory `layer/`, or with `zip_layer` the archive `layer.zip`."""

    def __init__(self, root: Path, message: str = "from-layer", *, zip_layer: bool = False):
        self.root = root
        self.zip_layer = zip_layer
        self.layer_id = "MsgLayer" + os.urandom(6).hex()
        self.tag = sam_layered_tag("provided:al2023-x86_64", [self.layer_id])
        (root / "fn").mkdir(parents=True)
        shutil.copy(BOOTSTRAP, root / "fn" / "bootstrap")
        os.chmod(root / "fn" / "bootstrap", 0o755)
        content_uri = "layer.zip" if zip_layer else "layer/"
        (root / "template.yaml").write_text(TEMPLATE.format(layer=self.layer_id, content_uri=content_uri))
        if not zip_layer:
            (root / "layer").mkdir()
        self.set_message(message)

    def set_message(self, text: str) -> None:
        if self.zip_layer:
            write_zip_layer(self.root / "layer.zip", {"message.txt": text})
        else:
            (self.root / "layer" / "message.txt").write_text(text)

    def env(self, socket=None, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("LAMBDA_IMAGED_SOCKET", "LAMBDA_IMAGED")}
        env["SAM_CLI_TELEMETRY"] = "0"
        if socket is not None:
            env["LAMBDA_IMAGED_SOCKET"] = str(socket)
        env.update(extra)
        return env

    def invoke(self, event, socket=None, **extra_env):
        """`sam local invoke EchoFunction --skip-pull-image`; returns (response, stderr)."""
        (self.root / "event.json").write_text(json.dumps(event))
        proc = subprocess.run(
            [
                str(SAM),
                "local",
                "invoke",
                "EchoFunction",
                "--skip-pull-image",
                "-t",
                "template.yaml",
                "-e",
                "event.json",
            ],
            cwd=self.root,
            env=self.env(socket, **extra_env),
            capture_output=True,
            text=True,
            timeout=SAM_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"sam local invoke failed ({proc.returncode}):\n{proc.stderr}"
        last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
        return json.loads(last), proc.stderr

    def cleanup(self) -> None:
        docker("image", "rm", "-f", self.tag, check=False)


@pytest.fixture
def sam_project(engine, tmp_path):
    project = SamProject(tmp_path / "app")
    yield project
    project.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lambda(cwd: Path, env: dict, log_path: Path):
    """`sam local start-lambda --skip-pull-image` on a free port in `cwd`, output to `log_path`;
    returns (process, port). Stop it with `stop_server`."""
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(SAM), "local", "start-lambda", "--host", "127.0.0.1", "--port", str(port), "--skip-pull-image"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return server, port


def stop_server(server) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


def lambda_client(port: int):
    """A boto3 Lambda client for a local start-lambda endpoint (no retries, SAM's time bound)."""
    import boto3
    import botocore.config

    return boto3.client(
        "lambda",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(retries={"max_attempts": 0}, read_timeout=SAM_TIMEOUT_S, connect_timeout=10),
    )
