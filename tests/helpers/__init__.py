"""What the tests share: config composition, processes run as a user runs them, test-only
callbacks, a bare trainer, a trained tiny checkpoint, hostile shards and a loopback SLURM cluster.

Fixtures live in ``tests/conftest.py``; everything else a test needs is imported from here.
"""
