"""The published protocols, exactly (behaviour notes section 11): class orders and PLOP's task names, RW, PLOP's
median walk, the ADE attribution cap, domain-incremental Cityscapes, average_csv.py, the lr check against the recipe a
run follows, and the reproduction ledger. Each is checked against an independent re-computation of the notes."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, smoke_args
from dataset import tasks
from utils.errors import UserError

# ------------------------------------------------------------------------------------------------ 11.1 class orders
# The table of behaviour notes 11.1, copied as text: AWT name, PLOP name, in the AWT paper's ten, step 0, steps 1-5.
ORDERS_11_1 = """
15-1  15-5s   yes | 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 | 16 17 18 19 20
15-1a 15-5s_b yes | 12 9 20 7 15 8 14 16 5 19 4 1 13 2 11 | 17 3 6 18 10
15-1b 15-5s_c yes | 13 19 15 17 9 8 5 20 4 3 10 11 18 16 7 | 12 14 6 1 2
15-1c 15-5s_d yes | 15 3 2 12 14 18 20 16 11 1 19 8 10 7 17 | 6 5 13 9 4
15-1d 15-5s_e no  | 7 5 3 9 13 12 14 19 10 2 1 4 16 8 17 | 15 18 6 11 20
15-1e 15-5s_f yes | 7 13 5 11 9 2 15 12 14 3 20 1 16 4 18 | 8 6 10 19 17
15-1f 15-5s_g yes | 7 5 9 1 15 18 14 3 20 10 4 19 11 17 16 | 12 8 6 2 13
15-1g 15-5s_h yes | 12 9 19 6 4 10 5 18 14 15 16 3 8 7 11 | 13 2 20 17 1
15-1h 15-5s_i yes | 13 10 15 8 7 19 4 3 16 12 14 11 5 20 6 | 2 18 9 17 1
15-1i 15-5s_j yes | 1 14 9 5 2 15 8 20 6 16 18 7 11 10 19 | 3 4 17 12 13
15-1j 15-5s_k yes | 16 13 1 11 12 18 6 14 5 3 7 9 20 19 15 | 4 2 10 8 17
"""


def _orders():
    for line in ORDERS_11_1.strip().splitlines():
        names, step0, later = line.split("|")
        awt, plop, paper = names.split()
        yield awt, plop, paper == "yes", [int(c) for c in step0.split()], [int(c) for c in later.split()]


@pytest.mark.parametrize("awt,plop,in_paper,step0,later", list(_orders()))
def test_the_ten_orders_are_the_references(awt, plop, in_paper, step0, later):
    for name in (awt, plop):
        assert tasks.get_task_labels("voc", name, 0)[0] == [0] + step0  # the order inside step 0 matters too
        assert [tasks.get_task_labels("voc", name, s)[0] for s in range(1, 6)] == [[c] for c in later]
    assert tasks.canonical_task("voc", plop) == awt
    assert (awt in tasks.PAPER_ORDERS) == in_paper and awt in tasks.ALL_ORDERS


def test_plops_other_orders_are_accepted_under_their_names():
    names = [f"15-5s_{c}" for c in "bcdefghijklmnopqrstuvw"]
    assert len(names) == 22
    for name in names:
        labels = [c for s in range(6) for c in tasks.get_task_labels("voc", name, s)[0]]
        assert sorted(labels) == list(range(21)) and tasks.num_steps("voc", name) == 6
    assert tasks.get_task_labels("voc", "15-5s_w", 0)[0][:6] == [0, 1, 2, 12, 14, 13]  # PLOP tasks.py
    assert tasks.get_task_labels("voc", "15-5s_l", 5)[0] == [5]
    assert len(tasks.PAPER_ORDERS) == 10 and "15-1d" not in tasks.PAPER_ORDERS and len(tasks.ALL_ORDERS) == 11


def _order_csv(folder, task, base_value, new_value, name="MiB_AWT"):
    """A finished 15-1 run (remapped columns): step 0 and step 5 rows."""
    step0 = [0] + [base_value] * 16 + ["x"] * 5 + [base_value]
    last = [5] + [base_value] * 16 + [new_value] * 5 + [(16 * base_value + 5 * new_value) / 21]
    path = os.path.join(str(folder), f"d_voc_{task}_{name}.csv")
    with open(path, "w") as handle:
        handle.write("\n".join(",".join(str(c) for c in row) for row in (step0, last)) + "\n")
    return path


def test_report_pools_the_papers_ten_orders_by_default(tmp_path, capsys):
    import report

    values = {o: 0.3 + 0.02 * i for i, o in enumerate(tasks.ALL_ORDERS)}
    for order, value in values.items():
        _order_csv(tmp_path, order, value, 0.1)
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "the AWT paper's ten orders" in ln and ln.startswith("| voc"))
    paper = [values[o] for o in tasks.PAPER_ORDERS]
    assert row.split("|")[4].strip() == "10" and f"{100 * np.mean(paper):.1f} ±" in row.split("|")[6]
    assert any(ln.startswith("| voc | 15-1d |") for ln in out.splitlines())  # left out, on its own row
    assert "left out: 15-1d" in out and "15-1, 15-1a, 15-1b, 15-1c, 15-1e" in out
    assert report.main([str(tmp_path), "--orders", "all"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "all eleven orders" in ln and ln.startswith("| voc"))
    assert row.split("|")[4].strip() == "11" and f"{100 * np.mean(list(values.values())):.1f} ±" in row


# ------------------------------------------------------------------------------------------------ 11.3 RW
class _Net(torch.nn.Module):
    def __init__(self, with_c: bool):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.b = torch.nn.Parameter(torch.tensor([[0.3, 0.0], [2.0, -1.0]]))
        if with_c:  # a parameter that appears at a later step (a new classifier)
            self.c = torch.nn.Parameter(torch.tensor([0.25]))


def _norm(t):
    return (t - t.min()) / (t.max() - t.min() + 1e-8)


def _reference_rw_step(params, grads, old, alpha, window, lr):
    """Behaviour notes 11.3, written from the notes: returns (fisher, stored score, penalties per iteration)."""
    fisher = {n: old["fisher"][n].clone() if n in old.get("fisher", {}) else torch.ones_like(p)
              for n, p in params.items()}
    score = {n: torch.zeros_like(p) for n, p in params.items()}
    theta_tmp, count, penalties = None, 0, []
    importance = {n: _norm(old["fisher"][n]) + _norm(old["score"][n]) for n in old.get("fisher", {})}
    for g in grads:
        if count % window == 0:
            if count > 0:
                for n in params:
                    d = theta_tmp[n] - params[n]
                    score[n] = score[n] + g[n] * d / (0.5 * fisher[n] * d ** 2 + 1e-8)
            theta_tmp = {n: p.clone() for n, p in params.items()}
        count += 1
        for n in params:
            fisher[n] = alpha * g[n] ** 2 + (1 - alpha) * fisher[n]
        penalties.append(sum(float((importance[n] * (params[n] - old["theta"][n]) ** 2).sum())
                             for n in importance) if importance else None)
        for n in params:  # the optimiser's step after the penalty
            params[n] = params[n] - lr * g[n]
    stored = {n: (0.5 * (s.clamp(min=0) + old["score"][n]) if n in old.get("score", {}) else s.clamp(min=0))
              for n, s in score.items()}
    return fisher, stored, penalties


def test_rw_over_three_steps_equals_the_notes():
    from methods.regularizers import Regularizer

    gen = torch.Generator().manual_seed(0)
    alpha, window, lr, iters = 0.8, 3, 0.1, 8
    previous, model_old, ref_old = None, None, {}
    for step in range(3):
        model = _Net(with_c=step > 0)
        if model_old is not None:
            model.load_state_dict(model_old.state_dict(), strict=False)
        reg = Regularizer(kind="rw", model=model, model_old=model_old, previous=previous, importance=1.0,
                          alpha=alpha, iterations=window)
        grads = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(iters)]
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        fisher, stored, penalties = _reference_rw_step(params, grads, ref_old, alpha, window, lr)
        for g, expected_penalty in zip(grads, penalties):
            for n, p in model.named_parameters():
                p.grad = g[n].clone()
            out = reg.after_backward(model)
            if expected_penalty is None:
                assert out == {}
            else:
                assert float(out["loss_reg"].detach()) == pytest.approx(expected_penalty, rel=1e-5)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p -= lr * g[n]
        state = reg.state_dict()
        for n in fisher:
            torch.testing.assert_close(state["fisher"][n], fisher[n])
            torch.testing.assert_close(state["score"][n], stored[n])
        previous = state
        ref_old = {"fisher": fisher, "score": stored, "theta": {n: p.detach().clone()
                                                                for n, p in model.named_parameters()}}
        model_old = model
    assert set(state["score"]) == {"a", "b", "c"}


# ------------------------------------------------------------------------------------------------ 11.4 median
def _reference_walk(counts):
    """PLOP train.py find_median, for one class, in numpy float32 (an independent re-computation of the walk)."""
    nb_bins = len(counts)
    hist = np.asarray(counts, dtype=np.int64)
    half = np.float32(hist.sum()) / np.float32(2)
    running = 0.0
    lower = 0.0
    index = 0
    for k in range(nb_bins):
        lower = k / nb_bins
        index = int(lower * nb_bins)
        if half >= np.float32(running) and half <= np.float32(running + hist[index]):
            break
        running += lower * nb_bins
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.float32(lower) + (np.float32(half - np.float32(running)) / np.float32(hist[index])) * np.float32(1 / nb_bins)


EDGE_CASES = {
    "+inf: never brackets, empty last bin": [6, 6, 2, 0],  # half 7 > the final running sum 0+1+2+3
    "-inf: the walk overtakes half, empty last bin": [3, 3, 2, 0, 0, 0, 0, 0, 0, 0],
    "nan: brackets on an empty bin": [0, 0, 0, 2],
    "ordinary": [2, 0, 6, 2],
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_plop_median_edge_cases(name):
    from methods.pseudo import histogram_median

    counts = EDGE_CASES[name]
    ours, ref = histogram_median(counts), float(_reference_walk(counts))
    assert (math.isnan(ours) and math.isnan(ref)) or ours == pytest.approx(ref, rel=1e-6, abs=0)
    expected = {"+inf": math.inf, "-inf": -math.inf}.get(name.split(":")[0])
    if expected is not None:
        assert ours == expected
    if name.startswith("nan"):
        assert math.isnan(ours)
    corrected = histogram_median(counts, exact=True)
    assert math.isfinite(corrected) and 0 <= corrected <= 1


def test_plop_median_bin_index_rounding():
    """int(k / 100 * 100) is k - 1 for some k (29 among them): at k = 29 the walk reads bin 28. With half = 410 it
    passes bin 28 at k = 28 (running 378 + 10 < 410) and brackets at k = 29 on bin 28's count (406 <= 410 <= 416)."""
    from methods.pseudo import histogram_median

    assert int(29 / 100 * 100) == 28
    counts = [0] * 100
    counts[28], counts[99] = 10, 810
    ours = histogram_median(counts)
    assert ours == pytest.approx(float(_reference_walk(counts)), rel=1e-6)
    assert ours == pytest.approx(0.29 + (410 - 406) / 10 / 100, rel=1e-6)  # reading bin 29 would never bracket


