"""The product-key memory: the layer, its value tables (replicated, sharded over processes, file-backed),
row-sparse gradient helpers, compiled CPU kernels, Triton kernels for CUDA, usage metrics. Usable on its own: nothing here knows
about models, data, training or the command lines.

    from pkmlm.memory import ProductKeyMemory
    layer = ProductKeyMemory(input_dim=512, output_dim=512, n_keys=512, heads=4, knn=32)
"""

from pkmlm.memory.layer import (FLAT_MAX_SLOTS, KEY_INITS, VALUE_INITS, ProductKeyMemory, compile_model,
                                make_value_table)

__all__ = ["FLAT_MAX_SLOTS", "KEY_INITS", "VALUE_INITS", "ProductKeyMemory", "compile_model", "make_value_table"]
