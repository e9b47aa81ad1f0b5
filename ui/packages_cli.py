"""``jupybox packages``: the wheelhouse sandboxed code installs from (``sandbox.wheelhouse``).

Run on the server's host, by whoever may write ``JUPYBOX_HOME`` (or ``JUPYBOX_WHEELHOUSE``): that is
the admin. Sessions only ever read the wheelhouse; every user installs from it with ``%pip install``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sandbox import SandboxSettings
from sandbox.wheelhouse import SandboxTarget, Wheel, Wheelhouse, probe_target, wheelhouse_dir


def add_package_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("packages", help="the wheelhouse sandboxed code installs from with %%pip install (admins)")
    p.add_argument("--image", help="sandbox image whose Python the wheels are for (default: jupybox-sandbox:latest)")
    p.add_argument("--backend", choices=["docker", "bwrap", "local"],
                   help="whose Python: the docker image's (default) or, for bwrap and local, this host's")
    psub = p.add_subparsers(dest="action", required=True)
    a = psub.add_parser("add", help="download NAME[==VERSION] and its dependencies as wheels for the sandbox")
    a.add_argument("requirements", nargs="+", metavar="NAME[==VERSION]")
    ls = psub.add_parser("list", help="the wheels in the wheelhouse")
    ls.add_argument("--json", action="store_true")
    r = psub.add_parser("remove", help="remove every wheel of NAME")
    r.add_argument("names", nargs="+", metavar="NAME")
    s = psub.add_parser("sync", help="make the wheelhouse hold exactly what a requirements file resolves to")
    s.add_argument("file", type=Path)


def _lines(wheels: list[Wheel]) -> str:
    return "\n".join(f"  {w.name} {w.version}  ({w.filename})" for w in wheels) or "  (none)"


def run_package_command(args: argparse.Namespace) -> int:
    """Raises ``WheelhouseError`` (a ``JupyboxError``) for the CLI to print as one sentence."""
    settings = SandboxSettings.from_env(image=args.image, backend=args.backend)
    path = wheelhouse_dir(settings)
    if args.action == "list":
        wheels = Wheelhouse(path, SandboxTarget()).wheels()  # names and versions only: no probe
        if args.json:
            print(json.dumps([w.__dict__ for w in wheels]))
        else:
            print(f"{path} ({len(wheels)} wheels):\n{_lines(wheels)}")
        return 0
    house = Wheelhouse(path, probe_target(settings))
    if args.action == "add":
        added = house.add(args.requirements)
        print(f"added to {path}, for the sandbox's {house.target.describe()}:\n{_lines(added)}")
    elif args.action == "remove":
        for name in args.names:
            print(f"removed from {path}:\n{_lines(house.remove(name))}")
    elif args.action == "sync":
        if not args.file.is_file():
            print(f"jupybox: {args.file} is not a file", file=sys.stderr)
            return 2
        added, removed = house.sync(args.file)
        print(f"{path} now holds what {args.file} resolves to.\nadded:\n{_lines(added)}\nremoved:\n{_lines(removed)}")
    return 0
