"""The client against a real daemon: connect, resolve, build events, error mapping."""

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import FINGERPRINT_LABEL, Daemon, docker, engine_tag_events, image_label, sam_layered_tag
from lambda_imaged_client import DaemonError, DaemonUnavailable, build_request, connect


def test_connect_to_a_missing_socket_is_unavailable_at_once(workdir):
    """No daemon: DaemonUnavailable naming the socket, without waiting for a gRPC deadline."""
    path = str(workdir / "nothing.sock")
    with pytest.raises(DaemonUnavailable) as err:
        connect(path, timeout=30)
    assert err.value.code == "UNAVAILABLE"
    assert path in err.value.message


def _small_layer(tmp_path: Path) -> Path:
    layer = tmp_path / "layer"
    (layer / "python").mkdir(parents=True)
    (layer / "python" / "marker.txt").write_text(tmp_path.name)
    return layer


def test_an_unreachable_engine_is_the_daemons_unavailable_not_an_unreachable_daemon(
    engine, daemon_binary, workdir, tmp_path
):
    """The daemon answers UNAVAILABLE naming its engine: a plain DaemonError (the daemon was
    reached), not DaemonUnavailable, told apart by the daemon's origin trailer. Both in a
    Build stream (after its first event) and as a unary call's only answer (Prune)."""
    address = f"unix://{workdir}/no-engine.sock"
    d = Daemon(daemon_binary, workdir, engine=address).start()
    try:
        with connect(d.socket) as client:
            with pytest.raises(DaemonError) as streamed:
                client.build_tag(runtime="python3.12", layers=[("L", _small_layer(tmp_path))])
            with pytest.raises(DaemonError) as unary:
                client.prune(dry_run=True)
        for err in (streamed, unary):
            assert type(err.value) is DaemonError, err.value
            assert err.value.code == "UNAVAILABLE"
            assert address in err.value.message
            assert "not reachable" not in err.value.message
    finally:
        d.stop()


class _LoadHoldingProxy:
    """A Unix-socket proxy in front of the real engine that forwards every byte both ways,
    except that a connection whose request names /images/load is held from then on (nothing
    more of it reaches the engine): a build stays in flight until the test ends it."""

    def __init__(self, engine_host: str, path: Path):
        assert engine_host.startswith("unix://"), engine_host
        self.engine = engine_host[len("unix://") :]
        self.path = str(path)
        self.held = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.engine)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, to_engine: bool):
        try:
            while data := src.recv(65536):
                if to_engine and b"/images/load" in data:
                    self.held.set()
                    return  # held: the engine never sees this request
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        for s in self.sockets:
            s.close()


def test_a_daemon_killed_mid_build_is_unavailable_saying_the_connection_broke(
    engine, daemon_binary, workdir, tmp_path
):
    """The daemon is killed while its build is held at the engine's load (a proxy in front of
    the real engine): the stream's end is DaemonUnavailable with `.broke`, saying the
    connection broke and to retry, not that the daemon is not running."""
    proxy = _LoadHoldingProxy(engine, workdir / "engine.sock")
    d = Daemon(daemon_binary, workdir, engine=f"unix://{proxy.path}").start()
    name = "Killed" + tmp_path.name[-6:].replace("_", "")
    try:
        with connect(d.socket) as client:
            events = client.build(runtime="python3.12", layers=[(name, _small_layer(tmp_path))])
            assert next(events).WhichOneof("event") == "accepted"
            assert proxy.held.wait(120), "the build never reached the engine's load"
            d.proc.kill()
            d.proc.wait(timeout=30)
            with pytest.raises(DaemonUnavailable) as err:
                for event in events:
                    assert event.WhichOneof("event") != "completed", event
        assert err.value.broke
        assert err.value.code == "UNAVAILABLE"
        assert "broke mid-call" in err.value.message and d.socket in err.value.message
        assert "retry" in err.value.message
    finally:
        d.stop()
        proxy.close()


TEST_USER = "lambda-imaged-test-user"  # shared with tests/service.rs
TEST_GROUP = "lambda-imaged-test"
CLIENT_SRC = Path(__file__).resolve().parents[1] / "src"


def _ensure(lookup, name, create):
    """The id of user/group `name`, created when missing (another test process may race us)."""
    for _ in range(100):
        try:
            return lookup(name)
        except KeyError:
            subprocess.run(create, capture_output=True, timeout=60)
            time.sleep(0.1)
    raise AssertionError(f"could not create {name}")


