"""Every shipped config parses and validates; config errors are specific and reported all at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raymed.config import ConfigError, load_config, validate
from raymed.tune.sweep import DEFAULT_SWEEP, load_sweep

ROOT = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(ROOT.rglob("*.yaml"))


def test_configs_exist():
    assert {p.parent.name for p in ALL} >= {"models", "methods", "data", "train", "sweeps"}


@pytest.mark.parametrize("path", ALL + [DEFAULT_SWEEP], ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_validates(path):
    if path.parent.name == "sweeps" or path == DEFAULT_SWEEP:
        sweep, base = load_sweep(path, [], check_paths=False)
        assert sweep.search and sweep.metric.startswith("eval/")
    elif path.parent.name == "methods":  # a fragment: valid for at least one family
        errors = []
        for model in ("tiny-llava", "tiny-miss"):
            try:
                load_config(path, [f"model.name={model}"], check_paths=False)
            except ConfigError as e:
                errors.append(e)
        assert len(errors) < 2, errors
    else:
        cfg = load_config(path, check_paths=False)
        assert cfg.model.name


def test_paper_sweeps_cover_the_study():
    names = {p.stem for p in (ROOT / "sweeps").glob("*.yaml")}
    assert {"miss-vqa-rad", "miss-slake", "llava-med-vqa-rad", "llava-med-slake", "llava-med-pathvqa",
            "llava-med-iu-xray"} <= names
    sweep, _ = load_sweep(DEFAULT_SWEEP, [])
    assert {"full", "ln", "attn", "ffn", "lora", "ia3", "prefix"} <= set(sweep.search["method.name"])
    assert len(sweep.search["train.lr"]) >= 2


def test_overrides_and_inherit(tmp_path):
    cfg = load_config(ROOT / "train" / "tiny-llava-ln.yaml", ["train.lr=1e-4", "method.towers=[language]"])
    assert cfg.method.name == "ln" and cfg.model.name == "tiny-llava"
    assert cfg.train.lr == 1e-4 and cfg.method.towers == ["language"]
    assert cfg.hash() != load_config(ROOT / "train" / "tiny-llava-ln.yaml").hash()


def test_all_errors_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=1", "train.epochs=0", "method.name=nope", "deepspeed.zero_stage=5",
                           "model.name=miss-base", "method.towers=[text_encoder]", "data.path=/no/such/dir",
                           "data.synth_style=xray-only"])
    msg = str(e.value)
    assert "train.lrr: unknown key; allowed: epochs" in msg
    assert "train.epochs: Input should be greater than or equal to 1 (got 0)" in msg
    assert "unknown method 'nope'" in msg
    assert "deepspeed.zero_stage" in msg
    assert "'miss-base' is an accounting-only architecture" in msg
    assert "data.path: '/no/such/dir' does not exist" in msg
    assert "data.synth_style: unknown synthetic style 'xray-only'; known: base, indomain" in msg
    assert len(e.value.errors) == 7


def test_tower_error_names_family():
    with pytest.raises(ConfigError, match=r"family 'llava', method 'ln': unknown tower\(s\) \['text_encoder'\]"):
        load_config(None, ["method.towers=[text_encoder]"])


def test_sweep_errors(tmp_path):
    def sweep(text: str) -> Path:
        p = tmp_path / "s.yaml"
        p.write_text(text)
        return p

    with pytest.raises(ConfigError, match="search space is empty"):
        load_sweep(sweep("name: x\n"), [])
    with pytest.raises(ConfigError, match="search.train.lr: empty list"):
        load_sweep(sweep("search: {train.lr: []}\n"), [])
    with pytest.raises(ConfigError, match=r"train.lrr: unknown key"):
        load_sweep(sweep("search: {train.lrr: [1, 2]}\n"), [])
    with pytest.raises(ConfigError, match=r"metric 'eval/tset/overall_acc' is reported by no trial; trials report: "
                                          r".*eval/test/overall_acc"):
        load_sweep(sweep("search: {train.lr: [0.1]}\nmetric: eval/tset/overall_acc\n"), [])
    with pytest.raises(ConfigError, match="sweep schedulr: unknown key"):
        load_sweep(sweep("search: {train.lr: [0.1]}\nschedulr: {}\n"), [])
    with pytest.raises(ConfigError, match=r"scheduler.per: 'method' is not a search key; search keys: train.lr"):
        load_sweep(sweep("search: {train.lr: [0.1]}\nscheduler: {per: method}\n"), [])
    with pytest.raises(ConfigError, match=r"scheduler.per applies to ASHA only"):
        load_sweep(sweep("search: {train.lr: [0.1]}\nscheduler: {type: fifo, per: train.lr}\n"), [])


@pytest.mark.parametrize("metric", ["eval/val/closed_acc@llava-med", "eval/val/open_recall@llava-med",
                                    "eval/val/closed_acc@miss", "zeroshot/val/closed_acc@miss"])
def test_sweep_may_rank_by_a_published_rule(tmp_path, metric):
    p = tmp_path / "s.yaml"
    p.write_text(f"search: {{train.lr: [0.1]}}\nmetric: {metric}\n")
    sweep, _ = load_sweep(p, [])
    assert sweep.metric == metric
    with pytest.raises(ConfigError, match="is reported by no trial"):
        load_sweep(p, ["sweep.metric=eval/val/closed_acc@lava-med"])


def test_sweeps_choose_on_the_selection_split_and_choosing_on_test_warns(tmp_path):
    import warnings

    from raymed.tune.sweep import SweepConfig, TestSetSelectionWarning

    assert SweepConfig().metric == "eval/val/overall_acc"
    p = tmp_path / "s.yaml"
    p.write_text("search: {train.lr: [0.1]}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default (val) is chosen on quietly
        assert load_sweep(p, [])[0].metric == "eval/val/overall_acc"
    with pytest.warns(TestSetSelectionWarning, match=r"metric 'eval/test/open_acc' chooses trials \(and ASHA stops "
                                                     r"them\) on the split they are scored on \('test'\)"):
        load_sweep(p, ["sweep.metric=eval/test/open_acc"])
    with pytest.warns(TestSetSelectionWarning):  # with no selection split, test is all there is: still warned
        load_sweep(p, ["sweep.metric=eval/test/open_acc", "data.select_split=null"])
    with pytest.raises(ConfigError, match="metric 'eval/val/overall_acc' is reported by no trial"):
        load_sweep(p, ["data.select_split=null"])


def test_selection_split_and_eval_set_names(tmp_path):
    from raymed.data.plan import eval_set_names, eval_split_of

    cfg = load_config(None)
    assert (cfg.data.select_split, cfg.data.eval_split) == ("val", "test")
    assert eval_set_names(cfg) == ["val", "test", "ood"]
    assert [eval_split_of(cfg, n) for n in eval_set_names(cfg)] == ["val", "test", "test"]
    ood = tmp_path / "ood"
    ood.mkdir()
    cfg = load_config(None, ["data.select_split=null", "data.synth_ood_style=null", f"data.eval_sets={{far: {ood}}}"])
    assert eval_set_names(cfg) == ["test", "far"]
    assert eval_set_names(load_config(None, [f"data.eval_sets={{ood: {ood}}}"])) == ["val", "test", "ood"]  # replaced
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.select_split=train", f"data.eval_sets={{test: {ood}}}"])
    assert "data.select_split: 'train' is the training split" in str(err.value)
    assert "data.eval_sets.test: already the name of an eval set of the run (the training data's eval split)" in str(
        err.value) and len(err.value.errors) == 2
    with pytest.raises(ConfigError, match=r"data.eval_sets.val: already .* \(the training data's selection split\)"):
        load_config(None, [f"data.eval_sets={{val: {ood}}}"])


def test_a_dataset_without_the_selection_split_is_named_at_plan_time(tmp_path):
    from raymed.data import generate, prepare
    from raymed.data.plan import micro_batches_per_epoch

    generate(tmp_path / "raw", n=12, seed=0)
    prepare("vqa-rad", tmp_path / "raw", tmp_path / "old", val_fraction=0)  # as prepared before val splits
    cfg = load_config(None, [f"data.path={tmp_path / 'old'}", "scaling.num_workers=1"])
    with pytest.raises(ConfigError, match=r"data.select_split: no split 'val' in .*old; splits: train, test "
                                          r"\(prepared before raymed carved validation splits\?"):
        micro_batches_per_epoch(str(tmp_path / "old"), cfg)
    unselected = load_config(None, [f"data.path={tmp_path / 'old'}", "scaling.num_workers=1",
                                    "data.select_split=null"])
    assert micro_batches_per_epoch(str(tmp_path / "old"), unselected) == {1: 4}  # 10 train images x 3 = 30 rows, batch 8


def test_default_max_new_tokens_fits_the_fixture_answers(tmp_path):
    """The default leaves room for every answer of the VQA-RAD-format synthetic sets (+ end of sequence), with
    both tiny tokenizers; the measured lengths are printed (docs/scoring.md quotes them)."""
    import json

    from raymed.config import TrainConfig
    from raymed.data.synth import STYLES, generate
    from raymed.models.vocab import build_bert_tokenizer, build_llava_tokenizer

    lengths = []
    for style in STYLES:
        generate(tmp_path / style, n=60, style=style, seed=0, size=32)
        for split in ("trainset.json", "testset.json"):
            for row in json.loads((tmp_path / style / split).read_text()):
                for tok in (build_bert_tokenizer(), build_llava_tokenizer()):
                    lengths.append(len(tok(str(row["answer"]), add_special_tokens=False)["input_ids"]))
    lengths.sort()
    print(f"answer tokens: n={len(lengths)} p50={lengths[len(lengths) // 2]} "
          f"p95={lengths[int(0.95 * len(lengths))]} max={lengths[-1]}")
    assert TrainConfig().max_new_tokens >= lengths[-1] + 1
    assert lengths[-1] >= 8  # the caption answers of the `pretrain` style are sentences, not single words


@pytest.mark.parametrize("name", ["miss-vqa-rad", "miss-slake"])
def test_miss_sweeps_use_the_authors_baselines(name):
    from raymed.models.methods import METHODS

    sweep, base = load_sweep(ROOT / "sweeps" / f"{name}.yaml", [], check_paths=False)
    assert {"lora-qv", "ia3-kvo", "prefix", "p-tuning-v2"} <= set(sweep.search["method.name"])
    assert not {"lora", "ia3"} & set(sweep.search["method.name"])
    assert METHODS["lora-qv"].defaults == {"r": 4, "lora_alpha": 32, "lora_dropout": 0.1,
                                           "target_names": ["query", "value"]}
    assert METHODS["ia3-kvo"].defaults["target_names"] == ["key", "value", "output.dense"]
    assert METHODS["prefix"].defaults["prefix_projection"] and not METHODS["p-tuning-v2"].defaults["prefix_projection"]
    assert base["train"]["batch_size"] == 20 and base["train"]["weight_decay"] == 0.05
    assert {1e-5, 2e-5} & set(sweep.search["train.lr"])


@pytest.mark.parametrize("name,lr,epochs", [("miss-vqa-rad", 1e-5, 150), ("miss-slake", 2e-5, 130)])
def test_miss_sweeps_hold_the_authors_recipe_of_docs_recipes(name, lr, epochs):
    """docs/recipes.md, row by row: the MISS authors' batch, optimizer, decay policy, schedule, epochs, lr (in the
    grid, and the trial default), drop-path; their peft baselines' settings."""
    from raymed.models.methods import METHODS

    sweep, base = load_sweep(ROOT / "sweeps" / f"{name}.yaml", [], check_paths=False)
    cfg = validate(base, check_paths=False)
    assert (cfg.train.batch_size, cfg.scaling.num_workers, cfg.train.weight_decay) == (20, 1, 0.05)
    assert cfg.train.decay_norms_and_biases and cfg.train.schedule == "cosine-per-epoch"
    assert (cfg.train.warmup_ratio, cfg.train.max_grad_norm, cfg.deepspeed.precision) == (0.0, 0.0, "fp32")
    assert (cfg.train.epochs, cfg.train.lr) == (epochs, lr) and lr in sweep.search["train.lr"]
    assert cfg.model.drop_path == 0.1 and cfg.train.eval_batch_size == 100
    assert METHODS["lora-qv"].defaults["r"] == 4
    assert METHODS["prefix"].defaults["num_virtual_tokens"] == METHODS["p-tuning-v2"].defaults["num_virtual_tokens"] == 10


