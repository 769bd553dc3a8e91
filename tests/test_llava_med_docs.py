"""docs/llava-med.md ("Bring LLaVA-Med v1.5") end to end on the tiny release fixture: convert, prepare, train
(Ray Train + DeepSpeed ZeRO-3 loading the converted directory partitioned), export, predict, validate the sweep."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from raymed.models.llava_fixture import write_llava_med_v15

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "llava-med.md"
# The GPU commands, shrunk for 2 CPU cores: the same recipe on one CPU worker, ZeRO-3 (weights partitioned as
# they load), one short epoch.
CPU = ["scaling.use_gpu=false", "deepspeed.precision=auto", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5",
       "deepspeed.zero_stage=3", "deepspeed.shard_single_worker=true", "train.epochs=1", "train.batch_size=4",
       "train.eval_batch_size=4", "train.max_new_tokens=3", "train.zero_shot=false", "data.max_eval_rows=4",
       "data.max_length=160", "data.preprocess_actors=0", "run.metrics_export=false", "run.name=ln-fixture"]


def commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.strip().splitlines()]


def _repo_path(arg: str) -> str:
    return str(ROOT / arg) if arg.startswith("configs/") else arg


def test_bring_llava_med_section_runs_on_the_fixture(tmp_path, monkeypatch):
    import ray

    from raymed.data.cli import main as data_main
    from raymed.convert import main as convert_main
    from raymed.export import main as export_main
    from raymed.models import load_model, load_processor, resolve
    from raymed.train import main as train_main
    from raymed.tune import load_sweep

    monkeypatch.chdir(tmp_path)
    cmds = commands()
    assert [c[2] for c in cmds] == ["raymed.convert", "raymed.data", "raymed.train", "raymed.export", "raymed.tune"]
    convert, prepare, train, export, sweep = (c[3:] for c in cmds)

    write_llava_med_v15(tmp_path / "llava-med-v1.5-mistral-7b")  # stands for the download (step 1)
    assert convert_main(convert) == 0
    assert (tmp_path / "models/llava-med-v1.5-hf/config.json").is_file()

    assert data_main(["synth", "--out", "VQA_RAD", "--n", "16", "--seed", "3"]) == 0  # stands for VQA-RAD
    assert data_main(prepare) == 0

    try:
        assert train_main([_repo_path(a) for a in train] + CPU + ["run.storage=runs"]) == 0
    finally:
        ray.shutdown()

    # ZeRO-3 partitioned the weights while loading; the accounting still counts whole parameters
    import json

    from raymed.methods import apply_method

    result = json.loads((tmp_path / "runs/ln-fixture/raymed-result.json").read_text())
    conv = resolve("models/llava-med-v1.5-hf")
    _, acc = apply_method(load_model(conv), conv, "ln", None, {})
    assert result["params"]["trainable"] == acc.trainable > 0 and result["params"]["total"] == acc.total

    export = [a.replace("RUN_NAME", "ln-fixture") for a in export]
    assert export_main(export) == 0
    ref = resolve("models/llava-med-vqa-rad-ln")
    model, processor = load_model(ref).eval(), load_processor(ref)
    from tests.conftest import make_rows

    rows = make_rows(2)
    enc = ref.family.encode(processor, rows, train=False, max_length=160)
    assert (enc["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 4
    with torch.no_grad():
        answers = ref.family.generate(model, processor, {k: torch.from_numpy(v) for k, v in enc.items()}, 4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    # the paper sweep validates (every grid point) against the converted model and the prepared data
    sweep_cfg, base = load_sweep(_repo_path(sweep[1]), sweep[2:], check_paths=True)
    assert base["model"]["name"] == "models/llava-med-v1.5-hf" and sweep_cfg.search["method.name"]
