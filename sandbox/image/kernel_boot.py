"""Start an ipykernel with jupybox's guards; runs *inside* the sandbox, on the kernel's Python.

It depends on ipykernel only (no jupybox import), so it can be copied into an image or bound into
a bubblewrap root as a single file. Guards:

* an output budget per execution: past ``JUPYBOX_OUTPUT_LIMIT`` bytes, stdout/stderr keep only a
  tail, and the kernel says how many bytes it dropped (``[jupybox: N bytes of output truncated]``).
  Dropping here, before anything is sent, keeps an endless ``print`` loop from flooding the kernel's
  memory and the host's.
* no output history: IPython 9 tees every byte a cell writes to stdout/stderr, and every result
  and display bundle (images included), into ``history_manager`` for the life of the kernel, above
  the budget. jupybox keeps no use for that history, so it is switched off: what a session prints
  does not stay in kernel memory.
* ``input()`` already fails fast because jupybox sends ``allow_stdin=False``.
* ``pip`` installs from the server's wheelhouse (``jupybox_pip``, where the image has it): earlier
  installs of the session are importable, and ``%pip install`` asks the host.

Usage: ``python kernel_boot.py -f CONNECTION_FILE``
"""

import os
import shutil
import sys

TRUNCATION_MARK = "[jupybox: {} bytes of output truncated]"


class OutputBudget:
    """Head passes through; once the budget is spent, only the last ``tail`` bytes are kept."""

    def __init__(self, limit):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.reset()

    def reset(self):
        self.passed = 0
        self.tail = []  # (stream, text) chunks, newest last
        self.tail_size = 0
        self.dropped = 0

    def wrap(self, stream, real_write):
        def write(text):
            if not isinstance(text, str):
                return real_write(text)
            n = len(text)
            room = self.head_limit - self.passed
            if room > 0:
                head = text[:room]
                self.passed += len(head)
                real_write(head)
                text = text[room:]
                if not text:
                    return n
            self.tail.append((stream, real_write, text))
            self.tail_size += len(text)
            while self.tail_size > self.tail_limit and self.tail:
                s, w, t = self.tail[0]
                excess = self.tail_size - self.tail_limit
                if len(t) <= excess:
                    self.tail.pop(0)
                    self.tail_size -= len(t)
                    self.dropped += len(t)
                else:
                    self.tail[0] = (s, w, t[excess:])
                    self.tail_size -= excess
                    self.dropped += excess
            return n

        return write

    def finish(self):
        """Called after each cell: emit the kept tail after a notice of what was dropped."""
        if self.dropped:
            first_write = self.tail[0][1] if self.tail else None
            if first_write is not None:
                first_write("\n" + TRUNCATION_MARK.format(self.dropped) + "\n")
        for _, write, text in self.tail:
            write(text)
        self.reset()


def seed_matplotlib_config():
    """Copy the image's prebuilt matplotlib font cache to ``MPLCONFIGDIR`` before matplotlib loads.

    The sandbox's root filesystem is read-only and ``/tmp`` starts empty, so without this each new
    kernel spends seconds rebuilding the font cache on its first plot. No-op unless
    ``JUPYBOX_MPL_SEED`` names a folder and ``MPLCONFIGDIR`` does not exist yet.
    """
    seed = os.environ.get("JUPYBOX_MPL_SEED")
    target = os.environ.get("MPLCONFIGDIR")
    if not seed or not target or not os.path.isdir(seed) or os.path.exists(target):
        return
    try:
        shutil.copytree(seed, target)
    except OSError:
        pass  # matplotlib then builds its own cache: slower, not wrong


