"""COCO (COCO-Stuff maps, objects only), VOC in COCO's label space, COCO-Stuff-10K, the cross-dataset COCO-to-VOC task
and WILSON's Wide-ResNet-38."""
from __future__ import annotations

import json
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.coco import COCOReader, COCOStuff10kReader, VOCasCOCOReader
from dataset.incremental import build_datasets, class_presence, scan_presence, source_roots
from dataset.inspect import main as inspect_main
from dataset.labelmaps import coco_category_to_train, coco_class_names, coco_things, voc_to_coco
from dataset.synthetic import generate
from dataset.tasks import get_task_labels
from experiment.config import parse_config
from experiment.ledger import find_run, flags as ledger_flags, load_ledger
from metrics.report import load_runs, render
from models import BACKBONES
from models.wide_resnet import load_wide_resnet
from tests.conftest import smoke_args
from utils.errors import UserError

UNUSED = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)  # weak-steps.md 1.3, from WILSON's dataset/coco.py
# weak-steps.md 1.3 (WILSON's data/make_cocovoc.py): VOC id -> COCO category id
VOC_TO_COCO = {0: 0, 1: 5, 2: 2, 3: 16, 4: 9, 5: 44, 6: 6, 7: 3, 8: 17, 9: 62, 10: 21, 11: 67, 12: 18, 13: 19, 14: 4,
               15: 1, 16: 64, 17: 20, 18: 63, 19: 7, 20: 72}
# WILSON's tasks.py, coco-voc/voc step 1, in COCO category ids
WILSON_STEP1 = [1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72]
COCO_SH_STEP0 = ("--num_workers 4 --sample_num 8 --name FTwide_bce --step 0 --lr 0.01 --dataset coco-voc --task voc "
                 "--batch_size 24 --epochs 30 --val_interval 2 --bce")


@pytest.fixture(scope="module")
def coco_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("cocovoc") / "data"
    generate(str(root), "coco-voc", size=24, n_train=100, n_val=80, seed=0)
    return str(root)


def test_label_maps_are_the_published_ones():
    things = coco_things()
    assert [raw for raw, *_ in things] == list(range(91)) and all(cat == raw + 1 for raw, cat, *_ in things)
    assert tuple(cat for _, cat, train, _ in things if train == 255) == UNUSED
    used = [(cat, train) for _, cat, train, _ in things if train != 255]
    assert [train for _, train in used] == list(range(1, 81)), "1..80 in COCO's order"
    assert voc_to_coco() == VOC_TO_COCO
    names = coco_class_names()
    assert len(names) == 81 and names[1] == "person" and names[80] == "toothbrush"
    pairs = {("aeroplane", "airplane"), ("motorbike", "motorcycle"), ("sofa", "couch"), ("tvmonitor", "tv"),
             ("diningtable", "dining table"), ("pottedplant", "potted plant")}
    from dataset.voc import CLASS_NAMES as VOC
    for voc, cat in VOC_TO_COCO.items():
        coco_name = names[coco_category_to_train()[cat]]
        assert VOC[voc] == coco_name or (VOC[voc], coco_name) in pairs or voc == 0


def test_coco_lut_things_stuff_unused_and_ignore():
    lut, valid = COCOReader.LABEL_LUT, COCOReader.RAW_VALID
    assert lut[0] == 1 and lut[89] == 80 and lut[255] == 255
    assert all(lut[v] == 0 for v in range(91, 182)), "stuff is background"
    assert all(lut[cat - 1] == 255 for cat in UNUSED), "unused ids are ignored, not background"
    assert not valid[182:255].any() and valid[:182].all() and valid[255]


