"""Evaluation inside a run: every eval set answered by the workers in whole batches, scored once on rank 0, and
written into the epoch's checkpoint (the result row, the predictions, the zero-shot ones carried along)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raymed.config import Config
from raymed.data.plan import eval_split_of
from raymed.tune.results import answers


class Evaluator:
    """Generates answers on every eval set, whole batches handed out across ranks; rank 0 gathers and scores them."""

    def __init__(self, cfg: Config, ref: Any, processor: Any, engine: Any, plan: dict, rank: int, world: int):
        self.cfg, self.ref, self.processor, self.engine = cfg, ref, processor, engine
        self.sets: dict[str, str] = plan["eval_sets"]  # name -> prepared data directory
        self.rank, self.world = rank, world

    def run(self, prefix: str) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        """(`{prefix}/{set}/{metric}` -> value, set -> prediction records [rank 0 only; empty elsewhere])."""
        out: dict[str, float] = {}
        records: dict[str, list[dict[str, Any]]] = {}
        for name, data_dir in self.sets.items():
            metrics, records[name] = self.evaluate(data_dir, eval_split_of(self.cfg, name))
            out.update({f"{prefix}/{name}/{k}": v for k, v in metrics.items()})
        return out, records

    @torch.no_grad()
    def evaluate(self, data_dir: str, split: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        from raymed.eval import predict
        from raymed.data.rows import read_split_rows

        cfg = self.cfg
        self.engine.eval()
        rows = read_split_rows(data_dir, split)[: cfg.data.max_eval_rows]
        if not rows:
            raise RuntimeError(f"{data_dir}: eval split {split!r} has no rows")
        # The batches are cut from the rows in order and handed out whole (batch k to rank k mod world): every batch
        # is the same whatever the number of workers, so a checkpoint answers as `raymed eval` answers with it.
        bs = predict.eval_batch_size(self.ref.family, self.processor, cfg)
        batches = [rows[i:i + bs] for i in range(0, len(rows), bs)]
        mine = [row for batch in batches[self.rank :: self.world] for row in batch]
        model = self.engine.module
        kwargs = {"synced_gpus": True} if self.engine.zero_optimization_stage() == 3 and self.world > 1 else {}
        predicted = predict.answer(model, self.ref.family, self.processor, cfg, mine, batch_size=bs,
                                   n_batches=math.ceil(len(batches) / self.world),  # ZeRO-3: lock-step generate
                                   bf16=self.engine.bfloat16_enabled(), filler=rows[0], **kwargs)
        # Rank 0 gathers the answers and scores them (one METEOR / Java process, not one per rank); every rank gets
        # the metrics (or rank 0's error) back, so all report the same.
        gathered: list[dict[str, str]] | None = [{} for _ in range(self.world)] if self.rank == 0 else None
        dist.gather_object({r["id"]: a for r, a in zip(mine, predicted)}, gathered, dst=0)
        result: list[Any] = [None]
        if self.rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            lost = [r["id"] for r in rows if r["id"] not in merged]
            preds = [merged.get(r["id"], "") for r in rows]
            result = [f"evaluation lost rows: {len(lost)} of {len(rows)} have no prediction ({lost[:3]})" if lost
                      else predict.score(rows, preds)]
        dist.broadcast_object_list(result, src=0)
        if isinstance(result[0], str):
            raise RuntimeError(result[0])
        return result[0], (predict.records(rows, preds) if self.rank == 0 else [])


def write_evaluation(ckpt: Path, cfg: Config, acc: Any, history: list[dict[str, Any]], zero_shot: dict[str, Any],
                     zero_shot_records: dict[str, list], records: dict[str, list], wall_s: float, name: str) -> None:
    """Rank 0: the run's result row and the epoch's predictions (and the zero-shot ones) into the checkpoint."""
    from raymed.eval import predict
    from raymed.tune.results import ROW_FILE, result_row

    row = result_row(cfg, acc.to_dict(), history, zero_shot=zero_shot, wall_s=wall_s, checkpoint=name,
                     zero_shot_answers=answers(zero_shot_records, "zeroshot"))
    (ckpt / ROW_FILE).write_text(json.dumps(row, indent=2))
    for prefix, sets, metrics in (("zeroshot", zero_shot_records, zero_shot), ("eval", records, history[-1])):
        for set_name, recs in sets.items():
            scores = {k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if k.startswith(f"{prefix}/{set_name}/")}
            predict.write(ckpt / prefix / set_name, recs, scores)


def read_zero_shot_records(ckpt: Path) -> dict[str, list[dict[str, Any]]]:
    """The zero-shot predictions a checkpoint carries (so every later checkpoint carries them too)."""
    from raymed.eval import predict

    root = ckpt / "zeroshot"
    return {d.name: predict.read(d) for d in sorted(root.iterdir())} if root.is_dir() else {}
