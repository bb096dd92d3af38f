"""Experiments: what the commands run, on top of the library.

* :mod:`.job`: :class:`JobConfig`, what a job fine-tunes on and evaluates;
* :mod:`.pipeline`: the one pipeline, adapt -> probe -> train -> evaluate -> record;
* :mod:`.commands`: ``demo``/``run``, ``train``, ``eval`` and ``generate`` as library calls;
* :mod:`.profiles`, :mod:`.grid`, :mod:`.reproduce`: ``dynmole reproduce``, its profiles, its grid
  of runs and its command.
"""