def test_thresholds_keep_nan_and_inf_as_the_reference():
    from methods.pseudo import PseudoLabel

    term = PseudoLabel(mode="entropy", threshold=0.001, n_old=4, n_classes=5, nb_bins=10)
    hist = torch.tensor([EDGE_CASES["-inf: the walk overtakes half, empty last bin"],
                         [0, 0, 0, 2, 0, 0, 0, 0, 0, 0], [5, 5, 1, 0, 0, 0, 0, 0, 0, 0], [0] * 10])
    th = term.thresholds_from_histograms(hist)
    ref = [float(_reference_walk(row)) for row in hist.tolist()[:3]]
    assert th[0] == pytest.approx(0.001) and ref[0] == -math.inf  # -inf falls to the --threshold floor
    assert math.isnan(th[1]) and math.isnan(ref[1])  # nan stays: no pixel passes `entropy < nan`
    assert th[3] == pytest.approx(0.001)  # empty class: 0, then the floor


# ------------------------------------------------------------------------------------------------ 11.5 ADE cap
def _reference_cap(valid_per_image, cap):
    """attribute.py: skip images with an empty mask; after an attributed one, stop if its position > cap - 2."""
    used = []
    for position, valid in enumerate(valid_per_image):
        if not valid:
            continue
        used.append(position)
        if position > cap - 2:
            break
    return used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attribution_cap_follows_the_reference_loop(seed):
    from methods.attribution import ScoreAccumulator

    rng = np.random.default_rng(seed)
    n, cap, groups = 40, 11, 3
    valid = rng.random((n, groups)) < 0.5
    valid[10, 0] = False  # group 0: the cap position is skipped, its next usable image is taken
    acc = ScoreAccumulator(groups, "mean_after_avg", cap=cap)
    seen = []
    for start in range(0, n, 7):  # batches of 7 cut across the cap
        b = min(7, n - start)
        attributions = torch.arange(start, start + b, dtype=torch.float64)[:, None, None, None].expand(b, 2, 2, 2)
        masks = torch.from_numpy(valid[start:start + b]).float()[:, :, None, None].expand(b, groups, 2, 2)
        acc.update(attributions.float(), masks)
        seen.append(b)
        if acc.done:
            break
    scores, used = acc.scores()
    for k in range(groups):
        expected = _reference_cap(valid[:, k], cap)
        assert int(used[k]) == len(expected)
        assert scores[k, 0].item() == pytest.approx(np.mean(expected))  # mean of the attributed positions


