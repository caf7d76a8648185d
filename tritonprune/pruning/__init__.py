"""The pruning half: importance and selection, PrunePlan and its schema, slicing with module-attribute
updates, the run check on a fake copy, transactions, MAC counting and the distributed plan broadcast.
Imports graph, never the regularizing half (a RegularizedOptimizer is reached by duck typing, see
tritonprune.wrappers)."""
