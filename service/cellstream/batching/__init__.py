"""Batching: one batcher per model version gathers waiting readings into model runs.

`work` (what is queued, what comes back: numpy only), `plan` (the ordering rule), `runner`
(gather / session.run / scatter), `policy` (scheduling knobs), `batcher` (queue and loop).
"""
