"""Hostile inputs of the features added last rounds: each is refused in one line with a non-zero exit, or handled
without losing or fabricating anything (issue 31, part 4)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import smoke_args
from utils.errors import UserError


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("hostile") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=60, n_val=24, seed=0)
    return str(root)


def _run(argv, capsys, program="run"):
    module = __import__(program)
    try:
        rc = module.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err, captured.out


def _one_line(rc, err, *fragments, code=2) -> str:
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error: ", "interrupted: "))]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("extra, fragments", [
    (["--dropclass", "--dropclass_alpha", "nan"], ["--dropclass_alpha", "not a finite number"]),
    (["--dropclass", "--dropclass_alpha", "inf"], ["--dropclass_alpha", "not a finite number"]),
    (["--method", "SSUL", "--pseudo_thresh=-inf"], ["not a finite number"]),
    (["--name", "a\nb"], ["--name", "control character"]),
    (["--name", "x" * 300], ["--name", "300 bytes", "100"]),
    (["--date", "../../x"], ["--date", "not a plain name"]),
    (["--date", "a/b"], ["--date", "not a plain name"]),
    (["--output_dir", ""], ["--output_dir", "empty path"]),
    (["--checkpoint", ""], ["--checkpoint", "empty path"]),
    (["--method", "MiB", "--mem_size", "8"], ["--mem_size"]),
])
def test_bad_flags_are_one_line(voc, tmp_path, capsys, extra, fragments):
    rc, err, _ = _run(smoke_args(voc, tmp_path, extra=["--lr", "0.01", *extra]), capsys)
    _one_line(rc, err, *fragments)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "results").exists()


def test_evaluate_refuses_a_negative_sample_count(voc, tmp_path, capsys):
    rc, err, _ = _run(smoke_args(voc, tmp_path, extra=["--save_samples", "-3", "--out_dir", str(tmp_path / "e")]),
                      capsys, "evaluate")
    _one_line(rc, err, "--save_samples", ">= 0")


@pytest.mark.parametrize("kind", ["dangling", "looping"])
def test_checkpoint_folder_that_is_a_broken_symlink(voc, tmp_path, capsys, kind):
    link = tmp_path / "ckpt_link"
    os.symlink(tmp_path / "nowhere" if kind == "dangling" else link, link)
    args = smoke_args(voc, tmp_path, extra=["--lr", "0.01"])
    args[args.index("--checkpoint") + 1] = str(link)
    rc, err, _ = _run(args, capsys)
    _one_line(rc, err, "--checkpoint", "symbolic link", "does not exist or loops")


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_in_evaluate_and_attribute(voc, tmp_path, capsys, monkeypatch):
    import attribute
    import evaluate
    import run
    from methods import awt

    assert run.main(smoke_args(voc, tmp_path, extra=["--lr", "0.01", "--method", "MiB", "--name", "M"])) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    rc, err, _ = _run(smoke_args(voc, tmp_path, extra=["--method", "MiB", "--name", "M"]), capsys, "evaluate")
    _one_line(rc, err, "interrupted:", "nothing was written", code=130)
    monkeypatch.setattr(awt, "compute_mask", interrupted)
    rc, err, _ = _run(smoke_args(voc, tmp_path, steps=(1,), extra=["--method", "MiB", "--name", "M", "--att", "25"]),
                      capsys, "attribute")
    _one_line(rc, err, "interrupted:", "rerun the command", code=130)
    assert not (tmp_path / "channels").exists()


# ------------------------------------------------------------------------------------------------ rerun of a finished step
def test_finished_step_rerun_with_other_flags_says_so_and_keeps_its_config(voc, tmp_path, capsys):
    import run

    args = smoke_args(voc, tmp_path, extra=["--lr", "0.01", "--method", "FT", "--name", "R"])
    assert run.main(args) == 0
    folder = tmp_path / "logs" / "15-5-voc" / "R"
    config = (folder / "config.json").read_text()
    ckpt = (tmp_path / "ckpt" / "15-5-voc_R_0.pth").read_bytes()
    capsys.readouterr()
    other = smoke_args(voc, tmp_path, extra=["--lr", "0.02", "--method", "SSUL", "--name", "R"])
    assert run.main(other) == 0
    out = capsys.readouterr().out
    assert "with other training flags than this call's" in out and "--method 'FT' there, 'SSUL' now" in out
    assert "lr 0.01 there, 0.02 now" in out and "--overwrite retrains it" in out
    assert (folder / "config.json").read_text() == config  # nothing trained: the config of the training stays
    assert json.loads(config)["method"] == "FT"
    assert (tmp_path / "ckpt" / "15-5-voc_R_0.pth").read_bytes() == ckpt
    calls = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]
    assert [c["config"]["method"] for c in calls] == ["FT", "SSUL"]  # a record per call


def test_summary_lost_to_a_full_disk_is_completed_by_a_rerun(voc, tmp_path, capsys):
    import run

    args = smoke_args(voc, tmp_path, extra=["--lr", "0.01", "--name", "S"])
    assert run.main(args) == 0
    summary = tmp_path / "results" / "test_voc_15-5_S_summary.md"
    text = summary.read_text()
    summary.unlink()  # what a full disk between the CSV row and the summary leaves
    assert run.main(args) == 0
    assert summary.read_text() == text
    assert "wrote the missing summary" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ results files
def _csv(tmp_path, rows: list[str]) -> str:
    path = tmp_path / "r" / "2024-01-01_voc_15-5_X.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _row(step: int, value: str = "0.5", miou: str = "0.5") -> str:
    cells = [value] * 16 + (["x"] * 5 if step == 0 else [value] * 5)
    return ",".join([str(step), *cells, miou])


@pytest.mark.parametrize("rows, fragments", [
    ([_row(0, value="nan")], ["'nan'", "is not a result", "X"]),
    ([_row(0, miou="nan")], ["mIoU column", "'nan'"]),
    ([_row(0), _row(0, value="0.25")], ["second row of step 0", "line 1"]),
])
def test_results_csv_with_nan_or_conflicting_rows(tmp_path, capsys, rows, fragments):
    path = _csv(tmp_path, rows)
    for program, argv in (("report", [path]), ("average_csv", [path])):
        rc, err, _ = _run(argv, capsys, program)
        _one_line(rc, err, *fragments)


def test_repeated_identical_rows_are_one_result(tmp_path, capsys):
    rc, err, out = _run([_csv(tmp_path, [_row(0), _row(0), _row(1)])], capsys, "report")
    assert rc == 0, err


@pytest.mark.parametrize("record", [
    "not json", "[]", '{"steps": []}', '{"steps": {"one": {}}}', '{"steps": {"1": "text"}}',
    '{"steps": {"1": {"lr": "fast"}}}', '{"steps": {"1": {"effective_batch": true}}}', '{"steps": {"1": {"task": 5}}}',
])
def test_ledger_on_a_malformed_run_record(tmp_path, capsys, record):
    path = _csv(tmp_path, [_row(0), _row(1)])
    # a name the ledger looks for: MiB on VOC 15-5 overlap
    target = os.path.join(os.path.dirname(path), "2024-01-01_voc_15-5_MiB.csv")
    os.rename(path, target)
    with open(target[:-4] + ".run.json", "w") as handle:
        handle.write(record)
    rc, err, _ = _run(["--ledger", os.path.dirname(target)], capsys, "report")
    _one_line(rc, err, "run record", ".run.json", "repair or delete it")


def test_ledger_with_a_record_lacking_the_lr(tmp_path, capsys):
    path = _csv(tmp_path, [_row(0), _row(1)])
    target = os.path.join(os.path.dirname(path), "2024-01-01_voc_15-5_MiB.csv")
    os.rename(path, target)
    with open(target[:-4] + ".run.json", "w") as handle:
        json.dump({"steps": {"0": {"effective_batch": 24}, "1": {"lr": None}}}, handle)
    rc, err, out = _run(["--ledger", os.path.dirname(target)], capsys, "report")
    assert rc == 0 and "lr ?≠" in out, err


# ------------------------------------------------------------------------------------------------ datasets
def test_domain_index_cache_follows_added_images(tmp_path):
    from dataset.incremental import build_datasets
    from dataset.synthetic import generate

    root = tmp_path / "cs"
    generate(str(root), "cityscapes", size=32, seed=0)
    kwargs = dict(dataset="cityscapes_domain", root=str(root), task="11-5", step=1, overlap=True, crop_size=16,
                  cache_root=str(tmp_path / "cache"))

    def cities_of(ds):
        return {int(ds.reader.cities[i]) for i in ds.idxs}

    train, _, test = build_datasets(**kwargs)
    assert cities_of(train) <= set(range(11, 16)) and cities_of(test) <= set(range(16))
    # new images in the first city folder shift every later index of the listing
    src = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))[0]
    city = src.parent.name
    for k in range(3):
        stem = f"{city}_99999{k}_000019"
        shutil.copy(src, src.parent / f"{stem}_leftImg8bit.png")
        label = next((root / "gtFine" / "train" / city).glob("*_gtFine_labelIds.png"))
        shutil.copy(label, root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png")
    train, _, test = build_datasets(**kwargs)
    assert cities_of(train) <= set(range(11, 16)) and cities_of(test) <= set(range(16))


def _saliency_root(voc, tmp_path, change) -> str:
    root = tmp_path / "PascalVOC12"
    shutil.copytree(voc, root)
    path = root / "saliency_map" / "synt_000003.png"
    change(path)
    return str(root)


@pytest.mark.parametrize("kind", ["smaller", "transposed", "exif"])
def test_saliency_map_of_the_wrong_size_or_orientation(voc, tmp_path, kind):
    from dataset.voc import VOCReader

    def change(path):
        sal = Image.open(path)
        if kind == "smaller":
            sal.resize((sal.width // 2, sal.height // 2)).save(path)
        elif kind == "transposed":  # a portrait map: make the image non-square first
            img_path = path.parent.parent / "JPEGImages" / "synt_000003.jpg"
            Image.open(img_path).crop((0, 0, 32, 24)).save(img_path)
            lbl_path = path.parent.parent / "SegmentationClassAug" / "synt_000003.png"
            Image.open(lbl_path).crop((0, 0, 32, 24)).save(lbl_path)
            sal.crop((0, 0, 32, 24)).transpose(Image.Transpose.TRANSPOSE).save(path)
        else:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated 90 degrees when shown
            sal.save(path, exif=exif)

    root = _saliency_root(voc, tmp_path, change)
    reader = VOCReader(root, "train")
    index = next(i for i, (img, _) in enumerate(reader.samples) if img.endswith("synt_000003.jpg"))
    image, _ = reader.load(index)
    with pytest.raises(UserError) as info:
        reader.load_aux("saliency", index, image.size)
    message = str(info.value)
    assert "synt_000003.png" in message
    assert {"smaller": "of another size", "transposed": "transposed", "exif": "EXIF orientation 6"}[kind] in message


# ------------------------------------------------------------------------------------------------ files left by kills
def test_a_killed_save_leaves_no_temporary_file_behind(tmp_path, caplog):
    import logging

    from utils.checkpoint import save_checkpoint
    from utils.io import _temp_prefix

    path = str(tmp_path / "15-5-voc_X_0.pth")
    leftover = tmp_path / f"{_temp_prefix(path)}{2**22 + 12345}.abcdefgh.tmp"  # a pid no process has
    leftover.write_bytes(b"\0" * 4096)
    live = tmp_path / f"{_temp_prefix(path)}{os.getpid()}.abcdefgh.tmp"  # a write still in progress
    live.write_bytes(b"\0")
    other = tmp_path / ".15-5-voc_X_1.pth.zzzzzz.999.x.tmp"  # another file's
    other.write_bytes(b"\0")
    with caplog.at_level(logging.INFO):
        save_checkpoint(path, model_state={"w": torch.zeros(2)})
    assert not leftover.exists() and live.exists() and other.exists()
    assert "left by an interrupted write" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["15-5-voc_X_0.pth"]


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(tmp_path, caplog):
    import logging

    from utils.lock import RunLock

    (tmp_path / ".x.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "h", "since": "2026-01-01T00:00:00"}))
    with caplog.at_level(logging.INFO), RunLock(str(tmp_path), "x"):
        pass
    assert f"took over the lock of PID {2**22 + 7} on host h" in caplog.text
    assert not (tmp_path / ".x.lock").exists()


# ------------------------------------------------------------------------------------------------ SSUL-M memory
def test_memory_records_what_it_was_built_with(tmp_path):
    from methods.memory import read_memory, rebuild_reason, write_memory_step

    path = str(tmp_path / "m.json")
    built = {"mem_size": 8, "random_seed": 42}
    write_memory_step(path, 1, [["a.jpg", 1, 3, [1]]], built)
    entry = read_memory(path)["step_1"]
    assert entry["built_with"] == built
    assert rebuild_reason(entry, built, overwrite=False) is None
    assert "mem_size 8 there, 4 now" in rebuild_reason(entry, {**built, "mem_size": 4}, overwrite=False)
    assert "random_seed 42 there, 1 now" in rebuild_reason(entry, {**built, "random_seed": 1}, overwrite=False)
    assert rebuild_reason(entry, built, overwrite=True) == "--overwrite"
    assert rebuild_reason(None, built, overwrite=False) == "missing"
    assert "older version" in rebuild_reason({"memory_list": ["a.jpg"]}, built, overwrite=False)


@pytest.mark.slow
def test_ssul_m_memory_rebuilt_for_another_size_and_a_kill_before_the_first_checkpoint_is_exact(
        voc, tmp_path, monkeypatch, capsys):
    import run
    from conftest import interrupt_at_epoch

    common = ["--method", "SSUL-M", "--lr", "0.01", "--overlap", "--batch_size", "4", "--epochs", "2"]
    base = tmp_path / "base"
    assert run.main(smoke_args(voc, base, task="15-1", extra=[*common, "--name", "M"])) == 0
    step0 = str(base / "ckpt" / "15-1-voc_M_0.pth")

    def step1(out, *extra):
        return smoke_args(voc, out, task="15-1", steps=(1,), extra=[*common, "--name", "M", "--step_ckpt", step0,
                                                                      *extra])

    assert run.main(step1(tmp_path / "a", "--mem_size", "8")) == 0  # uninterrupted
    original = interrupt_at_epoch(monkeypatch, 0)  # killed after the memory build, before any in-step checkpoint
    assert run.main(step1(tmp_path / "b", "--mem_size", "8")) == 130
    monkeypatch.setattr("train.train_one_epoch", original)
    assert not list((tmp_path / "b" / "ckpt").glob("*.partial.pth"))
    assert run.main(step1(tmp_path / "b", "--mem_size", "8")) == 0  # memory read back, not rebuilt
    a = torch.load(tmp_path / "a" / "ckpt" / "15-1-voc_M_1.pth", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "b" / "ckpt" / "15-1-voc_M_1.pth", weights_only=True)["model_state"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    capsys.readouterr()
    assert run.main(step1(tmp_path / "b", "--mem_size", "4", "--overwrite")) == 0
    assert "rebuilding the memory" in capsys.readouterr().out
    memory = json.loads((tmp_path / "b" / "ckpt" / "15-1-voc_M_memory.json").read_text())["step_1"]
    assert memory["built_with"]["mem_size"] == 4 and len(memory["memory_list"]) == 4
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "15-1-voc_M_1.pth", weights_only=True)
    assert json.loads(ckpt["config"])["mem_size"] == 4
    assert np.isfinite([v.float().sum().item() for v in ckpt["model_state"].values()]).all()
