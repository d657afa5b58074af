"""Hybrid data × tensor × pipeline parallel training (``strategy=hybrid``); see docs/parallel.md.

layout.py    ParallelDims: the pp × dp × tp layout and its checks (before any process starts)
contract.py  what a model implements to get TP / PP (its plan, divisibility, pipeline units)
pipeline.py  balanced pipeline stages and schedules
strategy.py  HybridParallelStrategy, the Lightning strategy
factory.py   HybridStrategyFactory: the ``dsframe.strategies`` entry point (config, validate, build)
comm.py      hierarchical all-reduce (also as a DDP comm hook)
checkpoint.py  DCP checkpoints across layouts
testing.py   the parity harness of the tests and the benchmark
"""
