"""The brick operations, one package each, as pure functions: merge/ (all mergekit methods, Fisher, RegMean, deltas),
grow/ (width, depth, experts), update/ (knowledge editing: ROME, MEMIT); route/ comes next."""
