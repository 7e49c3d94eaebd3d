"""The proto contract: `buf lint` is clean, and `buf breaking` catches a breaking change.

Both through scripts/check_buf.sh, as CI runs it (buf from npm, pinned in
tools/buf). The breaking change is made in a temp copy of protos/: the work
tree is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_buf.sh"


def _check(*args: str, against: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if against is not None:
        env["BUF_AGAINST"] = str(against)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module", autouse=True)
def _npm() -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (scripts/check_buf.sh installs buf with it)")


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(REPO / "protos", copy)
    return copy


def test_lint_is_clean_and_the_tree_is_not_breaking() -> None:
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lint protos" in result.stdout


def test_a_renumbered_field_fails_the_breaking_check(tmp_path: Path) -> None:
    changed = _copy(tmp_path)
    proto = changed / "disagg" / "v1" / "scheduler.proto"
    text = proto.read_text()
    assert text.count("string prompt = 1;") == 1
    proto.write_text(text.replace("string prompt = 1;", "string prompt = 17;"))
    result = _check("--protos", str(changed), against=REPO / "protos")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert 'field "1" with name "prompt"' in out, out


def test_an_added_field_passes_the_breaking_check(tmp_path: Path) -> None:
    """The check is not simply failing: an additive change is accepted."""
    changed = _copy(tmp_path)
    proto = changed / "disagg" / "v1" / "scheduler.proto"
    text = proto.read_text()
    anchor = "message ListWorkersRequest {}"
    assert text.count(anchor) == 1
    proto.write_text(
        text.replace(anchor, "message ListWorkersRequest {\n  // Unused.\n  bool all = 1;\n}")
    )
    result = _check("--protos", str(changed), against=REPO / "protos")
    assert result.returncode == 0, result.stdout + result.stderr
