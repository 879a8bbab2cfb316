"""Experiments over the tasks: one run from options (``run``), every fusion compared
(``sweep``), k-fold cross-validation (``crossval``), ensembles (``ensemble``). They ask the task
registry which predictor options build; the training loop itself is ``modalforge.train``."""
