"""The reproduction scripts: syntax, generated wrappers in sync, every run.py command line parses, skip / redo."""
from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

RUNNER = os.path.join(ROOT, "scripts", "run_setting.sh")
WRAPPERS = sorted(glob.glob(os.path.join(ROOT, "scripts", d, "*.sh"))
                  for d in ("voc", "ade", "cityscapes", "cityscapes_domain", "coco-voc", "coco_stuff_10k"))
WRAPPERS = [w for group in WRAPPERS for w in group]
SETTING_WRAPPERS = [w for w in WRAPPERS if not w.endswith("-orders.sh")]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in (
        "DATA_ROOT", "NB_GPU", "EXTRA", "EPOCHS", "CROP", "BACKBONE", "NAME", "CHECKPOINT_DIR", "REDO", "LAUNCHER",
        "BATCH_SIZE", "GRAD_ACCUM", "OVERLAP", "DISJOINT", "DATE", "RESULTS_DIR", "STEP0_FROM", "ATT", "LR", "LR0",
        "AMP_LEVEL", "NUM_WORKERS", "OUTPUT_DIR", "LOG_DIR", "CHANNELS_DIR", "RESTART")}
    env.update(PYTHON=sys.executable, DRY_RUN="1", OUTPUT_DIR=str(tmp_path / "runs"),
               CHECKPOINT_DIR=str(tmp_path / "ckpt"), RESULTS_DIR=str(tmp_path / "results"), DATE="d")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _dry(cmd: list[str], env) -> tuple[list[list[str]], list[str], str]:
    """Run a script with DRY_RUN=1: (run.py argument lists, report command, stderr)."""
    proc = subprocess.run(["bash", *cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    runs, report = [], []
    for line in proc.stdout.splitlines():
        toks = shlex.split(line)
        if "run.py" in toks:
            runs.append(toks[toks.index("run.py") + 1:])
        elif any(t.endswith("report.py") for t in toks):
            report = toks
    return runs, report, proc.stderr


def _flag(args: list[str], name: str):
    """Value of the last occurrence of ``name`` (argparse semantics), or True for a bare flag, None if absent."""
    value = None
    for i, tok in enumerate(args):
        if tok == name:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else True
    return value


def test_every_script_passes_bash_n():
    scripts = [RUNNER] + WRAPPERS
    assert len(WRAPPERS) > 100
    for path in scripts:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_wrappers_match_their_generator():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import generate_wrappers
    finally:
        sys.path.pop(0)
    expected = generate_wrappers.all_wrappers()
    assert generate_wrappers.main(["--check"]) == 0
    on_disk = {os.path.relpath(w, os.path.join(ROOT, "scripts")) for w in WRAPPERS}
    assert on_disk == set(expected), "wrappers on disk that the generator does not write (or missing)"
    for path in WRAPPERS:
        assert os.access(path, os.X_OK), f"{path} is not executable"


def test_expected_settings_and_methods_exist():
    names = {os.path.relpath(w, os.path.join(ROOT, "scripts")) for w in WRAPPERS}
    for setting in ["19-1", "15-5", "15-1", "10-1", "5-3"] + [f"15-1{o}" for o in "abcdefghij"]:
        for method in ["mib", "mib_base", "mib_awt", "plop", "plop_awt"]:
            assert f"voc/{method}_{setting}.sh" in names
    for setting in ["19-1", "15-5", "15-1"]:
        for method in ["ft", "lwf", "lwf-mc", "ilt", "ewc", "rw", "pi"]:
            assert f"voc/{method}_{setting}.sh" in names
    for setting in ["100-50", "100-10", "100-5", "50-50"]:
        assert f"ade/mib_awt_{setting}.sh" in names and f"ade/plop_{setting}.sh" in names
    for setting in ["14-1", "10-1", "14-5", "18-1"]:
        assert f"cityscapes/mib_awt_{setting}.sh" in names and f"cityscapes/ft_{setting}.sh" in names
    for setting in ["11-5", "11-1", "1-1"]:
        assert f"cityscapes_domain/plop_{setting}.sh" in names and f"cityscapes_domain/mib_{setting}.sh" in names


def _one_wrapper_per_recipe_and_method() -> list[str]:
    """The first wrapper of each (recipe row, method): the others differ from it only in the setting, which
    test_wrappers_match_their_generator checks, so dry-running all 300 would repeat the same template."""
    from experiment.recipes import get

    chosen: dict[tuple[str, str], str] = {}
    for path in SETTING_WRAPPERS:
        dataset, setting, method = open(path).read().split("run_setting.sh\" ")[1].split()[:3]
        chosen.setdefault((get(dataset, setting, method).id, method), path)
    return sorted(chosen.values())


def test_every_wrapper_runs_its_recipe_row(tmp_path):
    """Each recipe row's run.py command lines (dry run through run_setting.sh of one wrapper per row and method),
    parsed with the real parser, carry exactly its row of scripts/recipes.toml: lr, epochs, effective batch and
    flags per step."""
    parse_config = pytest.importorskip("experiment.config").parse_config
    from dataset.tasks import num_steps
    from experiment.recipes import get

    env = _env(tmp_path)
    for path in _one_wrapper_per_recipe_and_method():
        runs, report, _ = _dry([path], env)
        body = open(path).read().split("run_setting.sh\" ")[1].split()
        dataset, setting, method_name = body[0], body[1], body[2]
        recipe = get(dataset, setting, method_name)
        assert [int(_flag(a, "--step")) for a in runs] == list(range(num_steps(dataset, recipe.task))), path
        for args in runs:
            cfg = parse_config(args)
            step = cfg.step[0]
            expected = parse_config(list(recipe.flags_at(step)) + ["--dataset", dataset, "--task", recipe.task])
            assert (cfg.dataset, cfg.task) == (dataset, recipe.task)
            assert cfg.lr == [recipe.lr_at(step)] and cfg.epochs == recipe.epochs_at(step), (path, step)
            assert cfg.batch_size * cfg.grad_accum == recipe.batch and cfg.crop_size == recipe.crop
            assert cfg.opt_level == "O1"
            assert cfg.backbone == recipe.backbone or "--backbone" in recipe.flags  # the papers' unless a flag says
            assert cfg.overlap is (recipe.protocols[0] == "overlap")  # the recipe's protocol by default
            suffix = "" if cfg.overlap else "_disjoint"
            assert cfg.name == method_name + suffix
            for flag in recipe.flags_at(step):
                if flag.startswith("--"):
                    dest = flag[2:]
                    assert getattr(cfg, dest) == getattr(expected, dest), (path, step, dest)
            if step == 0:
                assert cfg.pod_options == expected.pod_options  # later-step flags stay off step 0
        assert report[-1] == str(tmp_path / "results" / f"d_{dataset}_{recipe.task}_{method_name}{suffix}.csv")


def test_published_values_of_selected_wrappers(tmp_path):
    """A few rows written out from the published scripts themselves (not from recipes.toml)."""
    parse_config = pytest.importorskip("experiment.config").parse_config
    env = _env(tmp_path)

    def steps(script):
        return [parse_config(a) for a in _dry([os.path.join(ROOT, "scripts", *script.split("/"))], env)[0]]

    plop_10_1 = steps("voc/plop_10-1.sh")  # PLOP scripts/voc/plop_10-1.sh: lr 0.01 / 0.001, 30 then 10 epochs
    assert [(c.lr[0], c.epochs) for c in plop_10_1[:2]] == [(0.01, 30), (0.001, 10)] and len(plop_10_1) == 11
    awt_15_1 = steps("voc/mib_awt_15-1.sh")  # AWT scripts/voc/mib_voc_15-1.sh: lr 0.02, --att 25 --mask_att
    assert awt_15_1[0].lr == [0.02] and awt_15_1[1].att == 25 and awt_15_1[1].mask_att
    mib_15_1 = steps("voc/mib_15-1.sh")  # MiB README: lr 0.01; MiB issue #22: loss_kd 100 on 15-1
    assert mib_15_1[0].lr == [0.01] and mib_15_1[1].loss_kd == 100
    ewc = steps("voc/ewc_15-5.sh")  # MiB argparser: EWC reg_importance 500
    assert ewc[1].reg_importance == 500
    plop_ade = steps("ade/plop_100-50.sh")  # PLOP plop_ade_100-50.sh: FT + pod 0.001, logits factor 1e-5 at step 1
    assert plop_ade[0].method == "FT" and plop_ade[0].pod_factor == 0.001 and plop_ade[0].pod_options is None
    assert plop_ade[1].pod_options["switch"]["after"]["factor"] == 0.00001 and plop_ade[0].epochs == 60
    awt_ade = steps("ade/mib_awt_100-50.sh")  # AWT mib_ade_100-50.sh: step-0 lr 0.01, attribute_class.py
    assert awt_ade[0].lr == [0.01] and awt_ade[1].att_per_class and awt_ade[1].att_accumulate_classes
    domain = steps("cityscapes_domain/plop_1-1.sh")  # PLOP plop_cityscapesDomain_1-1.sh: 21 steps, 50 epochs
    assert len(domain) == 21 and domain[0].epochs == 50 and domain[5].pod_options["switch"]["after"]["factor"] == 0.001


def test_output_dir_moves_every_output(tmp_path):
    parse_config = pytest.importorskip("experiment.config").parse_config
    env = _env(tmp_path, OUTPUT_DIR="rel/out")
    for key in ("CHECKPOINT_DIR", "RESULTS_DIR"):
        env.pop(key)
    runs, report, _ = _dry([os.path.join(ROOT, "scripts", "voc", "mib_awt_15-5.sh")], env)
    cfg = parse_config(runs[1])
    out = os.path.join(ROOT, "rel", "out")
    assert (cfg.checkpoint, cfg.results_dir, cfg.logdir, cfg.channels_dir) == tuple(
        os.path.join(out, sub) for sub in ("checkpoints", "results", "logs", "channels"))
    assert report[-1].startswith(os.path.join(out, "results") + os.sep)
    env["LOG_DIR"] = str(tmp_path / "elsewhere")  # one output moved on its own
    assert parse_config(_dry([os.path.join(ROOT, "scripts", "voc", "mib_15-5.sh")], env)[0][0]).logdir == \
        str(tmp_path / "elsewhere")


def test_environment_overrides(tmp_path):
    parse_config = pytest.importorskip("experiment.config").parse_config
    env = _env(tmp_path, NB_GPU=2, GRAD_ACCUM=3, DISJOINT=1, EPOCHS=2, CROP=64, BACKBONE="resnet50", ATT=50,
               DATA_ROOT="rel/data", EXTRA="--loss_kd 100 --num_workers 0")
    runs, report, _ = _dry([os.path.join(ROOT, "scripts", "voc", "mib_awt_15-5.sh"), "--random_seed", "7"], env)
    assert len(runs) == 2
    cfg = parse_config(runs[1])
    assert cfg.batch_size == 4 and cfg.grad_accum == 3  # 4 x 2 GPUs x 3 = 24
    assert not cfg.overlap and cfg.name == "MiB_AWT_disjoint"
    assert (cfg.epochs, cfg.crop_size, cfg.backbone, cfg.att) == (2, 64, "resnet50", 50)
    assert cfg.loss_kd == 100 and cfg.random_seed == 7 and cfg.num_workers == 0
    assert cfg.data_root == os.path.join(ROOT, "rel/data")  # relative to where the script was called (ROOT here)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "voc", "mib_15-5.sh")],
                          env=_env(tmp_path, LAUNCHER="python"), capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.splitlines()[0].startswith("python run.py ")
    default = subprocess.run(["bash", os.path.join(ROOT, "scripts", "voc", "mib_15-5.sh")], env=_env(tmp_path, NB_GPU=2),
                             capture_output=True, text=True, cwd=ROOT).stdout.splitlines()[0]
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 run.py" in default


def test_bad_input_fails_with_one_line(tmp_path):
    for args, extra, needle in [(["voc", "15-9", "MiB"], {}, "no recipe for MiB on voc 15-9"),
                                (["voc", "15-1", "MIBX"], {}, "no recipe for MIBX on voc 15-1"),
                                (["mnist", "15-1", "MiB"], {}, "no recipe for MiB on mnist"),
                                (["voc", "15-1", "MiB"], {"NB_GPU": 5}, "not divisible")]:
        proc = subprocess.run(["bash", RUNNER, *args], env=_env(tmp_path, **extra), capture_output=True, text=True)
        assert proc.returncode == 2, args
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def _touch_step(tmp_path, step, name="MiB", task="15-1", csv_row=True):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / f"{task}-voc_{name}_{step}.pth").write_bytes(b"fake")
    if csv_row:
        results = tmp_path / "results"
        results.mkdir(exist_ok=True)
        with open(results / f"d_voc_{task}_{name}.csv", "a") as handle:
            handle.write(f"{step}," + ",".join(["0.5"] * 21) + ",0.5\n")


def test_finished_steps_are_skipped_and_redo_runs_them(tmp_path):
    script = os.path.join(ROOT, "scripts", "voc", "mib_15-1.sh")
    for step in (0, 1):
        _touch_step(tmp_path, step)
    runs, _, err = _dry([script], _env(tmp_path))
    assert [_flag(a, "--step") for a in runs] == ["2", "3", "4", "5"]
    assert "step 0 of voc 15-1 MiB already done" in err
    assert not any(_flag(a, "--overwrite") for a in runs)

    runs, _, _ = _dry([script], _env(tmp_path, REDO=1))
    assert [_flag(a, "--step") for a in runs] == ["0", "1", "2", "3", "4", "5"]
    assert all(_flag(a, "--overwrite") and _flag(a, "--no_auto_resume") for a in runs)


def test_checkpoint_without_csv_row_is_only_tested(tmp_path):
    _touch_step(tmp_path, 0)
    _touch_step(tmp_path, 1, csv_row=False)  # interrupted between the checkpoint and the test
    runs, _, err = _dry([os.path.join(ROOT, "scripts", "voc", "mib_15-1.sh")], _env(tmp_path))
    assert [_flag(a, "--step") for a in runs] == ["1", "2", "3", "4", "5"]
    assert _flag(runs[0], "--test") is True and _flag(runs[1], "--test") is None
    assert "no row" in err


def test_date_is_kept_across_calls(tmp_path):
    env = _env(tmp_path)
    del env["DATE"]
    env["DRY_RUN"] = "0"
    env["LAUNCHER"] = "true"  # every step "runs" instantly and writes nothing
    script = os.path.join(ROOT, "scripts", "voc", "mib_15-5.sh")
    subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True)
    date_file = tmp_path / "ckpt" / "15-5-voc_MiB.date"
    date_file.write_text("2020-01-01\n")
    env["DRY_RUN"] = "1"
    runs, report, _ = _dry([script], env)
    assert _flag(runs[0], "--date") == "2020-01-01"
    runs, _, _ = _dry([script], {**env, "REDO": "1"})
    assert _flag(runs[0], "--date") != "2020-01-01"


