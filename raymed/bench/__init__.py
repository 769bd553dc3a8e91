"""Benchmarks: what each method costs, and how close raymed gets to the limits (`python -m raymed.bench`).

Suites (one module each): `methods` (step time and memory per method, plain loop), `overhead` (the Ray Train
+ DeepSpeed recipe vs a plain loop), `data` (Ray Data vs a torch DataLoader), `checkpoint` (bytes written per
checkpoint vs trainable bytes), `sweep` (ASHA vs the full grid), `load` (host memory loading under ZeRO-3),
`gpu` (LLaVA-Med-size `ln` vs `full` on CUDA). The per-question analysis of a sweep is `raymed.tune.questions`, not a
benchmark.
Every suite prints a table and writes one JSON document with the machine description.
"""
