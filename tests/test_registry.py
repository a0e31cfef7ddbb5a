"""The node pack as ComfyUI's registry and ComfyUI-Manager see it.

The registry reads pyproject.toml with comfy-cli (``comfy node validate`` / ``publish``: its own parser, then a ruff
scan for exec, eval and one-line compound statements); the Manager installs requirements.txt one line at a time with
``pip install <line>`` and then runs ``python install.py`` in the pack's folder, failing the install on a non-zero
exit.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST_PACKAGES = {"torch", "torchvision", "torchaudio", "xformers", "numpy", "pillow"}  # the host's own: never ours


def requirement_lines() -> list[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if line]


def test_registry_reads_every_field_without_warnings():
    parser = pytest.importorskip("comfy_cli.registry.config_parser", reason="comfy-cli is not installed")
    out = io.StringIO()
    with redirect_stdout(out):
        config = parser.extract_node_configuration(str(ROOT / "pyproject.toml"))
    assert config is not None and "Warning" not in out.getvalue(), out.getvalue()
    project, comfy = config.project, config.tool_comfy
    assert re.fullmatch(r"[a-z][a-z0-9_-]{0,99}", project.name)  # the registry's node id
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version)  # publishing refuses an empty or non-semver version
    assert project.description and project.urls.repository.startswith("https://")
    assert project.license.file or project.license.text
    assert comfy.publisher_id and comfy.display_name
    assert comfy.includes and all((ROOT / part).is_dir() for part in comfy.includes)


def test_registry_security_scan_is_clean():
    """comfy-cli's publish check: ruff's S102 (exec), S307 (eval) and E702 (statements joined by ;)."""
    pytest.importorskip("ruff", reason="ruff (comfy-cli's) is not installed")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "-q", "--select", "S102,S307,E702",
                           "--exit-zero", "--exclude", ".ci"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout[-3000:]


def test_requirements_never_touch_the_hosts_torch():
    """Each line is a lower bound only (the Manager pip-installs lines one by one: a pin or an upper bound could
    downgrade a package the host relies on), and none is torch or another package every host ships."""
    for line in requirement_lines():
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower()
        assert name not in HOST_PACKAGES, line
        assert re.fullmatch(r"[A-Za-z0-9_.-]+(>=[0-9][0-9.]*)?", line), f"{line}: only 'name' or 'name>=version'"


def test_requirements_are_already_met_here():
    """pip's own resolver, offline, against this environment (which CI extends with the current ComfyUI's
    requirements): nothing would be installed, so nothing of the host's is replaced."""
    report = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
                             "--report", "-", "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    assert json.loads(report.stdout)["install"] == []


def test_manager_runs_install_py_outside_a_webui(tmp_path):
    """ComfyUI-Manager runs ``python install.py`` in the pack's folder; without a webui's ``launch`` it must exit 0
    and install nothing."""
    done = subprocess.run([sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout.strip() and not done.stderr.strip()
