"""Evaluation: `predict` (the one generation path), `metrics`, `evaluator` (inside a run), `evaluate` (a run
or model on a prepared dataset), `infer` (one question about one image).

`python -m raymed.eval` runs `raymed.eval.evaluate`.
"""
