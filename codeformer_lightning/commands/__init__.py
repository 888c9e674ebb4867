"""Console commands of the training side (the top floor of LAYOUT.md): thin Hydra entry points.

* ``codeformer-train`` (:mod:`.train`): one stage, or the stages of ``pipeline`` when it is set.
* ``codeformer-pipeline`` (:mod:`.pipeline`): stages I -> II -> III in sequence.

They dispatch to :func:`codeformer_lightning.train.train` (one stage) and
:func:`codeformer_lightning.pipeline.run` (which calls ``train.train`` per stage); ``train.py``
itself knows nothing of the pipeline.
"""
