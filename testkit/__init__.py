"""What the tests (tests/) and the benchmarks (bench/) share: running the real driver and a controller
under test, building CSI requests, throwaway Ceph and PostgreSQL clusters, loop devices, waiting for a
condition with a deadline, and process trees that never outlive a run.

Tests and benchmarks both import this package and never each other. It is not installed: both run from
the repository root (``python -m pytest``, ``python -m bench.node``), which puts it on ``sys.path``.
"""