def test_a_user_outside_the_socket_group_is_told_permission_denied_and_which_group(workdir):
    """connect() as a user the socket's mode keeps out: DaemonUnavailable saying permission
    denied, the socket's owner, group and mode and the group to join (not "is it running?")."""
    assert os.geteuid() == 0, "this test switches to another user: run it as root"
    user = _ensure(pwd.getpwnam, TEST_USER, ["useradd", "--system", "--no-create-home", TEST_USER])
    group = _ensure(grp.getgrnam, TEST_GROUP, ["groupadd", "-f", TEST_GROUP])
    workdir.chmod(0o755)  # the user may reach the socket file, not connect to it
    # The client as the user can read it: the clone may sit in a directory only root enters.
    client_src = workdir / "client"
    shutil.copytree(CLIENT_SRC / "lambda_imaged_client", client_src / "lambda_imaged_client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = str(workdir / "d.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    os.chown(path, 0, group.gr_gid)
    os.chmod(path, 0o660)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from lambda_imaged_client import DaemonUnavailable, connect\n"
        "try:\n    connect(sys.argv[2], timeout=30)\nexcept DaemonUnavailable as err:\n"
        "    print(err.code); print(err.message)\n"
    )
    try:
        out = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--",
             sys.executable, "-c", script, str(client_src), path],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        listener.close()
    assert out.returncode == 0, out.stderr
    code, message = out.stdout.split("\n", 1)
    assert code == "UNAVAILABLE"
    for part in (
        f"not reachable at {path}: permission denied",
        f"owned by root:{TEST_GROUP} with mode 0660",
        f"user {TEST_USER} (uid {user.pw_uid}) is not in group {TEST_GROUP}",
        f"sudo usermod -aG {TEST_GROUP} {TEST_USER}",
    ):
        assert part in message, message
    assert "not running" not in message


def test_resolve_gives_sams_tag_without_building(shared_daemon, tmp_path):
    """Resolve answers SAM's tag for a layered zip function and the plain rapid tag without."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with connect(shared_daemon.socket) as client:
        plan = client.resolve(runtime="python3.12", layers=[("layerA", tmp_path / "a"), ("layerB", tmp_path / "b")])
        assert plan.tag == "samcli/lambda-python:3.12-x86_64-826cc3a931cbea33312dcc046"
        assert client.resolve(runtime="python3.12").tag == "public.ecr.aws/lambda/python:3.12-rapid-x86_64"
        assert client.resolve(runtime="go1.x").tag == "public.ecr.aws/lambda/go:1-rapid-x86_64"
        image_plan = client.resolve(package_type="Image", image="myrepo/fn:v1", architecture="arm64")
        assert image_plan.tag == "myrepo/fn:rapid-arm64"


def test_bad_request_is_invalid_argument(shared_daemon):
    """The daemon's status code and message come through as DaemonError."""
    with connect(shared_daemon.socket) as client:
        with pytest.raises(DaemonError) as err:
            client.resolve(runtime="cobol85")
        assert err.value.code == "INVALID_ARGUMENT"
        assert "runtime" in err.value.message
        with pytest.raises(ValueError):
            build_request(runtime="python3.12", architecture="sparc")


def test_build_streams_events_then_hits_the_cache(daemon, tmp_path):
    """A first build streams accepted .. completed and builds once; the repeat is a cached hit."""
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "message.txt").write_text("hi")
    name = "ClientLayer" + tmp_path.name[-6:].replace("_", "")
    tag = sam_layered_tag("provided:al2023-x86_64", [name])
    docker("image", "rm", "-f", tag, check=False)
    try:
        with connect(daemon.socket) as client:
            since = time.time()
            events = list(client.build(runtime="provided.al2023", layers=[(name, layer)], skip_pull_image=True))
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds[0] == "accepted" and kinds[-1] == "completed"
            assert events[0].accepted.tag == tag
            done = events[-1].completed
            assert (done.tag, done.cached) == (tag, False)
            assert done.image_id.startswith("sha256:")
            assert image_label(tag, FINGERPRINT_LABEL)

            again = client.build_tag(runtime="provided.al2023", layers=[(name, str(layer))], skip_pull_image=True)
            assert again.cached and again.image_id == done.image_id
            assert engine_tag_events(tag, since, time.time()) == 1
    finally:
        docker("image", "rm", "-f", tag, check=False)
