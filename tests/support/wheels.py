"""Wheels made here, so tests of the wheelhouse need no network: a pure-Python one written as a
zip, and one with a C extension compiled by this host's compiler (the host and the sandbox image
are both CPython 3.11 on x86_64 glibc, so it loads there)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

C_SOURCE = """#include <Python.h>
static PyObject *twice(PyObject *self, PyObject *arg) {
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLong(2 * v);
}
static PyMethodDef methods[] = {{"twice", twice, METH_O, "twice the number"}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "%(name)s", NULL, -1, methods};
PyMODINIT_FUNC PyInit_%(name)s(void) { return PyModule_Create(&module); }
"""


def pure_wheel(dest: Path, name: str, version: str = "0.1", requires: tuple[str, ...] = (),
               code: str = "VALUE = 1\n", extra: dict[str, bytes] | None = None) -> Path:
    """A ``py3-none-any`` wheel of package ``name`` whose ``__init__`` is ``code``."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", code)
        for member, data in (extra or {}).items():
            zf.writestr(f"{name}/{member}", data)
        zf.writestr(f"{info}/METADATA", metadata)
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def compiled_wheel(dest: Path, work: Path, name: str, version: str = "1.0") -> Path:
    """A ``cp311-cp311-linux_x86_64`` wheel of one C extension module ``name`` (``twice(n)``),
    built with setuptools and the host's C compiler, without network."""
    src = work / name
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                                        f'[project]\nname = "{name}"\nversion = "{version}"\n')
    (src / "setup.py").write_text(f'from setuptools import Extension, setup\nsetup(ext_modules=[Extension("{name}", ["{name}.c"])])\n')
    (src / f"{name}.c").write_text(C_SOURCE % {"name": name})
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
                    str(src), "-w", str(dest)], check=True, capture_output=True)
    return next(dest.glob(f"{name}-{version}-*.whl"))
