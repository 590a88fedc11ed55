"""Data pipeline: raw text -> Moses tokens -> BPE ids -> binarized shards -> training batches.

Modules, in pipeline order: `corpora` (where documents come from), `tokenize` (Moses), `bpe`
(sentencepiece | fastBPE), `shards` (binarized splits on disk), `stream` (batches), `prepare` (CLI).
"""

from pkmlm.cli import UserError


class DataError(UserError, ValueError):
    """Bad or missing data. The message names the file or option at fault and how to fix it."""