def test_step0_can_be_shared(tmp_path):
    shared = tmp_path / "MiB_0.pth"
    shared.write_bytes(b"fake")
    runs, _, _ = _dry([os.path.join(ROOT, "scripts", "voc", "plop_awt_15-1.sh")], _env(tmp_path, STEP0_FROM=shared))
    assert [_flag(a, "--step") for a in runs] == ["1", "2", "3", "4", "5"]
    assert _flag(runs[0], "--step_ckpt") == str(shared) and _flag(runs[1], "--step_ckpt") is None
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "voc", "ewc_15-1.sh")],
                          env=_env(tmp_path, STEP0_FROM=shared), capture_output=True, text=True)
    assert proc.returncode == 2 and "regularizer state" in proc.stderr


def test_orders_wrapper_runs_the_papers_ten_orders(tmp_path):
    """Default: the AWT paper's ten (15-1 and 15-1a, b, c, e ... j; not 15-1d); ORDERS=all: the eleven."""
    runs, _, err = _dry([os.path.join(ROOT, "scripts", "voc", "mib_awt_15-1-orders.sh")], _env(tmp_path))
    assert sorted({_flag(a, "--task") for a in runs}) == sorted(["15-1"] + [f"15-1{o}" for o in "abcefghij"])
    assert len(runs) == 60 and "order set 'paper'" in err
    runs, _, _ = _dry([os.path.join(ROOT, "scripts", "voc", "mib_awt_15-1-orders.sh")], _env(tmp_path, ORDERS="all"))
    assert len({_flag(a, "--task") for a in runs}) == 11


