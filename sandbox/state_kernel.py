"""The kernel side of saving and restoring a session's variables; runs *inside* the kernel.

``sandbox/state.py`` sends this file's source to the kernel as one silent execution, in a private
namespace (``user_ns`` is the only name it is given), so nothing of it stays among the user's
names. It uses the standard library only, and ``dill`` where the kernel has it. What it promises:

* Each variable goes into a file of its own, pickled with the C pickler (protocol 5) and, for
  what that cannot do (functions, lambdas and classes defined in the session), with dill.
  Pickling streams into a file that counts bytes and stops past the cap, so a 1 GB object is
  never copied in memory and a variable over the cap is skipped, not a failed save.
* Identity between variables survives: an object that is an earlier variable (the class of an
  instance, a list two names share) is written as a reference to that variable, not a copy.
* A save writes a new folder inside ``STATE_DIR``, then replaces ``manifest.json`` (which names
  that folder) in one rename: a save cut short never looks complete, and a failed one keeps the
  previous state. Folders no manifest names are leftovers and are removed.
* It prints exactly one line: ``MARKER`` followed by the report as JSON, kept under a size.
"""

import errno
import importlib
import io
import json
import os
import pickle
import shutil
import socket
import sys
import threading
import time
import types
import warnings

STATE_DIR = ".jupybox-state"
MANIFEST = "manifest.json"
MARKER = "\x1ejupybox-state "
FORMAT = 1
BUFFER = 1 << 20  # large writes and reads: a 100 MB array goes through in a few system calls
MANIFEST_CAP = 64 << 20
NAME_CHARS = 80
REASON_CHARS = 120
# IPython's own names, for a shell that does not say which are hidden
DEFAULT_HIDDEN = {"In", "Out", "exit", "quit", "get_ipython", "open"}
SPACE_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), range)


class TooLarge(Exception):
    """The pickle passed its byte cap."""


class NeedsDill(Exception):
    """The C pickler would write a reference to ``__main__`` that a fresh kernel cannot resolve."""


class CappedFile:
    """A write-only file that counts bytes and raises ``TooLarge`` once past ``cap``."""

    def __init__(self, raw, cap):
        self.raw = raw
        self.cap = cap
        self.written = 0

    def write(self, data):
        self.written += memoryview(data).nbytes
        if self.written > self.cap:
            raise TooLarge(self.written)
        return self.raw.write(data)


def human(n):
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def clip(text, limit):
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unpicklable_kind(value):
    """Words for values that never survive a new process, before trying (dill would pickle an
    open file as its name and position, which is not the same file on resume)."""
    kinds = ((socket.socket, "a socket"), (types.GeneratorType, "a generator"),
             (types.AsyncGeneratorType, "an async generator"), (types.CoroutineType, "a coroutine"),
             (types.FrameType, "a frame"), (threading.Thread, "a thread"),
             (type(threading.Lock()), "a lock"), (type(threading.RLock()), "a lock"))
    for cls, words in kinds:
        if isinstance(value, cls):
            return words
    if isinstance(value, io.IOBase) and not isinstance(value, (io.BytesIO, io.StringIO)):
        return "an open file"
    return None


def load_dill():
    try:
        import dill
    except Exception:
        return None
    return dill


def file_size_limit():
    """The kernel's own limit on a file's size (``RLIMIT_FSIZE``): a pickle past it fails with
    EFBIG, so it caps each variable like ``max_var_bytes`` does."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except Exception:  # noqa: BLE001 -- no such limit here
        return float("inf")
    return float("inf") if soft == resource.RLIM_INFINITY else soft


def hidden_names(user_ns):
    """IPython's own names and values (``In``, ``Out``, ``exit``...), as ``%who`` leaves them out."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:
        shell = None
    hidden = getattr(shell, "user_ns_hidden", None)
    if isinstance(hidden, dict):
        return hidden
    return {name: user_ns[name] for name in DEFAULT_HIDDEN if name in user_ns}


