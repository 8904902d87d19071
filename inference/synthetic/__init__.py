"""Offline: synthetic T1-CE phantoms with known ground truth (demo, training, tests, benchmarks).

Never imported by the runtime packages.
"""
