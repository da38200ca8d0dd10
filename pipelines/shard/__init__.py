"""SHARD (self-reframing distillation): data construction (answers, rules, reframing, refinement,
pairwise judging, selection), its statistics, and the pairwise evaluation of the trained models."""
