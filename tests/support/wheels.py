"""Wheels made here, so tests of the wheelhouse need no network: a pure-Python one (the benchmark's
own maker), and one with a C extension compiled by this host's compiler (the host and the sandbox image
are both CPython 3.11 on x86_64 glibc, so it loads there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.packages import pure_wheel

__all__ = ["compiled_wheel", "pure_wheel"]

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