def test_ade_caps_and_the_50_50_alias():
    from methods import awt

    assert awt.dataset_defaults("ade", "100-10")["max_images"] == 2001
    assert awt.dataset_defaults("ade", "50")["max_images"] == awt.dataset_defaults("ade", "50-50")["max_images"] == 5001
    assert awt.dataset_defaults("voc", "15-1")["max_images"] is None


# ------------------------------------------------------------------------------------------------ Cityscapes domain
@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("cs") / "cityscapes"
    generate(str(root), "cityscapes", size=32, n_train=72, n_val=24, seed=0)
    return str(root)


@pytest.mark.parametrize("task", ["offline", "11-5", "11-1", "1-1"])
def test_domain_tasks_partition_the_21_cities(task):
    table = tasks.TASKS["cityscapes_domain"][task]
    assert sorted(c for step in table.values() for c in step) == list(range(21))
    assert {len(table[s]) for s in table if s > 0} <= {1, 5} and all(
        tasks.classes_per_step("cityscapes_domain", task, s) == [19] for s in table)
    assert tasks.order("cityscapes_domain", task, len(table) - 1) == list(range(19))


def test_domain_protocol_cities_and_splits(cityscapes_root, tmp_path):
    from dataset.cityscapes_domain import CITY_IDS, CityscapesDomainReader
    from dataset.incremental import build_datasets

    reader = CityscapesDomainReader(cityscapes_root, "train")
    assert sorted(set(reader.cities.tolist())) == list(range(21)) and len(reader) == 96
    assert tasks.classes_per_step("cityscapes_domain", "11-1", 4) == [19]
    assert tasks.get_task_labels("cityscapes_domain", "11-5", 1)[0] == [11, 12, 13, 14, 15]
    train, val, test = build_datasets(dataset="cityscapes_domain", root=cityscapes_root, task="11-5", step=1,
                                      overlap=True, crop_size=32, cache_root=str(tmp_path))
    # independent: the step's images in listing order, RandomState(1).shuffle, first int(0.8 n) train
    idxs = [i for i, c in enumerate(reader.cities) if c in (11, 12, 13, 14, 15)]
    np.random.RandomState(1).shuffle(idxs)
    cut = int(0.8 * len(idxs))
    assert train.idxs.tolist() == idxs[:cut] and val.idxs.tolist() == idxs[cut:]
    cumulative = [i for i, c in enumerate(reader.cities) if c < 16]
    np.random.RandomState(1).shuffle(cumulative)
    assert test.idxs.tolist() == cumulative[int(0.8 * len(cumulative)):]
    image, label = train[0]
    assert image.dtype == torch.uint8 and set(torch.unique(label).tolist()) <= set(range(19)) | {255}
    assert os.path.basename(os.path.dirname(reader.samples[0][0])) in CITY_IDS