def test_llava_med_model_config_evaluates_as_the_authors():
    """docs/recipes.md: LLaVA-Med's model_vqa.py generates up to 1,024 new tokens and pads (grayscale: grey 114)."""
    cfg = load_config(ROOT / "models" / "llava-med-v1.5.yaml", check_paths=False)
    assert cfg.train.max_new_tokens == 1024 and cfg.data.image_aspect == "pad"
    assert cfg.model.template == "llava-med-v1.5"


def test_elastic_worker_range():
    cfg = load_config(None, ["scaling.num_workers=[1,4]", "scaling.resize_interval_s=30"])
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 4)
    fixed = load_config(None, ["scaling.num_workers=3"])
    assert not fixed.scaling.elastic and fixed.scaling.min_workers == fixed.scaling.max_workers == 3
    # where / when workers resize does not change what a run computes
    assert cfg.hash() == load_config(None, ["scaling.num_workers=[1,4]"]).hash()
    for bad, says in (("[2,1]", "min 2 > max 1"), ("[0,2]", "at least 1 worker"), ("[1,2,3]", "[min, max]"),
                      ("many", "a number of workers")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(None, [f"scaling.num_workers={bad}"])
    # Ray Train's elastic policy counts workers by node resources, ignoring placement: STRICT_SPREAD would never shrink
    with pytest.raises(ConfigError, match="STRICT_SPREAD with an elastic num_workers"):
        load_config(None, ["scaling.num_workers=[1,2]", "scaling.placement_strategy=STRICT_SPREAD"])
    assert load_config(None, ["scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD"]).scaling.elastic is False


def test_config_errors_keep_their_message_across_pickle_and_ray():
    """Ray rebuilds an exception raised in a trial or worker from its pickle: a ConfigError (or a prepare
    BadRowsError) must come back with its list of errors, not its message split into characters."""
    import pickle
    from pathlib import Path

    from raymed.data.prepare import BadRow, BadRowsError

    err = ConfigError(["model.name: 'x' does not exist", "train.lr: too big"], "trial-1")
    back = pickle.loads(pickle.dumps(err))
    assert back.errors == err.errors and str(back) == str(err) and back.source == "trial-1"
    bad = BadRowsError([BadRow("a.json", 3, "q1", "train", "missing image: x.png")], Path("src"), "vqa-rad")
    again = pickle.loads(pickle.dumps(bad))
    assert str(again) == str(bad) and again.bad == bad.bad


def test_result_neutral_keys_keep_the_run_name_and_resume():
    """One list of result-neutral keys: changing one keeps the hash (so the default run name, which a re-run
    resumes under) and is no change on resume; a key that changes the result changes both."""
    from raymed.config import RESULT_NEUTRAL_KEYS, config_changes

    base = load_config(None, [])
    neutral = {"run.max_failures": 3, "run.keep_checkpoints": 5, "run.report_to": "[]", "train.log_every": 1,
               "train.eval_batch_size": 3, "data.preprocess_actors": 0, "scaling.cpus_per_worker": 0.25,
               "scaling.placement_strategy": "SPREAD", "run.metrics_export": False}
    assert set(neutral) <= RESULT_NEUTRAL_KEYS
    for key, value in neutral.items():
        other = load_config(None, [f"{key}={value}"])
        assert other.hash() == base.hash() and other.run_name() == base.run_name(), key
        assert config_changes(base.as_written(), other.as_written()) == [], key
    changed = load_config(None, ["train.grad_accum=2"])
    assert changed.hash() != base.hash()
    assert config_changes(base.as_written(), changed.as_written()) == ["train.grad_accum: 1 in the checkpoint, 2 now"]


def test_relative_paths_are_made_absolute_once_and_the_written_config_is_kept(tmp_path, monkeypatch):
    """A project folder's relative `data.path` / `data.eval_sets`: the driver resolves them once for the workers;
    the run's hash, name, stored config and resume comparison keep what the user wrote."""
    from raymed.config import local_paths, with_paths
    from raymed.data.synth import generate
    from raymed.data.prepare import prepare

    generate(tmp_path / "raw", n=10, seed=0, size=32)
    prepare("vqa-rad", tmp_path / "raw", tmp_path / "data" / "vqa-rad")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.path=data/vqa-rad", "data.eval_sets={ood: data/vqa-rad}"])
    paths = local_paths([cfg])
    assert paths == {"data/vqa-rad": str((tmp_path / "data" / "vqa-rad").resolve())}
    runtime = with_paths(cfg, paths)
    assert runtime.data.path == paths["data/vqa-rad"] and runtime.data.eval_sets["ood"] == paths["data/vqa-rad"]
    assert runtime.as_written() == cfg.as_written() and runtime.as_written()["data"]["path"] == "data/vqa-rad"
    assert runtime.hash() == cfg.hash() and runtime.run_name() == cfg.run_name()
    monkeypatch.chdir("/")  # elsewhere (a Ray worker's or Tune trial's folder) the absolute paths still hold
    assert Path(runtime.data.path).is_dir() and local_paths([runtime]) == {}


def test_max_concurrent_is_held_to_what_the_cluster_fits():
    """More trials at once than the CPUs hold starve their data tasks and the sweep hangs: the sweep runs what fits
    (here 1.05 CPUs a trial: driver 0.05, worker 0.5, data 2 x 0.25) and says so. (An autoscaling cluster's
    totals are what its node types hold at max_workers: tests/test_cluster.py.)"""
    from raymed.tune.sweep import trial_concurrency

    sweep, base = load_sweep(DEFAULT_SWEEP, ["sweep.max_concurrent=5", "scaling.cpus_per_worker=0.5",
                                             "data.preprocess_actors=0"], check_paths=False)
    cfg = validate(base, check_paths=False)
    n, note = trial_concurrency({"CPU": 4.0}, cfg, sweep)
    assert n == 3 and "holds 3 trial(s)" in note and "sweep.max_concurrent=5" in note
    assert trial_concurrency({"CPU": 16.0}, cfg, sweep) == (5, None)
    unset, _ = load_sweep(DEFAULT_SWEEP, ["scaling.cpus_per_worker=0.5", "data.preprocess_actors=0"],
                          check_paths=False)
    assert trial_concurrency({"CPU": 4.0}, cfg, unset) == (3, None)
