"""The README's commands install into a virtual environment of the checkout, never into the python3 on PATH.

The scripts run in a copy of the checkout against stand-in interpreters that record how they are called: the
python3 on PATH may only report its version and create `.venv/`; pip and pytest run from `.venv/`; torch is
installed only into an environment without one; UNITRAIN_VENV points the scripts at an existing environment.
(The real install from a fresh clone on Debian's python3 is checked by hand: see README.md.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT_PYTHON = """#!/usr/bin/env bash
echo "$(cd "$(dirname "$0")/.." && pwd) $*" >> "$CALLS"
if [ "$1" = -c ]; then
    case "$2" in "import torch") exit "${TORCH_MISSING:-0}" ;; *) echo 1.0 ;; esac
fi
"""
PATH_PYTHON = """#!/usr/bin/env bash
echo "PATH-python3 $*" >> "$CALLS"
[ "$1" = --version ] && echo "Python 3.11.2"
if [ "$1" = -m ] && [ "$2" = venv ]; then
    mkdir -p "$3/bin" && cp "$ENVIRONMENT_PYTHON" "$3/bin/python" && ln -s python "$3/bin/python3"
fi
exit 0
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of the scripts in a checkout of their own, and a PATH whose python3 is the stand-in."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copytree(REPO / ".ci", root / ".ci")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(PATH_PYTHON)
    (tmp_path / "environment-python").write_text(ENVIRONMENT_PYTHON)
    for path in (bin_dir / "python3", tmp_path / "environment-python"):
        path.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CALLS": str(tmp_path / "calls"),
        "ENVIRONMENT_PYTHON": str(tmp_path / "environment-python"),
        "TORCH_MISSING": "1",
    }
    return root, env


def run(root: Path, env: dict, *argv: str) -> tuple[str, list[str]]:
    calls = Path(env["CALLS"])
    calls.unlink(missing_ok=True)
    result = subprocess.run(["bash", *argv], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout, calls.read_text().splitlines()


def test_setup_creates_and_uses_a_checkout_venv(checkout):
    root, env = checkout
    out, calls = run(root, env, "scripts/setup.sh", "dev")
    venv = root / ".venv"
    assert [call for call in calls if call.startswith("PATH-python3 -m")] == ["PATH-python3 -m venv .venv"]
    assert f"{venv} -m pip install --quiet --disable-pip-version-check torch==2.13.0" in calls
    assert f"{venv} -m pip install --quiet --disable-pip-version-check -e .[dev]" in calls
    assert "source .venv/bin/activate" in out

    env["TORCH_MISSING"] = "0"  # the environment is there, with its torch: reused, torch kept
    _, calls = run(root, env, "scripts/setup.sh", "dev")
    assert not [call for call in calls if call.startswith("PATH-python3")]
    assert not [call for call in calls if "torch==" in call]


def test_ci_runs_the_tests_from_the_venv(checkout):
    root, env = checkout
    _, calls = run(root, env, ".ci/run")
    venv = root / ".venv"
    assert [call for call in calls if call.startswith("PATH-python3 -m")] == ["PATH-python3 -m venv .venv"]
    assert f"{venv} -m pip install --quiet --disable-pip-version-check -e .[dev,plot,wandb]" in calls
    assert calls[-1] == f"{venv} -m pytest -q"


def test_an_existing_environment_keeps_its_torch(checkout, tmp_path):
    root, env = checkout
    (tmp_path / "gpu-env" / "bin").mkdir(parents=True)
    shutil.copy(tmp_path / "environment-python", tmp_path / "gpu-env" / "bin" / "python")
    env.update(UNITRAIN_VENV=str(tmp_path / "gpu-env"), TORCH_MISSING="0")
    out, calls = run(root, env, "scripts/setup.sh", "dev")
    assert not [call for call in calls if call.startswith("PATH-python3")]
    assert not [call for call in calls if "torch==" in call]
    assert f"{tmp_path / 'gpu-env'} -m pip install --quiet --disable-pip-version-check -e .[dev]" in calls
    assert not (root / ".venv").exists()
    assert f"source {tmp_path / 'gpu-env'}/bin/activate" in out


def test_too_old_a_python_is_one_line(checkout, tmp_path):
    root, env = checkout
    (tmp_path / "bin" / "python3").write_text(
        '#!/usr/bin/env bash\n[ "$1" = -c ] && exit 1\necho "Python 3.9.2"\n'
    )
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert (
        result.stderr.startswith("error: unitrain needs Python 3.11 or later")
        and result.stderr.count("\n") == 1
    )
    assert not (root / ".venv").exists()
