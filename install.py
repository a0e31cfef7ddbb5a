"""AUTOMATIC1111 / Forge installer: the webui runs this, not pip, so requirements.txt is installed here."""

from pathlib import Path

import launch

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


def requirement_name(line: str) -> str:
    """The distribution name of a requirement line ("scikit-image>=0.22" -> "scikit-image")."""
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
        line = line.split(sep)[0]
    return line.strip()


for line in REQUIREMENTS.read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    name = requirement_name(line)
    if not launch.is_installed(name):
        launch.run_pip(f'install "{line}"', f"textmask requirement: {line}")
