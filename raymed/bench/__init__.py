"""Benchmarks: what each method costs, and how close raymed gets to the limits (`python -m raymed.bench`).

Suites (one module each): `methods` (step time and memory per method, plain loop), `overhead` (the Ray Train
+ DeepSpeed recipe vs a plain loop), `data` (Ray Data vs a torch DataLoader), `checkpoint` (bytes written per
checkpoint vs trainable bytes), `sweep` (ASHA vs the full grid), `questions` (per question type, a sweep's
best trials vs zero-shot), `gpu` (LLaVA-Med-size `ln` vs `full` on CUDA).
Every suite prints a table and writes one JSON document with the machine description.
"""
