"""The stages of a sweep pipeline (``tasks.config.sweep``): ICA data for every (dimension, seed), the cells of one
method trained through the one training loop on Ray Train, and the table of held-out log-likelihoods.

Every cell is its own Ray Train run (the generic :func:`~tasks.stages.train.task.train_model`, so DDP, resume,
the non-finite guard and checkpoints are the loop's) and its own MLflow run, a child of the stage's run, tagged
``stein.cell = <method>/<cell>``. A cell whose model is already in the sweep's staging folder
(``.stein/sweeps/<pipeline>/<method>/``) with the same inputs (its Ray Train run name: a digest of the cell's train
section, data and code) is not trained again, so an interrupted sweep continues where it stopped; the stage's
output folder is written atomically at the end, and the staging folder removed.

"""
