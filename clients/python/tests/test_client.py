"""The client against a real daemon: connect, resolve, build events, error mapping."""

import time

import pytest

from conftest import FINGERPRINT_LABEL, docker, engine_tag_events, image_label, sam_layered_tag
from lambda_imaged_client import DaemonError, DaemonUnavailable, build_request, connect


def test_connect_to_a_missing_socket_is_unavailable_at_once(workdir):
    """No daemon: DaemonUnavailable naming the socket, without waiting for a gRPC deadline."""
    path = str(workdir / "nothing.sock")
    with pytest.raises(DaemonUnavailable) as err:
        connect(path, timeout=30)
    assert err.value.code == "UNAVAILABLE"
    assert path in err.value.message


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
