"""The ``ray`` backend: sandbox sessions on the nodes of a Ray cluster, each node's kernels in its
own Docker daemon.

- ``control``: joining the cluster, its nodes and their free slots (Ray's blocking client, on one thread).
- ``node``: what runs on a node (its agent, the clean-up of leftovers).
- ``backend``: the server's side of placement, warm pools and node loss (``RayBackend``).
- ``session`` and ``files``: a session on a node seen from the server, with ``SandboxSession``'s interface.
"""

from __future__ import annotations

from .control import SLOT, import_ray

__all__ = ["SLOT", "import_ray"]
