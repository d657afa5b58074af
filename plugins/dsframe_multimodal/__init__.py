"""dsframe_multimodal: multimodal fusion on dsframe, as a third-party package would add it.

Registered through entry points (pyproject.toml): the model kind ``multimodal``
(``model.MultimodalClassifier``), the encoders of the ``dsframe.encoders`` group
(``encoders``: bert, resnet, mfcc, wav2vec), the data kind ``av_digits`` and the report stages.
See docs/multimodal.md.
"""
