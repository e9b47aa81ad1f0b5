"""What the test modules share, so that none imports another: the in-thread app server, the
browser, free ports, sandbox settings, gVisor's set-up, probes, tiny model writers, MCP and SSE
clients, scripted replies and the Triton interpreter runner. Fixtures built on them live in
``tests/conftest.py``; the scripted model itself is ``bench.scripted_model`` (benchmarks use it too)."""
