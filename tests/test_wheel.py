"""What a wheel built from the checkout ships: the package and its metadata, and no test tool."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METADATA = {"METADATA", "WHEEL", "RECORD", "entry_points.txt"}


def test_the_wheel_holds_the_package_its_type_marker_and_metadata_only(tmp_path: Path) -> None:
    # The build backend is a test dependency and no index is asked: offline, and about a second.
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("ollama_pull-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    info = {name.split("/", 1)[1] for name in names if name.split("/", 1)[0].endswith(".dist-info")}
    package = {name for name in names if not name.split("/", 1)[0].endswith(".dist-info")}

    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "ollama_pull").rglob("*.py")}
    assert package == modules | {"ollama_pull/py.typed"}
    assert not [name for name in names if "fault_registry" in name]  # the test registry lives in tests/
    assert info >= METADATA
    assert all(name in METADATA or name.startswith("licenses/") for name in info), info
