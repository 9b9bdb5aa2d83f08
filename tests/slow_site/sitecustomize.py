"""Test-only: slows scan's per-file function in every Python process that starts with this folder on PYTHONPATH.

tests/test_ray_engine.py kills a Ray scan mid-run; Ray's workers are separate processes, so a monkeypatch in
the test cannot reach them, but this file does (Python imports sitecustomize at start-up). Without the delay a
fast machine finished all 100 tiny images before the test could kill the run.
"""

import os

_delay = float(os.environ.get("CURATE_TEST_SCAN_DELAY", "0") or 0)
if _delay > 0:
    import functools
    import time

    import curate.stages.scan as _scan

    _orig = _scan._read_one

    @functools.wraps(_orig)
    def _slow_read_one(*args, **kwargs):
        time.sleep(_delay)
        return _orig(*args, **kwargs)

    _scan._read_one = _slow_read_one
