"""The Zeek package's btests (testing/, what ``zkg test iotcls`` runs), run with the Zeek the
other real-Zeek tests use."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iotcls.testing.zeek import find_zeek

TESTING = Path(__file__).resolve().parent.parent / "testing"


@pytest.mark.zeek
def test_btests_pass(tmp_path):
    zeek = find_zeek()
    bindir = str(Path(sys.executable).parent)  # btest and zeek-cut's neighbours
    env = dict(os.environ, PATH=f"{Path(zeek).parent}:{bindir}:{os.environ['PATH']}")
    r = subprocess.run(
        [str(Path(bindir) / "btest"), "-c", "btest.cfg", "-d", "-j", "2"],
        cwd=TESTING,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr  # btest reports on stderr
    assert r.returncode == 0, out[-6000:]
    m = re.search(r"all (\d+) tests successful", out)
    assert m and int(m.group(1)) >= 5, out[-2000:]


def _snapshot_repo(dest: Path) -> Path:
    """A git repository of the working tree as it is (zkg installs from git): tracked and
    untracked files, less what .gitignore leaves out."""
    root = TESTING.parent
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (root / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, dest / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(dest)]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    return dest


@pytest.mark.zeek
def test_zkg_install_then_zkg_test(tmp_path):
    """As a Zeek user: `zkg install` the repository, then `zkg test iotcls` (the btests)."""
    zkg = Path(sys.executable).parent / "zkg"
    if not zkg.exists():
        pytest.skip("zkg is a dev dependency (pip install zkg)")
    repo = _snapshot_repo(tmp_path / "iotcls")  # zkg names the package after the directory
    cfg = tmp_path / "zkg.cfg"
    cfg.write_text(
        "[sources]\n[paths]\n"
        + "".join(
            f"{k} = {tmp_path / k}\n" for k in ("state_dir", "script_dir", "plugin_dir", "bin_dir")
        )
    )
    zeek = find_zeek()
    env = dict(os.environ, PATH=f"{Path(zeek).parent}:{zkg.parent}:{os.environ['PATH']}")
    run = [str(zkg), "--configfile", str(cfg)]
    r = subprocess.run(
        run + ["install", "--force", "--skiptests", str(repo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "script_dir" / "packages" / "iotcls" / "__load__.zeek").is_file()
    # zkg built the native capture plugin too (zkg.meta's build_command, plugin_dir)
    assert list((tmp_path / "plugin_dir").rglob("__zeek_plugin__")), "no plugin installed"
    # the package as it was installed: from this path (a package source would give its name)
    r = subprocess.run(
        run + ["test", str(repo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all tests passed" in (r.stdout + r.stderr).lower() or "pass" in r.stdout.lower()