def _write_pair(folder, stem, label):
    for sub in ("images/val2017", "annotations/val2017", "images/train2017", "annotations/train2017"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    Image.fromarray(np.zeros(label.shape + (3,), np.uint8)).save(os.path.join(folder, "images/val2017", stem + ".jpg"))
    Image.fromarray(label).save(os.path.join(folder, "annotations/val2017", stem + ".png"))


def test_a_label_outside_the_map_is_a_one_line_error_naming_file_and_id(tmp_path):
    label = np.full((8, 8), 95, np.uint8)
    label[0, 0] = 200
    _write_pair(tmp_path / "coco", "000000000001", label)
    reader = COCOReader(str(tmp_path), "val")
    for call in (lambda: reader.load(0), lambda: class_presence(reader)):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert "000000000001.png" in message and "[200]" in message and "\n" not in message


def test_synthetic_coco_unused_ids_read_as_ignored(coco_voc):
    reader = COCOReader(coco_voc, "train")
    raw = np.asarray(Image.open(reader.samples[0][1]))
    unused_raw = [cat - 1 for cat in UNUSED]
    patch = np.isin(raw, unused_raw)
    assert patch.any(), "the fuzz case is written"
    assert (raw >= 91).any() and (raw < 91).any(), "stuff and things on disk, raw COCO-Stuff values"
    _, label = reader.load(0)
    label = np.asarray(label)
    assert (label[patch] == 255).all()
    assert set(np.unique(label)) <= set(range(81)) | {255}


def test_coco_voc_step0_holds_no_voc_pixel_and_step1_is_in_coco_ids(coco_voc, tmp_path):
    voc_ids = set(coco_category_to_train()[c] for c in WILSON_STEP1)
    assert set(get_task_labels("coco-voc", "voc", 1)[0]) == voc_ids
    common = dict(dataset="coco-voc", root=coco_voc, task="voc", crop_size=24, cache_root=str(tmp_path))
    for overlap in (False,):  # the task's protocol (validate_run refuses --overlap)
        train0, _, test0 = build_datasets(step=0, overlap=overlap, **common)
        assert isinstance(train0.reader, COCOReader) and isinstance(test0.reader, COCOReader)
        assert len(train0) > 0
        for i in train0.idxs:  # the labels as read (before the step's masking)
            present = set(np.unique(np.asarray(train0.reader.load(int(i))[1]))) - {255}
            assert not present & voc_ids, "no step-0 training image holds a VOC class"
        kept = set(train0.idxs.tolist())
        holding = {i for i in range(len(train0.reader)) if set(np.unique(np.asarray(train0.reader.load(i)[1])))
                   & voc_ids}
        assert holding and not kept & holding
    train1, _, _ = build_datasets(step=1, overlap=False, **common)
    assert isinstance(train1.reader, VOCasCOCOReader) and len(train1) == len(train1.reader), "all VOC images"
    for i in range(len(train1.reader)):
        present = set(np.unique(np.asarray(train1.reader.load(i)[1])))
        assert present <= voc_ids | {0, 255} and present & voc_ids


def test_data_roots_name_the_sources(coco_voc, tmp_path):
    roots = source_roots("coco-voc", "elsewhere", [("coco", os.path.join(coco_voc, "coco"))])
    assert roots == {"coco": os.path.join(coco_voc, "coco"), "voc": "elsewhere"}
    with pytest.raises(UserError, match="does not read"):
        source_roots("coco-voc", coco_voc, [("ade", coco_voc)])


def test_parallel_presence_scan_equals_the_sequential_one(coco_voc, monkeypatch):
    import dataset.incremental as incremental
    reader = COCOReader(coco_voc, "train")
    sequential = scan_presence(reader, threads=1)
    assert np.array_equal(scan_presence(reader, threads=2), sequential)
    monkeypatch.setattr(incremental, "PARALLEL_FROM", 10)  # the default: a pool from this many labels on
    assert np.array_equal(scan_presence(reader), sequential)


def test_coco_stuff_10k_reader(tmp_path):
    root = generate(str(tmp_path / "coco_stuff_10k"), "coco_stuff_10k", size=16, n_train=171, n_val=171, seed=0)["root"]
    train, val = COCOStuff10kReader(root, "train"), COCOStuff10kReader(str(tmp_path), "val")
    assert len(train) == 171 and "/test/" in val.samples[0][0].replace(os.sep, "/")
    presence = class_presence(train)
    assert presence[:, :171].any(axis=0).all() and presence[:, 255].any()
    assert len(COCOStuff10kReader.CLASS_NAMES) == 171 and COCOStuff10kReader.CLASS_NAMES[0] == "person"


def test_inspect_prints_the_mapping(capsys):
    assert inspect_main(["coco-voc"]) == 0
    out = capsys.readouterr().out
    assert "90 -> 91 -> 255 (unused id: hair brush)" in out and "18 -> 63 -> 58 (sofa -> couch)" in out
    assert "step 0 trains on coco, step 1 trains on voc" in out


def test_wilson_coco_sh_step0_parses_with_the_forced_model():
    cfg = parse_config(shlex.split(COCO_SH_STEP0))
    assert (cfg.backbone, cfg.output_stride, cfg.crop_size, cfg.crop_size_val) == ("wider_resnet38_a2", 8, 448, 512)
    assert cfg.dataset == "coco-voc" and cfg.bce and cfg.batch_size == 24
    notes = []
    cfg = parse_config(shlex.split(COCO_SH_STEP0) + ["--backbone", "resnet101"], notes=notes)
    assert cfg.backbone == "resnet101" and any("recipe difference" in n for n in notes)


@pytest.mark.slow
def test_coco_voc_runs_both_steps_and_tests_both_datasets(coco_voc, tmp_path, capsys):
    import run
    extra = ["--crop_size_val", "24", "--output_stride", "16", "--lr", "0.01", "--method", "MiB", "--name",
             "MiB_disjoint"]
    assert run.main(smoke_args(coco_voc, tmp_path, dataset="coco-voc", task="voc", steps=(0, 1), extra=extra)) == 0
    results = tmp_path / "results"
    coco_csv, voc_csv = results / "test_coco-voc_voc_MiB_disjoint.csv", results / "test_coco-voc_voc_MiB_disjoint@voc.csv"
    assert [ln.split(",")[0] for ln in coco_csv.read_text().split()] == ["0", "1"]
    assert [ln.split(",")[0] for ln in voc_csv.read_text().split()] == ["1"], "VOC val tests from step 1 on"
    assert all(len(ln.split(",")) == 83 for ln in coco_csv.read_text().split())
    runs = load_runs([str(results)])
    table = render(runs)
    assert "voc @coco" in table and "voc @voc" in table
    # the ledger finds each test set's run and names the backbone that differs from WILSON's
    rows = {row.id: row for row in load_ledger()}
    for test in ("coco", "voc"):
        found = find_run(rows[f"wilson-t3-mib-{test}"], runs)
        assert found is not None and found.test_set == test
        assert "backbone resnet18≠wider_resnet38_a2" in ledger_flags(rows[f"wilson-t3-mib-{test}"], found)
    # evaluate.py tests the step's checkpoint on either source, with the numbers run.py wrote
    import evaluate
    args = smoke_args(coco_voc, tmp_path, dataset="coco-voc", task="voc", steps=(1,), extra=extra)
    for test, csv in (("voc", voc_csv), ("coco", coco_csv)):
        out = tmp_path / f"eval_{test}"
        assert evaluate.main(args + ["--test_source", test, "--out_dir", str(out), "--save_samples", "0"]) == 0
        written = float(csv.read_text().split()[-1].split(",")[-1])
        assert json.loads((out / "metrics.json").read_text())["mIoU"] == pytest.approx(written, abs=1e-9)
    assert evaluate.main(args + ["--test_source", "ade"]) == 2
    # a rerun skips both steps: every test set has its row
    ckpts = sorted((tmp_path / "ckpt").glob("*.pth"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    rows = voc_csv.read_text()
    assert run.main(smoke_args(coco_voc, tmp_path, dataset="coco-voc", task="voc", steps=(0, 1), extra=extra)) == 0
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps and voc_csv.read_text() == rows
    # killed between the two test sets: the missing row is written by the next call (the step is only tested)
    voc_csv.unlink()
    assert run.main(smoke_args(coco_voc, tmp_path, dataset="coco-voc", task="voc", steps=(0, 1), extra=extra)) == 0
    assert voc_csv.read_text() == rows and [p.stat().st_mtime_ns for p in ckpts] == stamps
    assert run.main(smoke_args(coco_voc, tmp_path / "ov", dataset="coco-voc", task="voc", extra=extra
                               + ["--overlap"])) == 2
    assert "drop --overlap" in capsys.readouterr().err


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_wide_resnet_shapes(stride):
    body = BACKBONES["wider_resnet16_a2"].build(norm_act="abn", output_stride=stride)
    out = body(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, 4096, 64 // stride, 64 // stride)
    assert out["mod2"].shape[1:] == (128, 32, 32) and out["mod3"].shape[1:] == (256, 16, 16)
    assert body.output_shape()["out"].stride == stride


def test_wide_resnet38_layout_matches_the_reference_file_names():
    body = BACKBONES["wider_resnet38_a2"].build(norm_act="iabn_sync", output_stride=8)
    keys = set(body.state_dict())
    blocks = {k.split(".")[0]: max(int(p.split(".")[1][5:]) for p in keys if p.startswith(k.split(".")[0] + ".block"))
              for k in keys if k.startswith("mod") and k[3] in "234567"}
    assert blocks == {"mod2": 3, "mod3": 3, "mod4": 6, "mod5": 3, "mod6": 1, "mod7": 1}
    assert {"mod1.conv1.weight", "mod4.block1.proj_conv.weight", "mod7.block1.convs.conv3.weight",
            "mod6.block1.convs.bn3.running_var", "bn_out.weight"} <= keys
    assert "mod4.block2.proj_conv.weight" not in keys
    assert BACKBONES["wider_resnet38_a2"].pretrained_file("iabn_sync") == "wide_resnet38_ipabn_lr_256.pth.tar"


def test_wide_resnet_loads_the_reference_file_layout(tmp_path):
    body = BACKBONES["wider_resnet16_a2"].build(norm_act="iabn_sync", output_stride=8)
    source = BACKBONES["wider_resnet16_a2"].build(norm_act="iabn_sync", output_stride=8)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["module.classifier.fc.weight"] = torch.zeros(1000, 4096)
    state["module.classifier.fc.bias"] = torch.zeros(1000)
    path = tmp_path / "wrn.pth.tar"
    torch.save({"state_dict": state}, path)
    load_wide_resnet(body, str(path))
    assert torch.equal(body.mod7.block1.convs.conv3.weight, source.mod7.block1.convs.conv3.weight)
    del state["module.bn_out.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(UserError, match="missing 1: bn_out.weight"):
        load_wide_resnet(body, str(path))


@pytest.mark.parametrize("method,needle", [("RCIL", "no block option"), ("SSUL", "no torchvision-layout variant")])
def test_methods_that_need_another_backbone_are_refused_in_one_line(synthetic_voc, tmp_path, capsys, method, needle):
    import run
    args = smoke_args(synthetic_voc, tmp_path, extra=["--backbone", "wider_resnet16_a2", "--method", method])
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and err[-1].startswith("error:")