def picklers(dill):
    """The C pickler, and dill's where the kernel has it, both writing earlier variables as
    references (``persistent_id``)."""

    class StdPickler(pickle.Pickler):
        def __init__(self, file, refs):
            super().__init__(file, protocol=5)
            self.refs = refs

        def persistent_id(self, obj):
            return self.refs.get(id(obj))

        def reducer_override(self, obj):
            if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
                raise NeedsDill(getattr(obj, "__qualname__", "?"))
            return NotImplemented

    found = [("pickle", StdPickler)]
    if dill is not None:
        class DillPickler(dill.Pickler):
            def __init__(self, file, refs):
                super().__init__(file, protocol=5)
                self.refs = refs

            def persistent_id(self, obj):
                return self.refs.get(id(obj))

        found.append(("dill", DillPickler))
    return found


def dump(value, path, cap, refs, pickler_list):
    """Pickle ``value`` into ``path`` with the first pickler that can; (bytes, pickler name)."""
    last = None
    for kind, cls in pickler_list:
        with open(path, "wb", buffering=BUFFER) as raw:
            capped = CappedFile(raw, cap)
            try:
                cls(capped, refs).dump(value)
            except (TooLarge, OSError, MemoryError):
                raise
            except NeedsDill as exc:
                last = exc
                continue
            except Exception as exc:  # noqa: BLE001 -- whatever the object's own reduce raises
                last = exc
                continue
        return capped.written, kind
    if isinstance(last, NeedsDill):
        raise NeedsDill("defined in the session: saving it needs dill, which this kernel lacks")
    raise last


def discard(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_folder(path):
    try:
        shutil.rmtree(path)
    except Exception:  # noqa: BLE001 -- a deep tree planted there; best effort
        pass


def remove_leftovers(root, keep):
    """Everything in ``root`` but the manifest and the folder it names: interrupted saves."""
    for entry in os.listdir(root):
        if entry in (MANIFEST, keep):
            continue
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            remove_folder(path)
        else:
            try:
                discard(path)
            except OSError:
                pass


def read_manifest(root):
    """The manifest as a dict, checked; ``ValueError`` / ``OSError`` with words otherwise."""
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"no {MANIFEST} in {STATE_DIR}")
    with open(path, "rb") as fh:
        data = fh.read(MANIFEST_CAP + 1)
    if len(data) > MANIFEST_CAP:
        raise ValueError(f"{MANIFEST} is over {human(MANIFEST_CAP)}")
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{MANIFEST} is not valid JSON: {exc}") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT
          and isinstance(manifest.get("folder"), str) and os.sep not in manifest["folder"]
          and manifest["folder"] not in ("", ".", "..")
          and isinstance(manifest.get("variables"), list) and isinstance(manifest.get("modules"), dict)
          and isinstance(manifest.get("skipped"), dict))
    if not ok:
        raise ValueError(f"{MANIFEST} is not a jupybox state manifest of format {FORMAT}")
    return manifest


def candidates(user_ns):
    """The user's names worth saving, classes first and functions next (so that instances and
    callers refer to them), then the rest in the order they were defined."""
    hidden = hidden_names(user_ns)
    missing = object()
    found = []
    for name, value in list(user_ns.items()):
        if not isinstance(name, str) or name.startswith("_"):
            continue
        if hidden.get(name, missing) is value:
            continue
        found.append((name, value))
    rank = {True: 0, False: 1}
    found.sort(key=lambda item: (rank[isinstance(item[1], type)],
                                 rank[isinstance(item[1], (types.FunctionType, types.BuiltinFunctionType))]))
    return found


