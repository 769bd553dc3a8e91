"""Models where users keep them: a Hub id from a Hub-layout cache (offline, sockets refused), an original
LLaVA-Med release converted once into a cache, and the Hub's answers for missing / gated repos and revisions.

The cache is written in ``huggingface_hub``'s documented layout (`tests.hub_fixtures`); the release in LLaVA-Med
v1.5's own on-disk layout (`write_llava_med_v15`). `s3://` model folders are read by the two-node test in
`tests/test_cluster_s3.py`.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fixtures.llava_release import write_llava_med_v15
from tests.hub_fixtures import COMMIT, NO_NETWORK, hub_dataset_cache, hub_model_cache, vqa_table

REPO = Path(__file__).resolve().parents[1]
MODEL = "med-org/llava-med-tiny"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    return {**env, **extra}


def _python(code: str, args: list[str], env: dict[str, str], timeout: float = 300,
            lock: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", NO_NETWORK + code, *args]
    return subprocess.run(["flock", "/tmp/raymed-ray.lock", *cmd] if lock else cmd, capture_output=True, text=True,
                          env=env, timeout=timeout)


RESOLVE = ("import json, sys\nfrom raymed.models import ModelLoadError, resolve\nout = []\n"
           "for name in sys.argv[1:]:\n    try:\n        out.append(str(resolve(name).path))\n"
           "    except ModelLoadError as err:\n        out.append({'error': str(err)})\nprint(json.dumps(out))\n")


def _resolve(names: list[str], env: dict[str, str]) -> list[str | dict]:
    """Each name resolved in one fresh process (the Hub's settings are read at import)."""
    result = _python(RESOLVE, names, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_train_a_hub_id_release_offline_converts_once_then_reuses(tmp_path: Path) -> None:
    """`model.name: ORG/NAME` holding an original LLaVA-Med release and `data.path: hf://datasets/...`, both from a
    Hub-layout cache, with sockets refused and HF_HUB_OFFLINE=1: converted once into the cache, trained; a second
    command (no HF_HUB_OFFLINE: the Hub is tried, unreachable, the cache used) reuses the converted copy."""
    snap = hub_model_cache(tmp_path / "hub", MODEL, write_llava_med_v15(tmp_path / "release"))
    hub_dataset_cache(tmp_path / "hub", "med-org/tiny-vqa", {
        "train": vqa_table("train", 8), "test": vqa_table("test", 2, start=8)})
    overrides = [f"model.name={MODEL}", "data.path=hf://datasets/med-org/tiny-vqa", "data.max_eval_rows=2",
                 "data.preprocess_actors=0", "train.epochs=1", "train.batch_size=4", "train.zero_shot=false",
                 "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "run.metrics_export=false",
                 f"run.storage={tmp_path / 'runs'}", "run.name=hub"]
    train = _python("import sys\nfrom raymed.train.launch import main\nsys.exit(main(sys.argv[1:]))\n", overrides,
                    _env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), timeout=1500, lock=True)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "hub" / "raymed-result.json").read_text())
    assert summary["steps"] >= 1 and "eval/test/overall_acc" in summary["metrics"]
    assert summary["model"] == MODEL  # what the user wrote; the workers got it pinned to the commit
    cache = tmp_path / "hf-home" / "raymed-models" / "converted"
    converted = [p for p in cache.iterdir() if p.is_dir()]
    assert len(converted) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left
    conversion = json.loads((converted[0] / "model" / "raymed_conversion.json").read_text())
    assert conversion["source"] == str(snap.resolve()) and conversion["source_model_type"] == "llava_mistral"
    prepared = [p.name for p in (tmp_path / "hf-home" / "raymed-prepared").iterdir()]
    assert prepared == [f"med-org--tiny-vqa--{COMMIT}"]

    # Reuse: the release's weight blobs are now unreadable, so converting again would fail.
    for shard in snap.glob("*.safetensors"):
        Path(os.path.realpath(shard)).write_bytes(b"gone")
    params = _python("import sys\nfrom raymed.models.params import main\nsys.exit(main(sys.argv[1:]))\n",
                     ["--model", MODEL, "--method", "ln", "--json"], _env(tmp_path))
    assert params.returncode == 0, params.stderr[-3000:]
    assert json.loads(params.stdout[params.stdout.index("{"):])["trainable"] > 0
    assert [p for p in cache.iterdir() if p.is_dir()] == converted


def test_a_local_original_release_converts_once_under_concurrent_starts(tmp_path: Path) -> None:
    """Two processes that resolve the same release folder at once (two workers of a node) convert it once."""
    release = write_llava_med_v15(tmp_path / "llava-med-v1.5-mistral-7b")
    env = _env(tmp_path, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", NO_NETWORK + RESOLVE, str(release)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    paths = {json.loads(out.strip().splitlines()[-1])[0] for out, _ in outs}
    cache = tmp_path / "hf-home" / "raymed-models" / "converted"
    assert len(paths) == 1 and [p for p in cache.iterdir() if p.is_dir()] == [Path(paths.pop()).parent]
    assert json.loads((release / "config.json").read_text())["model_type"] == "llava_mistral"  # the source untouched


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers API calls as the Hub does for a missing repo, a gated repo and a missing revision."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if "/gated" in self.path:
            status, code = 403, "GatedRepo"
        elif "/revision/" in self.path and "/v9" in self.path:
            status, code = 404, "RevisionNotFound"
        else:
            status, code = 404, "RepoNotFound"
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": code}).encode())

    def log_message(self, *args: object) -> None:
        pass


def test_hub_errors_name_the_model_and_what_to_do(tmp_path: Path) -> None:
    offline = _env(tmp_path, HF_HUB_OFFLINE="1")
    hub_model_cache(tmp_path / "hub", "med-org/present", write_llava_med_v15(tmp_path / "release"))
    found, empty, revision = _resolve(["med-org/present", "med-org/absent", "med-org/present@v9"], offline)
    assert Path(found).parent.parent == tmp_path / "hf-home" / "raymed-models" / "converted"  # converted once
    assert "'med-org/absent' is no local folder" in empty["error"] and "not in the Hub cache" in empty["error"]
    assert "hf download" in empty["error"]
    assert "med-org/present@v9" in revision["error"] and "not in the Hub cache" in revision["error"]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online = _env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}")
        missing, gated, revision = _resolve(["med-org/missing", "med-org/gated", "med-org/remote@v9"], online)
        assert "no such model on the Hub, or it is private" in missing["error"]
        assert "the model is gated" in gated["error"] and "HF_TOKEN" in gated["error"]
        assert "revision 'v9' does not exist" in revision["error"]
    finally:
        server.shutdown()
