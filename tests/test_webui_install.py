"""The extension installed into a webui's own environment, the way the webui installs it (opt-in: it builds a venv).

A venv gets the webui's pins (A1111 v1.10.1's ``requirements_versions.txt``, or the one in ``$WEBUI_ROOT`` /
``$FORGE_ROOT``) and the CPU torch, as the webui's launcher installs them. Then the webui's own launcher
(``modules/launch_utils.run_extension_installer`` from ``$WEBUI_ROOT`` or ``$FORGE_ROOT``) runs ``install.py``
with its ``launch.is_installed`` / ``run_pip``, and the test checks that no pinned package changed version, that
``pip check`` finds nothing new, that the webui's own imports still work (transformers' CLIP with the installed
huggingface_hub), and that textmask imports, with ``ld-znet`` either working or saying in one line what is missing.

Run with ``TEXTMASK_WEBUI_VENVS=/some/folder`` (venvs are built there once and reused) and ``FORGE_ROOT`` or
``WEBUI_ROOT``; see docs/development.md.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENVS = os.environ.get("TEXTMASK_WEBUI_VENVS")
LAUNCHER = os.environ.get("WEBUI_ROOT") or os.environ.get("FORGE_ROOT")
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]  # the webuis install these first (TORCH_COMMAND); here from disk

pytestmark = pytest.mark.skipif(not VENVS or not LAUNCHER,
                                reason="builds a venv: set TEXTMASK_WEBUI_VENVS and WEBUI_ROOT or FORGE_ROOT")


def pins(which: str) -> Path:
    if which == "a1111":
        own = Path(os.environ.get("WEBUI_ROOT", "/nonexistent")) / "requirements_versions.txt"
        return own if own.is_file() else FIXTURES / "a1111-v1.10.1-requirements_versions.txt"
    forge = os.environ.get("FORGE_ROOT")
    if not forge:
        pytest.skip("no FORGE_ROOT for Forge's pins")
    return Path(forge) / "requirements_versions.txt"


def run(args, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_ADDOPTS")}
    env.update(kw.pop("env", {}))
    return subprocess.run(args, capture_output=True, text=True, env=env, **kw)


def build_venv(which: str) -> Path:
    """A venv with the webui's pins, built once per pins file and kept under $TEXTMASK_WEBUI_VENVS."""
    requirements = pins(which)
    venv = Path(VENVS) / f"{which}-{hashlib.sha1(requirements.read_bytes()).hexdigest()[:10]}"
    python = venv / "bin" / "python"
    if (venv / "ready").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    for args in (TORCH, ["-r", str(requirements)]):
        done = run([str(python), "-m", "pip", "install", "--prefer-binary", "-q", *args])
        assert done.returncode == 0, done.stderr[-3000:]
    (venv / "ready").write_text("")
    return python


def freeze(python: Path) -> dict[str, str]:
    out = run([str(python), "-m", "pip", "list", "--format", "json"], check=True).stdout
    return {d["name"].lower(): d["version"] for d in json.loads(out)}


def pip_check(python: Path) -> set[str]:
    return {line for line in run([str(python), "-m", "pip", "check"]).stdout.splitlines() if line.strip()}


WEBUI_IMPORTS = """
import inspect
import huggingface_hub, transformers
from transformers import CLIPTextModel, CLIPTokenizer  # what the webui's FrozenCLIPEmbedder loads
from transformers.utils import hub
try:  # transformers 4.30 passes use_auth_token to hf_hub_download; a huggingface_hub without it fails here
    hub.cached_file("openai/clip-vit-large-patch14", "config.json", local_files_only=True)
except TypeError as e:
    raise SystemExit(f"transformers cannot call huggingface_hub: {e}")
except Exception:
    pass  # offline and not cached: the call itself went through
print("webui imports ok")
"""

TEXTMASK_IMPORTS = """
import sys
sys.path.insert(0, sys.argv[1])
import textmask, textmask.faces, textmask.hosts.a1111, textmask.hosts.forge, textmask.sampling
from textmask.errors import TextMaskError
from textmask.ldznet.weights import require_diffusers
try:
    require_diffusers()
    print("ld-znet: diffusers ok")
except TextMaskError as e:
    assert "\\n" not in str(e) and "diffusers" in str(e), str(e)
    print(f"ld-znet: {e}")
"""


@pytest.mark.parametrize("which", ["a1111", "forge"])
def test_install_keeps_the_webuis_pins(which, tmp_path):
    python = build_venv(which)
    before, broken_before = freeze(python), pip_check(python)
    extension = tmp_path / "extensions" / "textmask"
    files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (extension / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, extension / name)
    # the webui's launcher: its run_extension_installer puts the webui root on PYTHONPATH and runs install.py, whose
    # ``import launch`` is the webui's launch.py with its is_installed and run_pip
    driver = ("import sys; from modules import launch_utils; "
              "launch_utils.run_extension_installer(sys.argv[1])")
    done = run([str(python), "-c", driver, str(extension)], cwd=LAUNCHER, timeout=1800)
    assert "Error running install.py" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    after = freeze(python)
    changed = {name: (v, after.get(name)) for name, v in before.items() if after.get(name) != v}
    assert not changed, f"install.py changed the webui's packages: {changed}"
    new_conflicts = pip_check(python) - broken_before
    assert not new_conflicts, new_conflicts
    webui = run([str(python), "-c", WEBUI_IMPORTS], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert webui.returncode == 0, webui.stderr[-2000:]
    ours = run([str(python), "-c", TEXTMASK_IMPORTS, str(extension)], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert ours.returncode == 0, ours.stderr[-2000:]
    print(f"{which}: added {sorted(set(after) - set(before))}; {ours.stdout.strip()}")
