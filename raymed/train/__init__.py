"""Training runtime, by stage: `launch` (the driver: validate, plan, fit on Ray Train), `recipe` (the
worker loop), `engine` (DeepSpeed), `checkpoint`, `elastic` (world-size-free resume state), `export`.

`python -m raymed.train` runs `raymed.train.launch`.
"""
