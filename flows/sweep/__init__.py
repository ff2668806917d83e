"""Stage flows of a sweep pipeline (``ica-small``, ``ica``): DVC stages ``<p>-prepare``, ``<p>-train-<method>``
(one per method: a change to one method's section reruns that method's cells alone) and ``<p>-evaluate``, one
module each, so that each stage's code deps are what it imports."""
