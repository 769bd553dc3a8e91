"""Sweeps, by stage: `sweep` (the Ray Tune driver), `results` (one row per run), `compare` + `stats` +
`plots` + `report` (the comparison report), `questions` (per question type vs zero-shot).

`python -m raymed.tune` runs `raymed.tune.sweep`.
"""
