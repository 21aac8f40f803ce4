"""Installing: the locks match pyproject.toml, `make install` installs them, a wrong Python or
a failed install leaves no half `.venv`, and the built package holds only the service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from service import create_app
from service.settings import ConfigError
from tests.support import ROOT

DEV_ONLY = {"fakeredis", "lupa", "pytest", "hypothesis", "uv"}


def pins(lock: Path, marker_env: dict | None = None) -> dict[str, str]:
    """name → pinned version of a uv-compiled lock, for the lines that apply here."""
    found = {}
    for line in lock.read_text().splitlines():
        if not line or line[0] in " #-":
            continue
        requirement = Requirement(line.rstrip(" \\"))
        if requirement.marker is None or requirement.marker.evaluate(marker_env):
            [specifier] = requirement.specifier
            assert specifier.operator == "==", line
            found[canonicalize_name(requirement.name)] = specifier.version
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


RUNTIME, DEV = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-dev.txt")


@pytest.mark.parametrize("lock, extra", [("requirements.txt", None), ("requirements-dev.txt", "dev")])
def test_each_lock_pins_what_pyproject_asks_for(lock, extra):
    """A fresh lock: every dependency of pyproject.toml is pinned within its range."""
    pinned = pins(ROOT / lock)
    wanted = project()["dependencies"] + (project()["optional-dependencies"][extra] if extra else [])
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not in {lock}: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{lock} pins {name}=={pinned[name]}, pyproject.toml wants {requirement.specifier}: "
            "run `make lock`"
        )


def test_the_image_lock_is_the_dev_lock_without_the_dev_parts():
    assert {name: DEV[name] for name in RUNTIME} == RUNTIME  # the same versions CI tests
    assert set(DEV) >= DEV_ONLY
    assert DEV_ONLY & set(RUNTIME) == set()


def test_python_3_11_to_3_13_may_install():
    requires = SpecifierSet(project()["requires-python"])
    assert [minor for minor in ("3.10", "3.11", "3.12", "3.13") if requires.contains(minor + ".0")] == [
        "3.11",
        "3.12",
        "3.13",
    ]


def test_this_environment_was_installed_from_the_dev_lock():
    """What `make install` (and so CI) installed is exactly the lock, not the newest releases."""
    assert {name: version(name) for name in DEV} == DEV


def run_make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "MAKEFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_make_install_refuses_an_old_python_in_one_line(tmp_path):
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.10.13' && exit 0\nexit 1\n")
    old.chmod(0o755)
    venv = tmp_path / "venv"
    result = run_make("install", f"PYTHON={old}", f"VENV={venv}")
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert line.endswith(
        f"*** Python 3.11 or newer is needed; PYTHON={old} is Python 3.10.13: "
        "make install PYTHON=/path/to/python3.11.  Stop."
    )
    assert not venv.exists()


@pytest.mark.slow
def test_a_failed_install_leaves_no_venv(tmp_path):
    """pip cannot reach any package (no index): the venv it had started is removed."""
    venv = tmp_path / "venv"
    result = run_make(
        "install",
        f"PYTHON={sys.executable}",
        f"VENV={venv}",
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "--require-hashes -r requirements-dev.txt" in result.stdout  # it got that far
    assert not venv.exists()


@pytest.mark.slow
def test_the_wheel_holds_only_the_service(tmp_path):
    """What the image installs: the package and its metadata, built from a clean checkout."""
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(checkout),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "dist").glob("sms_sessions-*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"service", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not any(name.endswith(".pyc") for name in zipfile.ZipFile(wheel).namelist())
    scripts = {path.name for path in (ROOT / "service" / "store").glob("*.lua")}
    shipped = {name.rpartition("/")[2] for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".lua")}
    assert scripts and shipped == scripts  # the store's Lua scripts, read at import


def test_without_the_dev_extra_an_unset_redis_url_is_one_line(monkeypatch):
    """The image has no embedded store: REDIS_URL unset is refused, not an ImportError."""
    monkeypatch.setitem(sys.modules, "fakeredis", None)
    with pytest.raises(
        ConfigError,
        match=r"^REDIS_URL is not set and the embedded in-memory store "
        r"is not installed \(pip install 'sms-sessions\[dev\]'\)$",
    ):
        create_app({"TWILIO_AUTH_TOKEN": "t"})


@pytest.mark.slow
def test_make_install_with_another_python_rebuilds_the_venv(tmp_path):
    """A .venv of one Python, up to date with the lock: `make install PYTHON=<another>`
    rebuilds it (here it gets as far as pip, which has no index), the same PYTHON or none
    given leaves it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / ".installed").touch()
    other = (
        next(
            (
                p
                for p in (f"/root/.pyenv/versions/{v}/bin/python3" for v in ("3.12.1", "3.13.0"))
                if Path(p).exists()
            ),
            None,
        )
        or shutil.which("python3.12")
        or shutil.which("python3.13")
    )
    if other is None:
        pytest.skip("no second Python 3.11+ on this machine to rebuild with")
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    for kept in (("install", f"VENV={venv}"), ("install", f"VENV={venv}", f"PYTHON={sys.executable}")):
        result = run_make(*kept, env=offline)
        assert result.returncode == 0 and "Nothing to be done" in result.stdout, result.stdout + result.stderr
    rebuilt = run_make("install", f"VENV={venv}", f"PYTHON={other}", env=offline)
    assert f"rm -rf {venv}" in rebuilt.stdout and f"{other} -m venv {venv}" in rebuilt.stdout
