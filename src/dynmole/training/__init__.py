"""Training: the run's settings, the trainer and its callbacks, the answer-position logits, the
routing probe, and the run folder with its file names.

* :mod:`.config`: :class:`~dynmole.training.config.TrainConfig`;
* :mod:`.trainer`: :class:`~dynmole.training.trainer.MoLETrainer` and
  :func:`~dynmole.training.trainer.train` (the HF ``Trainer`` with the MoLE aux losses);
* :mod:`.callbacks`: the JSONL log and ReMoLE's coefficient update; :mod:`.probe`: the routing probe;
* :mod:`.answer_logits`: the LM head on the answer positions only;
* :mod:`.runs`: a run folder's file names, checkpoints, resume and overwrite rules.

This ``__init__`` imports nothing, so that :mod:`.runs` (the file names the analysis reads) loads
without the ``Trainer``; ``dynmole.train`` gathers the training API in one namespace.
"""