def save(user_ns, workspace, max_var_bytes, max_total_bytes, max_vars):
    report = {"action": "save", "saved": [], "skipped": {}, "modules": {}, "bytes": 0, "error": None}
    root = os.path.join(workspace, STATE_DIR)
    dill = load_dill()
    pickler_list = picklers(dill)
    folder = None
    try:
        os.makedirs(root, exist_ok=True)
        try:
            keep = read_manifest(root)["folder"]
        except (OSError, ValueError):
            keep = None
        remove_leftovers(root, keep)
        folder = os.path.join(root, f"save-{os.getpid()}-{time.time_ns():x}")
        os.mkdir(folder)
        variables, refs, total = [], {}, 0
        file_limit = file_size_limit()
        skipped = report["skipped"]
        for name, value in candidates(user_ns):
            if isinstance(value, types.ModuleType):
                if sys.modules.get(value.__name__) is value:
                    report["modules"][name] = value.__name__
                else:
                    skipped[name] = "a module"
                continue
            if len(variables) >= max_vars:
                skipped[name] = f"over the limit of {max_vars} variables"
                continue
            same = refs.get(id(value))
            if same is not None:
                variables.append({"name": name, "same_as": same})
                report["saved"].append(name)
                continue
            kind = unpicklable_kind(value)
            if kind is not None:
                skipped[name] = kind
                continue
            cap = min(max_var_bytes, max_total_bytes - total, file_limit)
            file = f"{len(variables):05d}.pkl"
            path = os.path.join(folder, file)
            try:
                size, pickler = dump(value, path, cap, refs, pickler_list)
            except TooLarge:
                discard(path)
                limit = ("per variable" if cap == max_var_bytes else "file size limit" if cap == file_limit
                         else "left of the state's total")
                skipped[name] = f"too large: over the {human(cap)} {limit}"
                continue
            except OSError as exc:
                if exc.errno in SPACE_ERRNOS:
                    raise
                discard(path)
                if exc.errno == errno.EFBIG:
                    skipped[name] = "too large: over the sandbox's file size limit"
                    continue
                skipped[name] = clip(f"not written ({type(exc).__name__}: {exc})", REASON_CHARS)
                continue
            except NeedsDill as exc:
                discard(path)
                skipped[name] = clip(str(exc), REASON_CHARS)
                continue
            except Exception as exc:  # noqa: BLE001 -- reported by name, the save goes on
                discard(path)
                skipped[name] = clip(f"not picklable ({type(exc).__name__}: {exc})", REASON_CHARS)
                continue
            total += size
            type_name = type(value).__qualname__
            if type(value).__module__ not in ("builtins", "__main__"):
                type_name = f"{type(value).__module__}.{type_name}"
            variables.append({"name": name, "file": file, "bytes": size, "type": type_name, "pickler": pickler})
            report["saved"].append(name)
            if not isinstance(value, IMMUTABLE):
                refs[id(value)] = name
        manifest = {"format": FORMAT, "folder": os.path.basename(folder), "python": sys.version.split()[0],
                    "saved_at": time.time(), "variables": variables, "modules": report["modules"],
                    "skipped": skipped, "bytes": total}
        staged = os.path.join(folder, MANIFEST)
        with open(staged, "w") as fh:
            json.dump(manifest, fh)
        os.replace(staged, os.path.join(root, MANIFEST))  # the one step that makes the save count
        folder_done, folder = folder, None
        remove_leftovers(root, os.path.basename(folder_done))
        report["bytes"] = total
    except OSError as exc:
        report["saved"] = []
        if exc.errno in SPACE_ERRNOS:
            report["error"] = (f"no space left in the workspace (its quota): {exc.strerror}; free some room "
                               "(delete large files) and pause again")
        else:
            report["error"] = f"the variables could not be written ({type(exc).__name__}: {exc})"
    finally:
        if folder is not None:
            remove_folder(folder)
    return report


