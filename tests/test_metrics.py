"""pcl_hpc.metrics: Dice and HD95 with known answers, the absent-class conventions, and the reference."""

import numpy as np
import pytest

from pcl_hpc import metrics
from pcl_hpc.metrics import hd95, surface_distances, volume_metrics

SPACING = (2.5, 1.0, 0.5)  # (z, y, x) mm: deliberately anisotropic


def cube(shape, corner, size=3, value=1, out=None):
    out = np.zeros(shape, np.uint8) if out is None else out
    z, y, x = corner
    out[z:z + size, y:y + size, x:x + size] = value
    return out


def blobs(shape, classes, seed):
    """A random multi-class label map of smoothed-noise blobs (some touch the array border)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    for c in range(1, classes + 1):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        out[field > np.quantile(field, 0.9)] = c
    return out


def test_identical_masks_give_dice_one_and_hd95_zero():
    label = cube((12, 12, 12), (2, 3, 4), size=5) + cube((12, 12, 12), (8, 8, 8), size=3, value=2)
    got = volume_metrics(label, label.copy(), SPACING, 2)
    assert got == {"dice": [1.0, 1.0], "hd95_mm": [0.0, 0.0]}


@pytest.mark.parametrize("axis,expected_mm", [(0, 4 * 2.5), (1, 4 * 1.0), (2, 4 * 0.5)])
def test_disjoint_cubes_hd95_is_the_offset_in_mm_along_that_axis(axis, expected_mm):
    # Two 3-voxel cubes 4 voxels apart along one axis. Of a cube's 26 surface voxels, the 9 on the
    # far face are 4 voxels from the other cube's near face (straight along the axis), the 8 of the
    # middle ring 3 and the near face's 9 two: the 95th percentile is the far face's 4 voxels.
    shape = (16, 16, 16)
    offset = [0, 0, 0]
    offset[axis] = 4
    label = cube(shape, (2, 2, 2))
    pred = cube(shape, tuple(2 + o for o in offset))
    got = volume_metrics(pred, label, SPACING, 1)
    assert got["dice"] == [0.0]
    assert got["hd95_mm"][0] == pytest.approx(expected_mm)


def test_same_voxel_offset_along_z_and_x_differs_in_mm():
    shape = (16, 16, 16)
    label = cube(shape, (2, 2, 2), size=4)
    along_z = volume_metrics(cube(shape, (3, 2, 2), size=4), label, SPACING, 1)["hd95_mm"][0]
    along_x = volume_metrics(cube(shape, (2, 2, 3), size=4), label, SPACING, 1)["hd95_mm"][0]
    assert along_z == pytest.approx(2.5) and along_x == pytest.approx(0.5)
    iso = volume_metrics(cube(shape, (3, 2, 2), size=4), label, (1.0, 1.0, 1.0), 1)["hd95_mm"][0]
    assert iso == pytest.approx(1.0)


def test_single_voxels_hd95_is_their_euclidean_distance():
    label = np.zeros((8, 8, 8), np.uint8)
    pred = label.copy()
    label[1, 2, 3] = 1
    pred[2, 4, 6] = 1  # offsets (1, 2, 3) voxels
    expected = np.sqrt((1 * 2.5) ** 2 + (2 * 1.0) ** 2 + (3 * 0.5) ** 2)
    assert volume_metrics(pred, label, SPACING, 1)["hd95_mm"][0] == pytest.approx(expected)


def test_hd95_ignores_a_rare_outlier_that_the_max_would_not():
    label = cube((20, 20, 20), (2, 2, 2), size=10)  # 488 surface voxels
    pred = label.copy()
    pred[17, 17, 17] = 1  # one far false-positive voxel
    d_pt, _ = surface_distances(pred == 1, label == 1, SPACING)
    assert d_pt.max() > 10
    got = volume_metrics(pred, label, SPACING, 1)
    assert got["hd95_mm"] == [0.0] and 0.99 < got["dice"][0] < 1.0


def test_class_absent_from_both_gives_dice_one_and_hd95_zero():
    label = cube((10, 10, 10), (1, 1, 1))
    got = volume_metrics(label, label, SPACING, 3)  # classes 2 and 3 are nowhere
    assert got == {"dice": [1.0, 1.0, 1.0], "hd95_mm": [0.0, 0.0, 0.0]}
    empty = np.zeros((4, 5, 6), np.uint8)
    assert volume_metrics(empty, empty, SPACING, 2) == {"dice": [1.0, 1.0], "hd95_mm": [0.0, 0.0]}


def test_class_absent_from_exactly_one_gives_dice_zero_and_hd95_none():
    shape = (10, 10, 10)
    label = cube(shape, (1, 1, 1)) + cube(shape, (5, 5, 5), value=2)
    only_class_1 = cube(shape, (1, 1, 1))
    assert volume_metrics(only_class_1, label, SPACING, 2) == {"dice": [1.0, 0.0], "hd95_mm": [0.0, None]}
    assert volume_metrics(label, only_class_1, SPACING, 2) == {"dice": [1.0, 0.0], "hd95_mm": [0.0, None]}
    assert hd95(np.zeros(shape, bool), label == 2, SPACING) is None


def test_classes_above_num_classes_are_ignored_and_dice_matches_by_hand():
    shape = (6, 6, 6)
    label = np.zeros(shape, np.uint8)
    pred = label.copy()
    label[0, 0, :4] = 1  # 4 voxels
    pred[0, 0, 2:4] = 1  # 2 voxels, both inside
    pred[5, 5, 5] = 7
    assert volume_metrics(pred, label, SPACING, 1)["dice"] == [pytest.approx(2 * 2 / 6)]


def test_masks_filling_the_volume_and_touching_its_border():
    full = np.ones((5, 6, 7), np.uint8)
    assert volume_metrics(full, full, SPACING, 1) == {"dice": [1.0], "hd95_mm": [0.0]}
    # A (5, 2, 2) bar: every voxel touches the array border, so every voxel is surface (outside the
    # array counts as background). Dropping the z=0 slice: pred's 16 voxels all lie on label's
    # surface (distance 0), while label's 4 voxels at z=0 are one z step (2.5 mm) from pred: 20% of
    # label's surface, so the 95th percentile is 2.5 mm.
    bar = np.ones((5, 2, 2), np.uint8)
    shorter = bar.copy()
    shorter[0] = 0
    d_pt, d_tp = surface_distances(shorter == 1, bar == 1, SPACING)
    assert d_pt.shape == (16,) and d_pt.max() == 0.0
    assert sorted(d_tp.tolist()) == [0.0] * 16 + [2.5] * 4
    assert volume_metrics(shorter, bar, SPACING, 1) == {"dice": [pytest.approx(32 / 36)], "hd95_mm": [2.5]}


def test_bad_inputs_are_value_errors():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        volume_metrics(a, np.zeros((4, 4, 5), np.uint8), SPACING, 1)
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(a, a, (1.0, 1.0), 1)
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(a, a, (1.0, 0.0, 1.0), 1)
    with pytest.raises(ValueError, match="method"):
        surface_distances(a == 0, a == 0, SPACING, method="fast")


def test_kdtree_edt_and_auto_methods_agree_on_random_blobs():
    label, pred = blobs((20, 40, 36), 3, seed=1), blobs((20, 40, 36), 3, seed=2)
    speckled = np.random.default_rng(0).integers(0, 4, label.shape).astype(np.uint8)  # dense surfaces
    for p in (pred, speckled):
        got = {m: volume_metrics(p, label, SPACING, 3, method=m) for m in metrics.METHODS}
        assert got["kdtree"]["dice"] == got["edt"]["dice"] == got["auto"]["dice"]
        np.testing.assert_allclose(got["kdtree"]["hd95_mm"], got["edt"]["hd95_mm"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(got["auto"]["hd95_mm"], got["edt"]["hd95_mm"], rtol=0, atol=1e-9)


def test_dice_per_class_is_the_same_dice():
    label, pred = blobs((8, 16, 16), 2, seed=3), blobs((8, 16, 16), 2, seed=4)
    assert metrics.dice_per_class(pred, label, 2) == volume_metrics(pred, label, SPACING, 2)["dice"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation notices inside its own code
@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_monai_the_reference(seed):
    """MONAI's compute_hausdorff_distance(percentile=95) has our definition: max of directed P95s."""
    pytest.importorskip("monai")
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    classes, shape = 3, (18, 40, 33)
    label = blobs(shape, classes, seed=10 + seed)
    pred = np.roll(label, 1, axis=2)
    pred[blobs(shape, classes, seed=20 + seed) == 2] = 2  # disagreements of every kind
    onehot = [torch.from_numpy(np.stack([a == c for c in range(classes + 1)])[None]) for a in (pred, label)]
    ref_hd = compute_hausdorff_distance(*onehot, include_background=False, percentile=95, spacing=SPACING)[0]
    ref_dice = compute_dice(*onehot, include_background=False)[0]
    got = volume_metrics(pred, label, SPACING, classes)
    np.testing.assert_allclose(got["hd95_mm"], ref_hd.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["dice"], ref_dice.numpy(), rtol=1e-5, atol=1e-6)


