"""AUTOMATIC1111 / Forge installer: the webui runs this, not pip, so requirements.txt is installed here.

ComfyUI-Manager runs this file too, after it has installed requirements.txt itself; outside a webui (no ``launch``
module) it does nothing and exits 0, so the Manager reports the install as done.

Only what is missing is installed, and never at the cost of a package the webui already has: pip gets every
installed distribution's version as a constraint, so it picks versions that fit the webui's environment (an older
diffusers beside A1111's transformers 4.30) or installs nothing. A requirement that cannot fit is reported in one
line and skipped; the webui keeps working, and the feature that needs it says so when used (ld-znet needs
diffusers; attention and noise-diff need nothing beyond the webui's own packages).
"""

import importlib.metadata
import os
import tempfile
from pathlib import Path

try:
    import launch
except ImportError:  # not a webui (ComfyUI-Manager, or python install.py by hand): nothing to do here
    launch = None

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


def requirement_name(line: str) -> str:
    """The distribution name of a requirement line ("scikit-image>=0.22" -> "scikit-image")."""
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
        line = line.split(sep)[0]
    return line.strip()


def installed_versions() -> list[str]:
    """``name==version`` for every distribution in the webui's environment."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").strip()
        if name and dist.version:
            pins[name.lower()] = f"{name}=={dist.version}"
    return sorted(pins.values())


def install() -> None:
    missing = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not launch.is_installed(requirement_name(line)):
            missing.append(line)
    if not missing:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="textmask-constraints-", delete=False) as f:
        f.write("\n".join(installed_versions()) + "\n")
    try:
        for line in missing:
            try:
                launch.run_pip(f'install "{line}" --constraint "{f.name}"', f"textmask requirement: {line}")
            except Exception as e:  # noqa: BLE001  (the webui's run() raises RuntimeError with pip's output)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"textmask: skipped {line}: it does not fit this webui's installed packages ({first})")
    finally:
        os.unlink(f.name)


if launch is not None:
    install()
