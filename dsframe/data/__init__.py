"""Data modules. Each is registered in the entry-point group ``dsframe.data`` with a ``Config``.

loaders.py   SplitDataModule and the resizable, resumable training loader every data module uses
options.py   the built-in data modules' options (no torch: a wrong option is reported at once)

This package imports nothing itself: checking a config must not pay for torch or Lightning.
"""
