"""Models. Each is registered in the entry-point group ``dsframe.models`` with a ``Config``.

files.py   save / load a model file (the architecture that rebuilds it + its weights)
hub.py     where pretrained weights come from (installed packages, local folders)
bert.py, gpt.py    the built-in models; their options live in bert_config.py, gpt_config.py,
                   which import no torch, so a wrong option is reported at once

This package imports nothing itself: checking a config must not pay for torch.
"""
