"""Unmodified `sam` (aws-sam-cli, pinned) gets its images from lambda-imaged.

Each test has its own SAM app whose template layer has a unique logical ID, hence its own
tag, and counts the engine's own `tag` events for that tag to know how many builds ran.
"""

import json
import os
import threading
import time

from lambda_imaged_client import connect

from conftest import (
    FINGERPRINT_LABEL,
    SAM_TIMEOUT_S,
    SamProject,
    docker,
    engine_tag_events,
    image_label,
    lambda_client,
    start_lambda,
    stop_server,
)

UNREACHABLE = "lambda-imaged is not reachable at"


def test_invoke_uses_the_daemon_image_and_repeats_without_a_build(daemon, sam_project):
    """First invoke: one build, by the daemon, and the function answers with the layer's file.
    Second invoke: the same answer and no engine build at all."""
    t0 = time.time()
    response, stderr = sam_project.invoke({"n": 1}, socket=daemon.socket)
    t1 = time.time()
    assert response == {"echo": {"n": 1}, "layer": "from-layer"}
    assert engine_tag_events(sam_project.tag, t0, t1) == 1
    assert image_label(sam_project.tag, FINGERPRINT_LABEL), "the image was not built by the daemon"
    assert f"lambda-imaged: built {sam_project.tag}" in stderr
    assert "Warning" not in stderr

    response, stderr = sam_project.invoke({"n": 2}, socket=daemon.socket)
    t2 = time.time()
    assert response == {"echo": {"n": 2}, "layer": "from-layer"}
    assert engine_tag_events(sam_project.tag, t1, t2) == 0
    assert "Building image" not in stderr
    assert f"lambda-imaged: image {sam_project.tag} is up to date" in stderr


def test_zip_layer_unchanged_repeat_is_up_to_date(daemon, engine, tmp_path):
    """A template layer whose ContentUri is a .zip: SAM unarchives it into a new temp directory
    on every invoke, yet the daemon gets the archive, so an unchanged repeat is up to date with
    no engine load or tag; a changed archive rebuilds once and the function sees the change."""
    project = SamProject(tmp_path / "app", zip_layer=True)
    try:
        response, stderr = project.invoke({"n": 1}, socket=daemon.socket)
        assert response == {"echo": {"n": 1}, "layer": "from-layer"}, stderr
        assert f"lambda-imaged: built {project.tag}" in stderr
        assert "Decompressing" in stderr  # SAM still unarchives it (for its own builder)
        with connect(daemon.socket) as client:
            builds = client.info().stats.engine_builds  # each one a load into the engine
        for n in (2, 3):
            t0 = time.time()
            response, stderr = project.invoke({"n": n}, socket=daemon.socket)
            t1 = time.time()
            assert response == {"echo": {"n": n}, "layer": "from-layer"}
            assert f"lambda-imaged: image {project.tag} is up to date" in stderr, stderr
            # (The engine is shared with concurrent tests: only this tag's events are ours.)
            assert engine_tag_events(project.tag, t0, t1) == 0
        with connect(daemon.socket) as client:
            assert client.info().stats.engine_builds == builds
        project.set_message("zip-edited")
        t2 = time.time()
        response, stderr = project.invoke({}, socket=daemon.socket)
        assert response["layer"] == "zip-edited"
        assert f"(a layer changed: {project.layer_id})" in stderr, stderr
        assert engine_tag_events(project.tag, t2, time.time()) == 1
    finally:
        project.cleanup()


def test_changed_layer_file_shows_in_the_next_invoke(daemon, sam_project):
    """Editing a file of the template layer rebuilds (once) and the function sees the new file
    (same size, right after the previous invoke: content, not size, must tell)."""
    assert sam_project.invoke({}, socket=daemon.socket)[0]["layer"] == "from-layer"
    sam_project.set_message("new-layer!")
    t1 = time.time()
    response, stderr = sam_project.invoke({}, socket=daemon.socket)
    assert response["layer"] == "new-layer!"
    assert engine_tag_events(sam_project.tag, t1, time.time()) == 1, stderr
    assert f"(a layer changed: {sam_project.layer_id})" in stderr


def test_lambda_rule_warnings_reach_sams_output(daemon, sam_project):
    """A layer file Lambda could not read (no read permission for others: the function does not
    run as its owner) still builds and runs, and SAM's own output carries the daemon's
    `unreadable_in_lambda` warning (issue 25)."""
    os.chmod(sam_project.root / "layer" / "message.txt", 0o600)
    response, stderr = sam_project.invoke({}, socket=daemon.socket)
    assert response["layer"] == "from-layer"
    expected = (
        f'lambda-imaged: layer "{sam_project.layer_id}": the directory has 1 file(s) without read '
        'permission for others ("message.txt")'
    )
    assert expected in stderr, stderr