# --------------------------------------------------------------------------------------------------------------------
# End to end on the synthetic data (ResNet-18, 32 px, one epoch), through the real wrappers.

def _smoke(tmp_path, script, data_root, crop=32):
    if not os.path.isfile(os.path.join(ROOT, "run.py")):
        pytest.skip("run.py is not in the tree yet")
    out = tmp_path / "out"
    extra = f"--no_pretrained --norm_act abn --num_workers 0 --no_progress --visualize --cache_root {out}/cache"
    env = _env(out, DRY_RUN=0, LAUNCHER=sys.executable, DATA_ROOT=data_root, EPOCHS=1, CROP=crop, BACKBONE="resnet18",
               BATCH_SIZE=8, AMP_LEVEL="O0", EXTRA=extra)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", *script.split("/"))], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method |" in proc.stdout  # the final table
    return out, proc


@pytest.mark.slow
def test_smoke_voc_mib_awt_15_5(tmp_path, synthetic_voc):
    out, proc = _smoke(tmp_path, "voc/mib_awt_15-5.sh", synthetic_voc)
    assert (out / "ckpt" / "15-5-voc_MiB_AWT_1.pth").is_file()
    run_folder = out / "runs" / "logs" / "15-5-voc" / "MiB_AWT"  # OUTPUT_DIR moves the logs and masks too
    assert (run_folder / "run.log").is_file() and (run_folder / "config.json").is_file()
    assert len((run_folder / "command.txt").read_text().splitlines()) == 4  # (comment, command) x 2 steps
    assert list((out / "runs" / "channels").rglob("*.pt"))
    lines = (out / "results" / "d_voc_15-5_MiB_AWT.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["0", "1"]
    # a second call finds every step done and only prints the table again
    env = _env(out, DRY_RUN=0, LAUNCHER="false")
    again = subprocess.run(["bash", os.path.join(ROOT, "scripts", "voc", "mib_awt_15-5.sh")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already done" in again.stderr and "| voc (synthetic) | 15-5 | MiB+AWT |" in again.stdout


@pytest.fixture(scope="module")
def small_ade(tmp_path_factory):
    """Synthetic ADE20K with just over one single-object image per class and split (150 classes), 32 px."""
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("small_ade") / "ADE"
    generate(str(root), "ade", size=32, n_train=160, n_val=152, seed=0)
    return str(root)


@pytest.mark.slow
def test_smoke_ade_mib_awt_100_50(tmp_path, small_ade):
    # 64 px crops: per-class AWT masks need each new class to cover a cell of the (crop / 16)^2 attribution grid
    out, _ = _smoke(tmp_path, "ade/mib_awt_100-50.sh", small_ade, crop=64)
    lines = (out / "results" / "d_ade_100-50_MiB_AWT.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["0", "1"]


@pytest.mark.slow
def test_demo_runs_resumes_and_reports(tmp_path, synthetic_voc):
    """scripts/demo.sh at toy size: every stage, one run folder, the report; a second call trains nothing."""
    out = tmp_path / "demo"
    env = {**_env(tmp_path), "DATA_ROOT": synthetic_voc, "OUT": str(out), "EPOCHS0": "1", "EPOCHS": "1",
           "WORKERS": "0", "EXTRA": "--batch_size 4 --no_progress"}
    env.pop("DRY_RUN")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "== [4/4" in proc.stdout and "demo finished in" in proc.stdout
    assert "| voc (synthetic) | 15-1 | MiB+AWT | 1 | 6/6 |" in proc.stdout
    assert (out / "miou_per_step.png").is_file() and (out / "report.md").is_file()
    for name in ("MiB", "MiB+AWT"):
        assert (out / "logs" / "15-1-voc" / name / "run.log").is_file()
        assert (out / "results" / f"demo_voc_15-1_{name}.csv").is_file()
    assert len(list((out / "checkpoints").glob("*.pth"))) == 11  # step 0 once, steps 1-5 twice
    again = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], env=env, cwd=str(tmp_path),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert " epoch " not in again.stdout  # nothing trained again
    assert again.stdout.count("is already trained and tested") == 11


def test_simformer_star_pipeline_trains_labels_and_retrains_on_the_labels(tmp_path):
    """scripts/simformer_star.sh: SimFormer's recipe, evaluate.py --pseudo_labels on its checkpoint, then the
    SimFormer_star row reading those masks; every command parses with the real parsers."""
    from evaluate import get_parser
    from experiment.config import parse_config

    env = _env(tmp_path, DATA_ROOT=str(tmp_path / "data"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "simformer_star.sh"), "coco_stuff_10k", "ws4"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    runs = [toks[toks.index("run.py") + 1:] for toks in lines if "run.py" in toks]
    labels = [toks[2:] for toks in lines if len(toks) > 1 and toks[1].endswith("evaluate.py")]
    assert len(runs) == 2 and len(labels) == 1
    first, star = parse_config(runs[0]), parse_config(runs[1])
    label_cfg = parse_config(labels[0], parser=get_parser())
    masks = str(tmp_path / "runs" / "pseudo" / "coco_stuff_10k_ws4")
    assert (first.name, first.pair_loss, first.novel_has_mask) == ("SimFormer", 1.0, False)
    assert (label_cfg.name, label_cfg.checkpoint, label_cfg.pseudo_labels) == ("SimFormer", str(tmp_path / "ckpt"), masks)
    assert (label_cfg.backbone, label_cfg.crop_size, label_cfg.task) == (first.backbone, first.crop_size, "ws4")
    assert (star.name, star.train_labels, star.novel_has_mask, star.mask_comp, star.pair_loss) == \
        ("SimFormer_star", masks, True, 0.0, 0.0)