def test_domain_refuses_class_step_flags(cityscapes_root, tmp_path, capsys):
    import run

    args = smoke_args(cityscapes_root, tmp_path, dataset="cityscapes_domain", task="11-5", extra=["--method", "MiB"])
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --unce (set by --method MiB) works on the classes a step adds") and "\n" not in err
    assert err.endswith("(the same for --unkd, --init_balanced)")


DOMAIN_METHODS = {"PLOP": ["--method", "FT", "--pod", "local", "--pod_factor", "0.0001", "--pod_logits"],
                  "RCIL": ["--method", "RCIL"]}  # each paper's cityscapes_domain flags (RCIL: CE and PCKD)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(DOMAIN_METHODS))
def test_domain_two_steps_through_run_py(cityscapes_root, tmp_path, method, caplog):
    import run

    args = smoke_args(cityscapes_root, tmp_path, dataset="cityscapes_domain", task="11-5", steps=(0, 1),
                      extra=[*DOMAIN_METHODS[method], "--lr", "0.01", "0.001", "--overlap"])
    with caplog.at_level("INFO"):
        assert run.main(args) == 0
    if method == "RCIL":  # PCKD trained step 1 with a nonzero loss
        assert any("loss_pckd=" in r.getMessage() and "loss_pckd=0.0000" not in r.getMessage()
                   for r in caplog.records)
    csv = tmp_path / "results" / "test_cityscapes_domain_11-5_Experiment.csv"
    rows = csv.read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["0", "1"] and len(rows[1].split(",")) == 21  # step, 19 IoUs, mIoU
    state = torch.load(tmp_path / "ckpt" / "11-5-cityscapes_domain_Experiment_1.pth", weights_only=True)
    assert state["model_state"]["cls.0.weight"].shape[0] == 19 and "cls.1.weight" not in state["model_state"]


