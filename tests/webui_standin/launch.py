"""Stand-in of the webui's launch.py: ``is_installed(package)`` and ``run_pip(command, desc=None, live=...)``."""

installed: set[str] = set()
pip_calls: list[tuple[str, str]] = []


def is_installed(package):
    return package in installed


def run_pip(command, desc=None, live=False):
    pip_calls.append((command, desc))
