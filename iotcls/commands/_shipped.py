"""Where a file that iotcls ships beside its Python code (the Zeek package, the Suricata
script) is: in the installed package, else in the source tree this module runs from (an
editable install, or a checkout run without installing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..cli import CliError


def shipped(package: str, tree_dir: str, name: str, marker: str = "") -> Path:
    """``name`` inside the data package ``package`` (e.g. ``iotcls.zeek_scripts``) or inside
    ``tree_dir`` at the top of the source tree; ``marker`` is a file it must contain (for a
    directory), else ``name`` must be a file."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ModuleNotFoundError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / name for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / tree_dir / name)
    for c in candidates:
        if (c / marker).is_file() if marker else c.is_file():
            return c
    raise CliError(
        f"{name} is missing from this installation of iotcls "
        f"(looked in {', '.join(map(str, candidates))})"
    )
