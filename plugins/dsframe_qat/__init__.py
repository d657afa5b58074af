"""The ``qat`` plugin: ``plugin.py`` (registered in ``dsframe.plugins``) and its options in
``config.py`` (registered in ``dsframe.configs.plugins``; no torch, so a wrong option is reported at once)."""
