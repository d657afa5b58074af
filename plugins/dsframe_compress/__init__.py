"""Shared compression machinery of the prune / qat / distill plugins and the bert_compress
recipe: physical BERT slicing (``structure``), int8 export (``int8``), measurements
(``measure``) and the recipe's stage functions (``stages``)."""