# ------------------------------------------------------------------------------------------------ scripts and CSVs
LOGITS_POD = '{"switch": {"after": {"extra_channels": "sum", "factor": %s, "type": "local"}}}'
PLOP_LINES = [  # from PLOP's scripts (4b4a060), variables filled in, launcher dropped; (flags, --pod_options JSON)
    ("--date 2024-01-01 --data_root /data --overlap --batch_size 12 --dataset voc --name PLOP --task 15-5s --step 1 "
     "--lr 0.001 --epochs 30 --method PLOP --opt_level O1 --checkpoint checkpoints/step/", None),
    ("--date 2024-01-01 --data_root /data --overlap --batch_size 12 --dataset ade --name PLOP --task 100-10 --step 1 "
     "--lr 0.001 --epochs 60 --method FT --opt_level O1 --checkpoint checkpoints/step/ --pod local --pod_factor 0.001 "
     "--pod_logits --pseudo entropy --threshold 0.001 --classif_adaptive_factor --init_balanced", LOGITS_POD % "0.00001"),
    ("--date 2024-01-01 --data_root /data --overlap --batch_size 12 --dataset cityscapes_domain --name PLOP "
     "--task 11-1 --step 3 --lr 0.001 --epochs 50 --method FT --opt_level O1 --checkpoint checkpoints/step/ "
     "--pod local --pod_factor 0.0001 --pod_logits", LOGITS_POD % "0.0001"),
    ("--date 2024-01-01 --data_root /data --overlap --batch_size 12 --dataset voc --name PLOP --task 15-5s_k "
     "--step 2 --lr 0.001 --epochs 30 --method PLOP --opt_level O1 --local_rank 0", None),
]


