"""pcl_hpc.evaluate: slice-wise prediction, scoring with Dice + HD95, and its user errors."""

import json

import numpy as np
import pytest
import torch

from pcl_hpc import evaluate, inference
from pcl_hpc.data import store as zstore
from pcl_hpc.errors import UserError

SPACING = [2.0, 1.0, 0.5]  # (z, y, x) mm


class ThresholdNet(torch.nn.Module):
    """Logits (background 0, class 1 = x): argmax is class 1 exactly where the image is > 0.

    It records the input shapes, and insists (as the U-Net does) on H and W multiples of 16."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.classes, self.seen = classes, []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        assert x.shape[-2] % 16 == 0 and x.shape[-1] % 16 == 0
        rest = [torch.full_like(x, -1.0)] * (self.classes - 2)
        return torch.cat([torch.zeros_like(x), x, *rest], 1)


def test_predict_labels_pads_to_16_crops_back_and_batches():
    image = np.random.default_rng(0).standard_normal((5, 20, 37)).astype(np.float32)
    net = ThresholdNet()
    pred = inference.predict_labels(net, image, torch.device("cpu"), batch=2)
    assert pred.shape == (5, 20, 37) and pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, (image > 0).astype(np.uint8))
    assert net.seen == [(2, 1, 32, 48), (2, 1, 32, 48), (1, 1, 32, 48)]
    assert not net.training


def test_labels_are_the_argmax_of_the_probabilities_with_and_without_flips():
    image = np.random.default_rng(2).standard_normal((3, 20, 37)).astype(np.float32)
    net = ThresholdNet(classes=3)
    cpu = torch.device("cpu")
    for tta in (False, True):
        prob = inference.predict_probabilities(net, image, cpu, batch=2, tta=tta)
        assert prob.shape == (3, 20, 37, 3) and prob.dtype == np.float32
        np.testing.assert_allclose(prob.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(inference.predict_labels(net, image, cpu, tta=tta), prob.argmax(-1))
    assert net.seen[-3:] == [(3, 1, 32, 48)] * 3  # with flips: three passes over the batch (auto: 8 on a CPU)


def make_store(path, class_names=("background", "a", "b")):
    """A real two-volume store: 'lab' (label = 1 where the image > 0, plus a class-2 cube), 'unl' (no label)."""
    rng = np.random.default_rng(1)
    image = np.full((6, 20, 24), -1.0, np.float32)
    image[1:5, 4:12, 3:15] = rng.uniform(0.1, 1.0, (4, 8, 12))
    label = (image > 0).astype(np.uint8)
    label[2:4, 14:18, 16:20] = 2  # the threshold net never predicts class 2
    zstore.write_volume(path, "lab", image, label, {"spacing": SPACING, "positions": [(i + 1) / 6 for i in range(6)]})
    zstore.write_volume(path, "unl", image, None, {"spacing": SPACING, "positions": [(i + 1) / 6 for i in range(6)]})
    zstore.write_manifest(path, {"folds": 2}, class_names=list(class_names) if class_names else None)
    return str(path), image, label


def test_load_labeled_returns_image_label_and_spacing(tmp_path):
    store, image, label = make_store(tmp_path / "s.zarr")
    loaded = evaluate.load_labeled(store, ["lab"])
    vol = loaded["lab"]
    assert isinstance(vol, evaluate.LabeledVolume) and vol.spacing == tuple(SPACING)
    np.testing.assert_array_equal(vol.image, image)
    np.testing.assert_array_equal(vol.label, label)


def test_load_labeled_rejects_an_unlabeled_volume_by_name(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr")
    with pytest.raises(UserError) as err:
        evaluate.load_labeled(store, ["lab", "unl"])
    msg = str(err.value)
    assert "'unl'" in msg and store in msg and "no label" in msg and "labeled ones: lab" in msg
    assert "\n" not in msg


def test_load_labeled_rejects_a_volume_without_spacing(tmp_path):
    path = tmp_path / "s.zarr"
    zstore.write_volume(path, "v", np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8), {})
    zstore.write_manifest(path, {"folds": 1})
    with pytest.raises(UserError, match="'v'.*spacing"):
        evaluate.load_labeled(str(path), ["v"])


def test_score_volumes_reports_dice_and_hd95_with_missing_classes(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr")
    loaded = evaluate.load_labeled(store, ["lab"])
    result = evaluate.score_volumes(ThresholdNet(), loaded, 2, torch.device("cpu"))
    assert result["per_volume"] == {"lab": [1.0, 0.0]}  # class 1 found exactly; class 2 never predicted
    assert result["mean_per_class"] == [1.0, 0.0] and result["mean"] == 0.5
    assert result["hd95_mm_per_volume"] == {"lab": [0.0, None]}
    assert result["mean_hd95_mm_per_class"] == [0.0, None]
    json.dumps(result)  # finetune writes it as results.json
    assert evaluate.evaluate_volumes(ThresholdNet(), store, ["lab"], 2, torch.device("cpu")) == result


def test_score_volumes_means_hd95_over_the_volumes_where_it_is_present(tmp_path):
    store, image, label = make_store(tmp_path / "s.zarr")
    vol = evaluate.load_labeled(store, ["lab"])["lab"]
    moved = np.roll(vol.image, 1, axis=0)  # the prediction is one z step (2 mm) off
    loaded = {"same": vol, "moved": vol._replace(image=moved), "pair": (vol.image, vol.label)}
    result = evaluate.score_volumes(ThresholdNet(), loaded, 2, torch.device("cpu"))
    hd = result["hd95_mm_per_volume"]
    assert hd["same"] == [0.0, None] and hd["pair"] == [None, None]  # no spacing: no HD95
    assert hd["moved"][0] == pytest.approx(2.0) and hd["moved"][1] is None
    assert result["mean_hd95_mm_per_class"] == [pytest.approx(1.0), None]
    assert len(result["per_volume"]) == 3 and result["per_volume"]["pair"] == [1.0, 0.0]


def test_check_num_classes_against_the_manifest_and_the_labels(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr")
    loaded = evaluate.load_labeled(store, ["lab"])
    evaluate.check_num_classes(store, 2, loaded)
    with pytest.raises(UserError) as err:
        evaluate.check_num_classes(store, 1, loaded)
    assert str(err.value) == (f"finetune.num_classes=1 but store {store} has 2 foreground classes (a, b); "
                              "set finetune.num_classes=2")
    bare, _, _ = make_store(tmp_path / "bare.zarr", class_names=None)  # no class names: the labels decide
    with pytest.raises(UserError, match=r"num_classes=1 but volume 'lab' .* label values up to 2; set finetune.num_classes=2"):
        evaluate.check_num_classes(bare, 1, evaluate.load_labeled(bare, ["lab"]))
    with pytest.raises(UserError, match="'lab'.*up to 2"):
        evaluate.check_num_classes(bare, 1, ["lab"])  # volume ids: labels read from the store
    evaluate.check_num_classes(bare, 3, ["lab"])  # more classes than a volume shows is fine
    with pytest.raises(UserError, match=">= 1"):
        evaluate.check_num_classes(bare, 0)


def test_load_results_reads_results_and_names_bad_files(tmp_path):
    good = tmp_path / "results.json"
    row = {"init": "random", "labeled": 1, "mean_per_class": [0.5, 0.7], "mean": 0.6, "class_names": ["a", "b"]}
    good.write_text(json.dumps(row))
    assert evaluate.load_results([good]) == [row]
    missing = tmp_path / "missing.json"
    with pytest.raises(UserError, match=f"{missing} not found"):
        evaluate.load_results([good, missing])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError) as err:
        evaluate.load_results([broken])
    assert str(broken) in str(err.value) and "not valid JSON" in str(err.value) and "\n" not in str(err.value)
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    with pytest.raises(UserError, match=f"{other} is not a finetune results file"):
        evaluate.load_results([other])
    with pytest.raises(UserError, match="cannot be read|not found"):
        evaluate.load_results([tmp_path])  # a folder


def test_cli_evaluate_results_missing_file_is_one_line(tmp_path, capsys):
    from pcl_hpc.cli import main

    assert main(["evaluate", "--results", str(tmp_path / "missing.json")]) != 0
    err = capsys.readouterr().err
    assert "missing.json" in err and "Traceback" not in err


def test_format_table_dice_and_hd95():
    row = {"init": "pcl", "labeled": 2, "mean_per_class": [0.5, 1.0], "mean": 0.75,
           "mean_hd95_mm_per_class": [3.0, None]}
    dice = evaluate.format_table([row], ["a", "b"])
    assert dice.splitlines()[0] == "| init | M | a | b | mean |" and "| pcl | 2 | 0.500 | 1.000 | 0.750 |" in dice
    hd = evaluate.format_table([row], ["a", "b"], metric="hd95_mm")
    assert "| pcl | 2 | 3.00 | - | 3.00 |" in hd
    old = {k: v for k, v in row.items() if k != "mean_hd95_mm_per_class"}  # results.json from before HD95
    assert "| pcl | 2 | - | - | - |" in evaluate.format_table([old], ["a", "b"], metric="hd95_mm")


def test_score_volumes_can_skip_hd95(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr")
    result = evaluate.evaluate_volumes(ThresholdNet(), store, ["lab"], 2, torch.device("cpu"), hd95=False)
    assert result["per_volume"] == {"lab": [1.0, 0.0]}
    assert result["hd95_mm_per_volume"] == {"lab": [None, None]} and result["mean_hd95_mm_per_class"] == [None, None]
