"""The committed stubs are exactly what generate.sh makes from proto/ today."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

HERE = Path(__file__).resolve().parents[1]
STUBS = HERE / "src" / "lambda_imaged_client" / "v1"


def test_committed_stubs_match_the_proto(tmp_path):
    """Regenerating into a temp dir gives byte-identical files: run clients/python/generate.sh."""
    subprocess.run(
        ["bash", str(HERE / "generate.sh"), str(tmp_path)],
        check=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = tmp_path / "lambda_imaged_client" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated == ["image_builder_pb2.py", "image_builder_pb2.pyi", "image_builder_pb2_grpc.py"]
    stale = [name for name in generated if not filecmp.cmp(fresh / name, STUBS / name, shallow=False)]
    assert not stale, f"stale stubs {stale}: run clients/python/generate.sh (proto in {ROOT / 'proto'})"


def test_installed_package_is_this_source():
    """The tests exercise this tree's code, not some other installed copy."""
    import lambda_imaged_client.v1.image_builder_pb2 as pb

    installed = Path(pb.__file__).read_bytes()
    assert installed == (STUBS / "image_builder_pb2.py").read_bytes(), (
        f"{pb.__file__} differs from {STUBS}: reinstall with pip install ./clients/python"
    )