@pytest.mark.parametrize("flags,pod_options", PLOP_LINES)
def test_published_plop_command_lines_parse(flags, pod_options):
    from experiment.config import parse_config
    from experiment.validate import _check_protocol

    argv = flags.split() + (["--pod_options", pod_options] if pod_options else [])
    cfg = parse_config(argv)
    _check_protocol(cfg)
    assert cfg.task in tasks.task_names(cfg.dataset)
    if pod_options:
        assert cfg.pod_options["switch"]["after"]["factor"] == float(pod_options.split('"factor": ')[1].split(",")[0])


def test_average_csv_runs_as_the_published_scripts_call_it(tmp_path, capsys):
    import average_csv

    path = _order_csv(tmp_path, "15-5s_b", 0.5, 0.2, name="PLOP")  # PLOP's file name: its task name
    assert average_csv.main([path]) == 0
    out = capsys.readouterr().out
    assert "| voc | 15-1a | PLOP | 1 | 6/6 | 50.0 | 20.0 | 42.9 | 28.6 | 46.4 |" in out
    assert average_csv.main([path, "15-1a", "--reference-average"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-5:] == ["Last Step: 5", "Final Mean IoU 42.86", "Average Mean IoU 46.43", "Mean IoU first 50.0",
                        "Mean IoU last 20.0"]
    assert average_csv.main([path, "15-1b"]) == 2
    assert "not 15-1b" in capsys.readouterr().err


def test_lr_warning_names_the_recipe_the_run_follows(synthetic_voc, tmp_path, caplog):
    import run

    base = ["--method", "PLOP", "--overlap", "--epochs", "30", "--batch_size", "24", "--step", "0"]
    from experiment.config import parse_config

    cfg = parse_config(smoke_args(synthetic_voc, tmp_path, extra=base))
    recipe = run.find_recipe(cfg)
    assert recipe.id == "plop-voc"
    caplog.set_level("WARNING")
    run.compare_with_recipe(parse_config(smoke_args(synthetic_voc, tmp_path, extra=base + ["--lr", "0.01"])),
                            recipe)  # PLOP's own 0.01: no lr warning
    assert not [r for r in caplog.records if "lr" in r.getMessage()]
    steps = ["--step", "1", "2", "3", "--lr", "0.01", "--epochs", "30"]
    run.compare_with_recipe(parse_config(smoke_args(synthetic_voc, tmp_path, extra=base + steps)), recipe)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # once for the call, not once per step
    assert "differs from PLOP recipe plop-voc" in warnings[0]
    assert "lr 0.01 at steps 1, 2, 3 (published 0.001)" in warnings[0]
    awt = run.find_recipe(parse_config(smoke_args(synthetic_voc, tmp_path, extra=[
        "--method", "MiB", "--att", "25", "--mask_att", "--task", "15-1"])))
    assert awt.id == "awt-voc" and awt.lr_at(0) == 0.02
    assert run.find_recipe(parse_config(smoke_args(synthetic_voc, tmp_path, extra=["--method", "MiB"]))).lr_at(0) == 0.01


# ------------------------------------------------------------------------------------------------ ledger
def test_ledger_fills_ours_and_flags_what_differs(tmp_path, capsys):
    import report
    from experiment.ledger import load_ledger
    from metrics.results import update_run_record

    path = _order_csv(tmp_path, "15-1", 0.6, 0.2)  # MiB_AWT on VOC 15-1: the AWT Table 8 default row
    for step in range(6):
        update_run_record(path, step, {"task": "15-1", "lr": 0.02 if step == 0 else 0.001, "epochs": 30,
                                       "effective_batch": 24 if step else 8,
                                       "selected_on": "the test images" if step == 5 else None})
    plop = _order_csv(tmp_path, "15-1", 0.7, 0.3, name="PLOP")  # no run record
    assert os.path.exists(plop)
    assert report.main(["--ledger", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    awt = next(ln for ln in out.splitlines() if ln.startswith("| awt-t8-att25 "))
    cells = [c.strip() for c in awt.split("|")]
    assert cells[4] == "59.1 / 17.2 / 49.1" and cells[5] == "60.0 / 20.0 / 50.5" and cells[6] == "+1.4"
    assert cells[7] == "26.6 / 30.0"  # hIoU: 2 * 59.1 * 17.2 / (59.1 + 17.2), derived; ours 2 * 60 * 20 / 80
    # only steps 0 and 5 have rows; step 5 kept the weights of its best validation on the test images
    assert cells[8] == "steps 2/6; batch 8≠24 (step 0); selected on the test images"
    plop_row = next(ln for ln in out.splitlines() if ln.startswith("| plop-t1-plop-15-1 "))
    assert "no run record" in plop_row
    assert f"2 of {len(load_ledger())} rows have a result" in out
    assert report.main(["--ledger"]) == 0 and "not run" in capsys.readouterr().out


def test_reproduction_doc_is_the_generated_ledger():
    from experiment.ledger import load_ledger, recipe_of, reproduction_markdown

    with open(os.path.join(ROOT, "docs", "reproduction.md"), encoding="utf-8") as handle:
        assert handle.read() == reproduction_markdown(), "regenerate: python -m experiment.ledger --markdown"
    for row in load_ledger():  # every row names a wrapper that exists and a command that runs it
        recipe = recipe_of(row)
        assert os.path.isfile(os.path.join(ROOT, "scripts", row.wrapper + ".sh"))
        batch_32 = ("ssul-voc", "ssul-m-voc", "ssul-awt-voc", "ssul-m-awt-voc", "dkd-voc", "dkd-awt-voc")
        weak_shot = recipe.paper == "SimFormer"  # one step of MaskFormer: batch 8 (its configs)
        assert recipe.batch == (32 if recipe.id in batch_32 else 8 if weak_shot else 24)  # SSUL, DKD: 32 on VOC
        # SimFormer*'s pipeline runs its row's wrapper as its last stage
        pipeline = "scripts/simformer_star.sh" if "/simformer_star_" in row.wrapper else None
        assert f"scripts/{row.wrapper}.sh" in row.command or (pipeline and pipeline in row.command), row.id
        # a number, or a row that says it awaits one (DropClass: the paper's tables were not retrieved)
        assert row.published or (row.src == "" and "no published number" in row.note), row.id


def test_run_records_survive_reruns_and_bad_files(tmp_path):
    from metrics.results import read_run_record, run_record_path, update_run_record

    csv = str(tmp_path / "d_voc_15-1_X.csv")
    update_run_record(csv, 1, {"lr": 0.001})
    update_run_record(csv, 0, {"lr": 0.02})
    update_run_record(csv, 1, {"lr": 0.002})
    assert read_run_record(csv) == {0: {"lr": 0.02}, 1: {"lr": 0.002}}
    with open(run_record_path(csv), "w") as handle:
        handle.write("{not json")
    with pytest.raises(UserError, match="repair or delete it"):  # refused in one line, never read as "no record"
        read_run_record(csv)
    update_run_record(csv, 2, {"lr": 0.1})
    assert json.loads(open(run_record_path(csv)).read()) == {"steps": {"2": {"lr": 0.1}}}
