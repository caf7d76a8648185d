"""The regularizing half: RegularizedOptimizer (the wrapper), the engine that drives a step, the
regularizers, the numeric bounds of the term and the sharded (FSDP2) layout. Imports graph and kernels,
never the pruning half."""
