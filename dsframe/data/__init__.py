"""Data modules. Each is registered in the entry-point group ``dsframe.data`` with a ``Config``."""
