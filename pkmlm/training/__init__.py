"""Training: the loop, optimizers (Adam and the row-sparse RowAdam for memory values), data-parallel
wrapping and value-gradient sync, dead-slot re-initialisation, run logging."""