def sphere(shape, centre, radius, spacing):
    """A ball of ``radius`` mm around ``centre`` (voxel coordinates) on an anisotropic grid."""
    grid = np.indices(shape).astype(float)
    mm = [(g - c) * s for g, c, s in zip(grid, centre, spacing)]
    return (sum(m ** 2 for m in mm) <= radius ** 2).astype(np.uint8)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("axis,k", [(0, 2), (2, 3)])
def test_sphere_shifted_by_k_voxels_hd95_is_the_shift_in_mm(axis, k):
    """A ball shifted by k voxels along one axis: every surface point moves k * spacing mm, so the
    symmetric HD95 is that shift (to within a voxel's discretisation), and equals MONAI's."""
    shape, radius = (24, 40, 60), 9.0
    centre = np.array([12.0, 20.0, 28.0])
    label = sphere(shape, centre, radius, SPACING)
    moved = centre.copy()
    moved[axis] += k
    pred = sphere(shape, moved, radius, SPACING)
    shift_mm = k * SPACING[axis]
    got = volume_metrics(pred, label, SPACING, 1)
    assert got["hd95_mm"][0] == pytest.approx(shift_mm, abs=0.5 * max(SPACING))
    assert 0 < got["dice"][0] < 1
    monai = pytest.importorskip("monai.metrics")
    import torch

    onehot = [torch.from_numpy(np.stack([a == 0, a == 1])[None]) for a in (pred, label)]
    ref = monai.compute_hausdorff_distance(*onehot, include_background=False, percentile=95, spacing=SPACING)
    assert got["hd95_mm"][0] == pytest.approx(float(ref[0, 0]), rel=1e-5, abs=1e-4)
    assert got["dice"][0] == pytest.approx(float(monai.compute_dice(*onehot, include_background=False)[0, 0]), rel=1e-6)


def test_pooled_distances_agree_with_medpy():
    """medpy's hd95 pools both directed sets; the same distances pooled give its number."""
    pytest.importorskip("medpy")
    from medpy.metric.binary import hd95 as medpy_hd95

    label, pred = blobs((16, 30, 28), 1, seed=5), blobs((16, 30, 28), 1, seed=6)
    d_pt, d_tp = surface_distances(pred == 1, label == 1, SPACING)
    pooled = np.percentile(np.hstack([d_pt, d_tp]), 95)
    assert pooled == pytest.approx(medpy_hd95(pred == 1, label == 1, voxelspacing=SPACING), abs=1e-9)
    assert pooled <= volume_metrics(pred, label, SPACING, 1)["hd95_mm"][0] + 1e-12
