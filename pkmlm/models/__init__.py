"""Language models built from pkmlm.memory: the transformer and its blocks (FFN, memory, or both), and
initialisation from other checkpoints."""

from pkmlm.models.transformer import KVCache, TransformerLM

__all__ = ["KVCache", "TransformerLM"]