class Loader:
    """Loads the manifest's variables, each once, resolving references between them."""

    def __init__(self, folder, entries, dill):
        self.folder = folder
        self.entries = {e["name"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)}
        self.dill = dill
        self.values = {}
        self.failed = {}
        self.loading = set()

    def get(self, name):
        if name in self.values:
            return self.values[name]
        if name in self.failed:
            raise LookupError(f"needs {clip(name, 40)}, which was not restored")
        if name in self.loading or name not in self.entries:
            raise LookupError(f"refers to {clip(name, 40)}, which is not in the saved state")
        self.loading.add(name)
        try:
            value = self._load(self.entries[name])
        except Exception as exc:  # noqa: BLE001 -- reported by name
            reason = str(exc) if isinstance(exc, LookupError) else f"{type(exc).__name__}: {exc}"
            self.failed[name] = clip(f"could not be loaded ({reason})", REASON_CHARS)
            raise LookupError(f"needs {clip(name, 40)}, which was not restored") from None
        finally:
            self.loading.discard(name)
        self.values[name] = value
        return value

    def _load(self, entry):
        if isinstance(entry.get("same_as"), str):
            return self.get(entry["same_as"])
        file = entry.get("file")
        if not isinstance(file, str) or os.sep in file or file in ("", ".", ".."):
            raise ValueError("the manifest names no file for it")
        base = pickle.Unpickler
        if entry.get("pickler") == "dill":
            if self.dill is None:
                raise ModuleNotFoundError("it was saved with dill, which this kernel lacks")
            base = self.dill.Unpickler
        loader = self

        class Unpickler(base):
            def persistent_load(self, pid):
                return loader.get(pid)

        with open(os.path.join(self.folder, file), "rb", buffering=BUFFER) as fh:
            return Unpickler(fh).load()


def restore(user_ns, workspace):
    report = {"action": "restore", "restored": [], "skipped": {}, "modules": {}, "bytes": 0, "error": None}
    root = os.path.join(workspace, STATE_DIR)
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        report["error"] = (f"the saved state could not be read ({clip(reason, REASON_CHARS)}): a fresh kernel, "
                           "no variables restored")
        return report
    for alias, module in manifest["modules"].items():
        try:
            user_ns[alias] = importlib.import_module(str(module))
            report["modules"][alias] = module
        except Exception as exc:  # noqa: BLE001
            report["skipped"][alias] = clip(f"module {module} could not be imported ({type(exc).__name__})",
                                            REASON_CHARS)
    for name, reason in manifest["skipped"].items():
        report["skipped"][str(name)] = clip(reason, REASON_CHARS)
    loader = Loader(os.path.join(root, manifest["folder"]), manifest["variables"], load_dill())
    for name in loader.entries:
        try:
            user_ns[name] = loader.get(name)
        except LookupError:
            report["skipped"][name] = loader.failed.get(name, "could not be loaded")
            continue
        report["restored"].append(name)
        entry = loader.entries[name]
        report["bytes"] += entry.get("bytes", 0) if isinstance(entry.get("bytes"), int) else 0
    return report


def fit(report, limit):
    """Keep the printed report under ``limit`` characters: names and reasons are clipped, and
    lists cut (``unlisted`` says how many names each list left out)."""
    full = {key: report[key] for key in ("saved", "restored", "skipped", "modules") if key in report}
    keep = 200
    while True:
        out = dict(report)
        unlisted = {}
        for key, value in full.items():
            items = list(value.items()) if isinstance(value, dict) else list(value)
            if len(items) > keep:
                unlisted[key] = len(items) - keep
            items = items[:keep]
            if isinstance(value, dict):
                out[key] = {clip(k, NAME_CHARS): clip(v, REASON_CHARS) for k, v in items}
            else:
                out[key] = [clip(k, NAME_CHARS) for k in items]
        out["unlisted"] = unlisted
        text = json.dumps(out)
        if len(text) <= limit or keep == 0:
            return text
        keep //= 2


def run(action, user_ns, params):
    """Do ``action`` quietly (what the user's objects print while being pickled is dropped), then
    print the one report line."""
    started = time.perf_counter()
    stdout, stderr = sys.stdout, sys.stderr
    sink = open(os.devnull, "w")
    try:
        sys.stdout = sys.stderr = sink
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if action == "save":
                    report = save(user_ns, params["workspace"], params["max_var_bytes"],
                                  params["max_total_bytes"], params["max_vars"])
                else:
                    report = restore(user_ns, params["workspace"])
            except Exception as exc:  # noqa: BLE001 -- a report, never a traceback in the session
                report = {"action": action, "error": clip(f"{type(exc).__name__}: {exc}", 300)}
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        sink.close()
    report["seconds"] = round(time.perf_counter() - started, 4)
    stdout.write("\n" + MARKER + fit(report, params["report_chars"]) + "\n")
    stdout.flush()
