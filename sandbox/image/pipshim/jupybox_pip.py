"""pip inside the sandbox: installs from the server's wheelhouse, never from a network.

Runs on the kernel's Python with the standard library only (no jupybox import). The sandbox has no
network and cannot write where packages go, so this module only checks a request and asks the host:

* in the kernel (``%pip install``): a display message of type ``MIME`` on iopub;
* in a subprocess (``!pip install``, ``subprocess.run(["pip", ...])``, ``python -m pip``): a line on
  stdout that starts with ``MARKER`` (the kernel forwards its children's output).

The host installs into the session's site folder (read-only here, at ``JUPYBOX_SITE``) and writes
``.answers/<id>.json``, which this module waits for. ``activate`` (called by kernel_boot.py) puts
earlier installs on ``sys.path``, registers the ``%pip`` magic, and adds an import hook that finds
folders installed while the kernel runs.
"""

import importlib
import importlib.machinery
import json
import os
import re
import sys
import time

MIME = "application/vnd.jupybox.pip+json"
MARKER = "\x1ejupybox-pip:"
WAIT_S = 60.0
NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
REQUIREMENT = re.compile(r"^" + NAME + r"(?:\[" + NAME + r"(?:," + NAME + r")*\])?"
                         r"(?:(?:==|>=|<=|~=|!=|<|>)[A-Za-z0-9.*+!]+(?:,(?:==|>=|<=|~=|!=|<|>)[A-Za-z0-9.*+!]+)*)?$")
IGNORED = {"-q", "--quiet", "-qq", "-v", "--verbose", "-U", "--upgrade", "--user", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "--progress-bar=off", "--no-color", "--only-binary=:all:"}
INDEX_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host", "--proxy",
                 "--no-index", "--pre", "--index")
HINT = "jupybox installs packages from the server's wheelhouse only (the sandbox has no network)"


class Refused(Exception):
    """A pip request this sandbox does not serve; the message says why and what works."""


def site_folder():
    return os.environ.get("JUPYBOX_SITE", "/opt/jupybox/site")


def parse_install(args):
    """The requirements of ``pip install ARGS``, or ``Refused``."""
    reqs = []
    for arg in args:
        if arg in IGNORED:
            continue
        if arg.split("=", 1)[0] in INDEX_OPTIONS:
            raise Refused(f"{arg.split('=', 1)[0]} is not available: {HINT}")
        if arg in ("-e", "--editable", "-r", "--requirement", "-c", "--constraint", "-t", "--target", "--prefix"):
            raise Refused(f"{arg} is not available: {HINT}; name the packages, e.g. `%pip install tabulate`")
        if arg.startswith("-"):
            raise Refused(f"the option {arg} is not available: {HINT}")
        if "://" in arg or arg.startswith(("git+", "hg+", "svn+", "bzr+")) or "@" in arg:
            raise Refused(f"{arg!r} is a URL or VCS reference: {HINT}; name a package instead")
        if "/" in arg or "\\" in arg or arg.startswith(".") or arg.endswith((".whl", ".tar.gz", ".zip", ".tgz")):
            raise Refused(f"{arg!r} is a file or path: {HINT}; sdists and local files are not installed")
        spec = arg.replace(" ", "")
        if not REQUIREMENT.match(spec):
            raise Refused(f"{arg!r} is not a package name with an optional version (NAME or NAME==VERSION)")
        reqs.append(spec)
    if not reqs:
        raise Refused("name at least one package: `%pip install NAME`")
    return reqs


def wait_answer(rid):
    path = os.path.join(site_folder(), ".answers", rid + ".json")
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            time.sleep(0.02)
    return {"ok": False, "error": f"no answer from the server within {WAIT_S:g} s (is this sandbox run by jupybox?)"}


def report(answer, out, err):
    """Print the host's answer as pip would; returns pip's exit status."""
    for note in answer.get("notes") or []:
        print(f"Requirement already satisfied: {note}", file=out)
    if not answer.get("ok"):
        print(f"ERROR: {answer.get('error')}", file=err)
        return 1
    installed = answer.get("installed") or []
    if installed:
        print("Successfully installed " + " ".join(f"{n}-{v}" for n, v in installed) + " (from the server's wheelhouse)",
              file=out)
    return 0


def use_site():
    """Put every install folder of the site on ``sys.path`` (after the image's own packages)."""
    root = site_folder()
    try:
        names = sorted((n for n in os.listdir(root) if n.isdigit()), key=int)
    except OSError:
        return []
    added = []
    for name in names:
        path = os.path.join(root, name)
        if path not in sys.path:
            sys.path.append(path)
            added.append(path)
    if added:
        importlib.invalidate_caches()
    return added


class SiteFinder:
    """Last on ``sys.meta_path``: an import that nothing found looks once more, after picking up
    folders the host installed since (an install from a subprocess)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is not None:
            return None
        added = use_site()
        return importlib.machinery.PathFinder.find_spec(name, added) if added else None

    @classmethod
    def invalidate_caches(cls):
        pass


def in_kernel_install(args):
    """``%pip install``: ask the host over iopub, then import works in this kernel at once."""
    from IPython.display import publish_display_data

    rid = os.urandom(12).hex()
    publish_display_data({MIME: {"id": rid, "requirements": parse_install(args)}})
    answer = wait_answer(rid)
    use_site()
    return report(answer, sys.stdout, sys.stderr)


def pip_magic(line):
    args = line.split()
    try:
        if not args or args[0] != "install":
            return main(args)
        in_kernel_install(args[1:])
    except Refused as exc:
        print(f"ERROR: {exc}", file=sys.stderr)


def activate(shell):
    """Called by kernel_boot.py once the shell exists."""
    use_site()
    sys.meta_path.append(SiteFinder)
    if shell is not None:
        shell.register_magic_function(pip_magic, "line", "pip")


def installed_distributions():
    from importlib import metadata

    paths = sys.path + [p for p in use_site() if p not in sys.path]
    return sorted({(d.metadata["Name"], d.version) for d in metadata.distributions(path=paths) if d.metadata["Name"]},
                  key=lambda nv: nv[0].lower())


def main(argv):
    """``pip`` run as a program inside the sandbox."""
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(f"pip in this sandbox: {HINT}.\n  pip install NAME[==VERSION] ...\n  pip list")
            return 0
        if argv[0] == "install":
            reqs = parse_install(argv[1:])
            rid = os.urandom(12).hex()
            sys.stdout.write(MARKER + json.dumps({"id": rid, "requirements": reqs}) + "\n")
            sys.stdout.flush()
            return report(wait_answer(rid), sys.stdout, sys.stderr)
        if argv[0] in ("list", "freeze"):
            sep = "==" if argv[0] == "freeze" else " "
            for name, version in installed_distributions():
                print(f"{name}{sep}{version}")
            return 0
        if argv[0] == "--version":
            print(f"pip (jupybox wheelhouse shim) python {sys.version_info[0]}.{sys.version_info[1]}")
            return 0
        raise Refused(f"`pip {argv[0]}` is not available: {HINT}; `pip install NAME` and `pip list` are")
    except Refused as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
