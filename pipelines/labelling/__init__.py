"""Labelling: the jury of LLM judges, its voting math, the adjudicator, and dataset assembly."""