def test_daemon_stopped_sam_falls_back_with_one_warning(daemon, sam_project):
    """With the daemon gone, SAM builds the image itself and works; the user is told once."""
    daemon.stop()
    response, stderr = sam_project.invoke({"n": 3}, socket=daemon.socket)
    assert response == {"echo": {"n": 3}, "layer": "from-layer"}
    assert stderr.count(UNREACHABLE) == 1, stderr
    assert f"{UNREACHABLE} {daemon.socket}" in stderr
    assert "Building image..." in stderr  # SAM's own builder
    assert image_label(sam_project.tag, FINGERPRINT_LABEL) is None


def test_lambda_imaged_0_turns_it_off(daemon, sam_project):
    """LAMBDA_IMAGED=0 beats LAMBDA_IMAGED_SOCKET: SAM builds, silently."""
    response, stderr = sam_project.invoke({}, socket=daemon.socket, LAMBDA_IMAGED="0")
    assert response["layer"] == "from-layer"
    assert "lambda-imaged" not in stderr
    assert image_label(sam_project.tag, FINGERPRINT_LABEL) is None


def test_start_lambda_two_concurrent_invokes_make_one_build(daemon, sam_project):
    """`sam local start-lambda`, two invokes at once through boto3: both answer, one build."""
    log_path = sam_project.root / "start-lambda.log"
    # Without the background prewarm (tests/test_prewarm.py): two requests, both SAM's.
    env = sam_project.env(daemon.socket, LAMBDA_IMAGED_PREWARM="0")
    server, port = start_lambda(sam_project.root, env, log_path)
    try:
        _wait_for_port(port, server, log_path)
        lambda_api = lambda_client(port)
        barrier = threading.Barrier(2, timeout=30)
        results = [None, None]

        def invoke(i):
            barrier.wait()
            out = lambda_api.invoke(FunctionName="EchoFunction", Payload=json.dumps({"i": i}).encode())
            results[i] = json.loads(out["Payload"].read())

        t0 = time.time()
        threads = [threading.Thread(target=invoke, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SAM_TIMEOUT_S)
        t1 = time.time()
        assert not any(t.is_alive() for t in threads), "an invoke did not return in time"
        assert results == [{"echo": {"i": 0}, "layer": "from-layer"}, {"echo": {"i": 1}, "layer": "from-layer"}], (
            log_path.read_text()
        )
        assert engine_tag_events(sam_project.tag, t0, t1) == 1
        assert image_label(sam_project.tag, FINGERPRINT_LABEL)
        assert "Warning" not in log_path.read_text()
        with connect(daemon.socket) as imaged:
            stats = imaged.info().stats
        # Both invokes asked the daemon; the second one joined the first one's build or, if
        # SAM happened to serialise them, found its image up to date.
        assert (stats.requests, stats.engine_builds, stats.joined + stats.cache_hits) == (2, 1, 1), stats
    finally:
        stop_server(server)


def _wait_for_port(port, server, log_path, timeout=90):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"start-lambda exited ({server.returncode}):\n{log_path.read_text()}")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"start-lambda did not listen on {port} in {timeout} s:\n{log_path.read_text()}")


def test_two_projects_sharing_a_layer_id_each_run_their_own_layer(daemon, tmp_path):
    """Two SAM apps whose template layer has one logical ID but other contents ask for one SAM
    tag (it hashes layer names only). Invoked at the same time, three rounds: each function
    answers with its own layer every time (the drop-in hands SAM the answer's pinned tag, which
    the other app's build cannot move), and SAM's output names the shared tag."""
    first = SamProject(tmp_path / "one", message="layer-of-one")
    second = SamProject(tmp_path / "two", message="layer-of-two")
    second.layer_id = first.layer_id
    second.tag = first.tag
    (second.root / "template.yaml").write_text((first.root / "template.yaml").read_text())
    try:
        warned = 0
        for round_ in range(3):
            results = {}

            def run(project, key):
                results[key] = project.invoke({"round": round_}, socket=daemon.socket)

            threads = [threading.Thread(target=run, args=(p, k)) for p, k in ((first, "one"), (second, "two"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=SAM_TIMEOUT_S + 30)
            assert set(results) == {"one", "two"}, f"round {round_}: an invoke did not finish"
            assert results["one"][0]["layer"] == "layer-of-one", results["one"][1]
            assert results["two"][0]["layer"] == "layer-of-two", results["two"][1]
            warned += sum("shared_tag" in stderr or "share one tag" in stderr for _, stderr in results.values())
        assert warned >= 3, "SAM's output never named the shared tag"
    finally:
        first.cleanup()
        for line in docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}", check=False).splitlines():
            if line.startswith(first.tag):
                docker("image", "rm", "-f", line, check=False)
