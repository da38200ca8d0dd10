"""The guard's answer protocol, shared by training, evaluation and serving: the prompt format and the
answer a guard is trained to give (:mod:`~pipelines.guard.format`), the adapters that talk to our guard
and to other guards (:mod:`~pipelines.guard.adapters`), and P(unsafe) from the first answer token
(:mod:`~pipelines.guard.scores`). It registers no stage."""
