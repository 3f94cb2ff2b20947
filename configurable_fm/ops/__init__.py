"""The brick operations, one package each, as pure functions: merge/ (all mergekit methods, Fisher, RegMean, deltas),
grow/ (width, depth, experts), update/ (knowledge editing: ROME, MEMIT, AlphaEdit, RLS, FT-L), route/ (routing over
an adapter library: Arrow, LoraHub, task-embedding retrieval)."""
