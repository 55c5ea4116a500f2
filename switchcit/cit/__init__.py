"""Continual instruction tuning: task data (:mod:`.data`), the methods as a table (:mod:`.methods`),
run settings (:mod:`.config`), the loop (:mod:`.trainer`) with its checkpoints (:mod:`.checkpoint`),
evaluation through the pipeline (:mod:`.evaluation`), metrics, the results over examples and seeds
(:mod:`.results`) and the report, and the ``train`` / ``eval`` commands (:mod:`.commands`)."""
