"""Every command in README.md and docs/*.md runs as a user would run it, in the order the document gives it.

Each document's ```bash blocks are read and every command line in them is run, from a project folder holding
configs/ as shipped and the "downloads" the documents start from (tiny stand-ins written in the real releases'
layouts: tests/fixtures/). `raymed train` / `tune` commands get the hardware and size overrides of the shipped-config
tier (tests/test_shipped.py) and nothing else; `s3://YOUR-BUCKET` is a local S3-API server's bucket; `RUN_NAME`,
`<sweep>` and `trial-<id>` are what the earlier commands produced. A block that cannot run here (it needs a cloud
account, or it is the install that CI itself runs) is preceded by `<!-- not run by the tests: REASON -->`, and the
document says why in words too.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from raymed.cli import COMMANDS
from raymed.cli import main as raymed_main
from raymed.config import read_yaml
from tests.cluster_fixtures import start_s3
from tests.fixtures import datasets
from tests.fixtures.data_sources import write_data_sources
from tests.fixtures.miss_release import target_dir, write_miss_checkpoint
from tests.fixtures.shipped import SWEEP_SIZE, shrink

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*not run by the tests:\s*(?P<why>.+?)\s*-->\s*$")


@dataclass
class Block:
    doc: Path
    line: int
    commands: list[list[str]]
    skip: str | None  # why it is not run, or None


def blocks(doc: Path) -> Iterator[Block]:
    """The ```bash blocks of a document: their command lines (continuations joined, comments dropped)."""
    text = doc.read_text()
    for m in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        before = text[: m.start()].rstrip().splitlines()
        skip = SKIP.search(before[-1]) if before else None
        source = re.sub(r"\\\n\s*", " ", m.group(1))
        commands = [shlex.split(line, comments=True) for line in source.splitlines()]
        yield Block(doc, text[: m.start()].count("\n") + 1, [c for c in commands if c],
                    skip.group("why") if skip else None)


def test_every_block_runs_or_says_why_not():
    for doc in DOCS:
        for block in blocks(doc):
            assert block.skip or all(runnable(c) for c in block.commands), \
                f"{doc.name}:{block.line}: a command no test can run; run it, or say why not " \
                f"(<!-- not run by the tests: REASON --> before the block): {block.commands}"


def runnable(command: list[str]) -> bool:
    return command[:2] == ["python", "-m"] and command[2].startswith("raymed") or command[0] == "raymed"


# ---- running a document -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A local S3-API server for `s3://YOUR-BUCKET`, and a Ray cluster whose processes reach it."""
    import ray

    from raymed.cluster import start_local_ray

    s3 = start_s3(tmp_path_factory.mktemp("s3"), bucket="your-bucket")
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    start_local_ray(num_cpus=6, log_to_driver=False, runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    yield s3
    ray.shutdown()
    s3.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def downloads(root: Path) -> None:
    """What the documents tell a user to download, in the releases' layouts, and configs/ as shipped."""
    import shutil

    from tests.fixtures.llava_release import write_llava_med_v15

    shutil.copytree(ROOT / "configs", root / "configs")
    write_llava_med_v15(root / "llava-med-v1.5-mistral-7b")
    write_miss_checkpoint(root / "model_base_vqa.pth")
    target_dir(root, "miss-architecture")
    datasets.vqa_rad(root / "VQA_RAD")
    datasets.slake(root / "Slake1.0")
    datasets.pathvqa(root / "pvqa")
    datasets.iu_xray(root / "iu_xray")
    write_data_sources(root)  # docs/data-sources.md


def substitute(command: list[str], root: Path, bucket: str) -> list[str]:
    """Placeholders -> what earlier commands made; train / tune get the CPU overrides of the shipped tier."""
    out = []
    for arg in command:
        arg = arg.replace("YOUR-BUCKET", bucket)
        if "RUN_NAME" in arg:
            runs = sorted((root / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
            arg = arg.replace("RUN_NAME", runs[-1].name)
        out.append(arg)
    args = out[3:] if out[0] == "python" else out[1:]
    modules = {module.removesuffix(".__main__"): command for command, (module, _) in COMMANDS.items()}
    name = args[0] if out[0] == "raymed" else modules.get(out[2], out[2].removeprefix("raymed."))
    args = args[1:] if out[0] == "raymed" else args
    if name in ("train", "tune"):
        config = args[args.index("--config") + 1] if "--config" in args else None
        data = read_yaml(root / config) if config else {}
        base = data.get("train", {}) if name == "tune" else data
        if name == "tune" and data.get("train_config"):
            from raymed.config import deep_merge

            base = deep_merge(read_yaml((root / config).parent / data["train_config"]), base)
        args += shrink(base) + (["sweep.search.train.lr=[0.002]", *one_point(root, config), *SWEEP_SIZE]
                                if name == "tune" else [])
    return [name, *args]


def one_point(root: Path, config: str | None) -> list[str]:
    """A documented sweep runs one grid point here (`ln`, every tower): the shipped-config tier trains the methods
    of every shipped grid (tests/test_shipped.py); this shows the command as written runs."""
    from raymed.tune.sweep import DEFAULT_SWEEP, load_sweep

    sweep, _ = load_sweep(root / config if config else DEFAULT_SWEEP, [], check_paths=False)
    return ['sweep.search.method.name=["ln"]'] + \
        (["sweep.search.method.towers=[null]"] if "method.towers" in sweep.search else [])


def run_document(doc: Path, root: Path, bucket: str) -> int:
    ran = 0
    for block in blocks(doc):
        if block.skip:
            continue
        for command in block.commands:
            argv = substitute(command, root, bucket)
            assert raymed_main(argv) == 0, f"{doc.name}:{block.line}: {shlex.join(command)}"
            ran += 1
    return ran


@pytest.mark.parametrize("doc", [d for d in DOCS if any(not b.skip for b in blocks(d))], ids=lambda d: d.name)
def test_document_commands_run(doc, env, tmp_path, monkeypatch):
    downloads(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run_document(doc, tmp_path, env.bucket) > 0
