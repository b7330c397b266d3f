"""The C++ kernel cache: one folder per build configuration (a second torch installation of the
same version is a second folder, not a rebuild of the first), and one build at a time into a
folder (a second process waits for the lock; a stale build baton left by a killed build does
not block)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from ntksap.sparse import _ext


def test_key_depends_on_torch_installation_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("NTKSAP_EXTENSION_DIR", str(tmp_path))
    here = _ext.build_dir()
    assert here == _ext.build_dir()  # stable within one installation
    # the same torch version installed in another environment: other headers and libraries
    # in the compile and link commands, so another folder
    other = tmp_path / "other-env" / "site-packages" / "torch" / "__init__.py"
    monkeypatch.setattr(torch, "__file__", str(other))
    assert _ext.build_dir() != here
    assert _ext.build_dir().parent == tmp_path


def test_key_depends_on_compiler_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("NTKSAP_EXTENSION_DIR", str(tmp_path))
    here = _ext.build_dir()
    monkeypatch.setenv("CXX", "a-compiler-that-is-not-there")
    assert _ext.build_dir() != here
    monkeypatch.delenv("CXX")
    assert _ext.build_dir() == here
    monkeypatch.setattr(_ext, "FLAGS", [*_ext.FLAGS, "-DSOMETHING"])
    assert _ext.build_dir() != here


# A child process that builds with torch's compiler replaced by a marker write: it shows when
# the child got past the build lock.
_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from torch.utils import cpp_extension
    from ntksap.sparse import _ext

    def fake_load(**kwargs):
        Path(sys.argv[1]).write_text(kwargs["build_directory"])
        return None

    cpp_extension.load = fake_load
    _ext.build()
    """
)


def test_second_build_waits_for_the_lock(monkeypatch, tmp_path):
    monkeypatch.setenv("NTKSAP_EXTENSION_DIR", str(tmp_path / "ext"))
    folder = _ext.build_dir()
    marker = tmp_path / "built"
    with _ext.build_lock(folder):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(marker)])
        time.sleep(4.0)  # ample for the child to import torch and reach the lock
        assert child.poll() is None, "the second build did not wait for the lock"
        assert not marker.exists()
    assert child.wait(timeout=120) == 0
    assert marker.read_text() == str(folder)


def test_stale_baton_of_a_killed_build_is_removed(monkeypatch, tmp_path):
    monkeypatch.setenv("NTKSAP_EXTENSION_DIR", str(tmp_path / "ext"))
    folder = _ext.build_dir()
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # torch's FileBaton, left by a build killed half-way
    marker = tmp_path / "built"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(marker)], timeout=120)
    assert proc.returncode == 0
    assert marker.exists()
    assert not (folder / "lock").exists()
    assert Path(str(folder) + ".lock").exists()  # our lock file sits beside the folder