def pipe_forked_output_over_ipc():
    """ipykernel relays the output of forked children (multiprocessing) through a ZMQ pipe bound
    on TCP 127.0.0.1. Bind it to a Unix socket in /tmp instead, so the kernel opens no TCP port
    at all; the relay itself keeps working."""
    import tempfile

    import zmq
    from ipykernel import iostream

    path = os.path.join(tempfile.gettempdir(), "jupybox-iopub-pipe-%d" % os.getpid())

    def setup_pipe_in(self):
        self._pipe_uuid = os.urandom(16)
        pipe_in = self.socket.context.socket(zmq.PULL)
        pipe_in.linger = 0
        pipe_in.bind("ipc://" + path)
        self._pipe_in = iostream.ZMQStream(pipe_in, self.io_loop)
        self._pipe_in.on_recv(self._handle_pipe_msg)

    def setup_pipe_out(self):
        ctx = zmq.Context()
        pipe_out = ctx.socket(zmq.PUSH)
        pipe_out.linger = 3000
        pipe_out.connect("ipc://" + path)
        return ctx, pipe_out

    if hasattr(iostream.IOPubThread, "_setup_pipe_in") and hasattr(iostream.IOPubThread, "_setup_pipe_out"):
        iostream.IOPubThread._setup_pipe_in = setup_pipe_in
        iostream.IOPubThread._setup_pipe_out = setup_pipe_out


def cap_bundle(data, text_limit, image_limit):
    """A MIME bundle whose values fit the limits: long text is cut (with a note), an image or
    structured value that is too large is replaced by a note, so no message outgrows what the
    host accepts."""
    import json

    capped = {}
    for mime, value in dict(data or {}).items():
        size = len(value) if isinstance(value, str) else len(json.dumps(value, default=str))
        limit = image_limit if mime.startswith("image/") else text_limit
        if size <= limit:
            capped[mime] = value
        elif isinstance(value, str) and not mime.startswith("image/"):
            capped[mime] = value[:limit] + "\n" + TRUNCATION_MARK.format(size - limit)
        else:
            note = "[jupybox: a {} output of {} bytes was dropped: over the limit]".format(mime, size)
            capped["text/plain"] = note if "text/plain" not in capped else capped["text/plain"] + "\n" + note
    return capped


def cap_rich_outputs(shell, text_limit, image_limit):
    """Apply ``cap_bundle`` to display() outputs and to cell results."""
    publish = shell.display_pub.publish

    def capped_publish(data, metadata=None, *args, **kwargs):
        return publish(cap_bundle(data, text_limit, image_limit), metadata, *args, **kwargs)

    shell.display_pub.publish = capped_publish
    write_format_data = shell.displayhook.write_format_data

    def capped_write_format_data(format_dict, md_dict=None):
        return write_format_data(cap_bundle(format_dict, text_limit, image_limit), md_dict)

    shell.displayhook.write_format_data = capped_write_format_data


class Forgetful(dict):
    """A mapping that keeps nothing: IPython's output history is written here and dropped."""

    def __missing__(self, key):
        return []

    def __setitem__(self, key, value):
        pass

    def setdefault(self, key, default=None):
        return default

    def update(self, *args, **kwargs):
        pass


def forget_output_history(shell):
    """Stop IPython from keeping every cell's output (see the module docstring). ``_tee`` wraps the
    streams' ``write`` for each cell to copy what passes into the history; the three mappings hold
    stream text, result and display bundles, and tracebacks."""
    import contextlib

    if hasattr(shell, "_tee"):
        shell._tee = lambda channel: contextlib.nullcontext()
    history = getattr(shell, "history_manager", None)
    for name in ("outputs", "output_hist_reprs", "exceptions"):
        if history is not None and hasattr(history, name):
            setattr(history, name, Forgetful())


def use_wheelhouse(shell):
    """``%pip`` and the session's installed packages; absent from images older than the shim."""
    try:
        import jupybox_pip
    except ImportError:
        return
    jupybox_pip.activate(shell)


def main(argv):
    seed_matplotlib_config()
    pipe_forked_output_over_ipc()
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(argv)
    limit = int(os.environ.get("JUPYBOX_OUTPUT_LIMIT", "100000"))
    budget = OutputBudget(limit)
    for stream in (sys.stdout, sys.stderr):
        stream.write = budget.wrap(stream.name, stream.write)
    shell = app.shell
    forget_output_history(shell)
    shell.events.register("pre_execute", budget.reset)
    shell.events.register("post_execute", budget.finish)
    image_limit = int(os.environ.get("JUPYBOX_IMAGE_LIMIT", "10000000")) * 4 // 3 + 4  # base64 of the raw limit
    cap_rich_outputs(shell, limit, image_limit)
    use_wheelhouse(shell)
    app.start()


if __name__ == "__main__":
    main(sys.argv[1:])
