"""Build this package's wheel from a clean copy of the source tree and install it into a fresh
virtual environment, as a user who only runs ``pip install <wheel>`` would.

Fixtures (session-scoped, reusable by any packaging test):

* ``source_tree``: a copy of the files a fresh clone holds (git's tracked and not-ignored files of
  this checkout; symlinks kept), so leftovers such as ``build/`` or ``*.egg-info`` cannot leak in.
* ``built_wheel``: the wheel built from ``source_tree`` (``pip wheel --no-deps --no-build-isolation``:
  a few seconds, no network).
* ``installed_wheel`` (slow: minutes): a fresh venv with ``torch==2.13.0`` (installed first, a CPU
  build from local disk where there is one) and then only the wheel, its dependencies from the
  registry. :class:`InstalledWheel` runs commands there from a folder outside the repository, with
  network access blocked and every attempt recorded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH_REQUIREMENT = "torch==2.13.0"

#: imported at start-up by every Python process of the installed environment (via PYTHONPATH): any
#: attempt to open a network connection or resolve a host name is written to a log, then refused.
NETWORK_GUARD = '''
import os, socket, traceback

_LOG = os.environ["CODEFORMER_NETWORK_LOG"]


def _refuse(what):
    with open(_LOG, "a") as log:
        log.write(f"{what}\\n{''.join(traceback.format_stack(limit=12))}\\n")
    raise OSError(f"network access attempted in an offline test: {what}")


_connect = socket.socket.connect


def _guarded_connect(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect {address}")
    return _connect(self, address, *args)


socket.socket.connect = _guarded_connect
socket.getaddrinfo = lambda host, *a, **k: _refuse(f"resolve {host}")
'''


def source_files(repo: Path = REPO) -> list[Path]:
    """Paths (relative) a fresh clone of ``repo`` would hold: tracked plus untracked, not ignored."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=repo, capture_output=True, check=True).stdout
    return sorted({Path(p) for p in listing.decode().split("\0") if p and (repo / p).exists() or
                   p and (repo / p).is_symlink()})


def copy_source_tree(dest: Path, repo: Path = REPO) -> Path:
    """Copy the files of :func:`source_files` to ``dest`` (symlinks as symlinks); returns ``dest``."""
    for rel in source_files(repo):
        src, dst = repo / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


def build_wheel(source: Path, out_dir: Path) -> Path:
    """Build the wheel of ``source`` into ``out_dir`` with the running interpreter's setuptools."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(source), "-w", str(out_dir)], check=True, capture_output=True, text=True)
    (wheel,) = out_dir.glob("codeformer_lightning-*.whl")
    return wheel


@dataclass
class InstalledWheel:
    """A fresh virtual environment holding torch and the built wheel (and its dependencies) only."""

    venv: Path
    workdir: Path  # outside the repository: nothing of the source tree is importable from here
    network_log: Path

    @property
    def bin(self) -> Path:
        return self.venv / ("Scripts" if os.name == "nt" else "bin")

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self) -> dict[str, str]:
        """Environment for commands: no proxies that work, the network guard on, no user site."""
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")
               and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        dead = "http://127.0.0.1:9"  # the discard port: nothing answers there
        env.update(HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead, http_proxy=dead, https_proxy=dead,
                   NO_PROXY="", PYTHONNOUSERSITE="1", PYTHONPATH=str(self.network_log.parent / "guard"),
                   CODEFORMER_NETWORK_LOG=str(self.network_log), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                   PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(self.venv))
        return env

    def run(self, *args: str | Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``args`` (a console script name or ``python``) in the environment, from ``workdir``."""
        command = [str(self.bin / str(args[0])), *map(str, args[1:])]
        done = subprocess.run(command, cwd=self.workdir, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}\n"
                                 f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}")
        return done

    def network_attempts(self) -> str:
        return self.network_log.read_text() if self.network_log.exists() else ""


@pytest.fixture(scope="session")
def source_tree(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("packaging tests copy the checkout's files with git; no git checkout here")
    return copy_source_tree(tmp_path_factory.mktemp("source") / "codeformer_lightning")


@pytest.fixture(scope="session")
def built_wheel(source_tree, tmp_path_factory) -> Path:
    return build_wheel(source_tree, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def installed_wheel(built_wheel, tmp_path_factory) -> InstalledWheel:
    root = tmp_path_factory.mktemp("installed")
    venv, workdir = root / "venv", root / "work"
    workdir.mkdir()
    (root / "guard").mkdir()
    (root / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = InstalledWheel(venv, workdir, root / "network.log")
    pip = [str(installed.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for requirement in (TORCH_REQUIREMENT, str(built_wheel)):  # torch first: pip keeps that build
        done = subprocess.run([*pip, requirement], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise AssertionError(f"pip install {requirement} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return installed
