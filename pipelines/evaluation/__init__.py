"""Evaluation: guard evaluation on labelled sets, its metrics, and serving a model a training stage of
the run exported (``model_from``)."""
