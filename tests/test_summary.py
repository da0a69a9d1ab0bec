"""pcl_hpc.summary: results CSV, summary.md and the label-efficiency plot, against answers worked out by hand."""

import math
import random as pyrandom
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from pcl_hpc.errors import UserError
from pcl_hpc.summary import plot_label_efficiency, read_results_csv, summarize, write_results_csv

CLASSES = ["a", "white_matter"]
# Cell means (mean over the 2 volumes) of the baseline, by M and (fold, seed) -> mean 0.63 / 0.73, std 0.0258.
RANDOM_CELL = {1: {(0, 0): 0.60, (0, 1): 0.62, (1, 0): 0.64, (1, 1): 0.66},
               2: {(0, 0): 0.70, (0, 1): 0.72, (1, 0): 0.74, (1, 1): 0.76}}
PCL_OFFSET = 0.05  # pcl = random + 0.05 on every volume
CLASS_SPREAD = {"random": 0.1, "pcl": 0.2}  # dice_a = mean + spread, dice_white_matter = mean - spread
# Per-volume HD95 (mm): v0, v1 -> cell mean 11 (random) / 8 (pcl); some set to None below.
HD = {"random": (10.0, 12.0), "pcl": (7.0, 9.0)}
HD_NONE = {("pcl", 1, 0, 0, "v0"), ("pcl", 1, 0, 0, "v1"),  # that whole cell has no HD95: left out
           ("random", 2, 1, 1, "v1")}                        # that cell's HD95 is v0's alone: 10


def make_rows(offsets=None):
    """2 encoders × M=1,2 × 2 folds × 2 seeds × 2 volumes (v0 = cell mean − 0.01, v1 = cell mean + 0.01).

    ``offsets``: extra encoders, name -> {(M, fold, seed): Dice offset from random} (spread 0.1, HD95 of random)."""
    encoders = {"random": None, "pcl": None, **(offsets or {})}
    rows = []
    for enc, offs in encoders.items():
        for m, cells in RANDOM_CELL.items():
            for (fold, seed), base in cells.items():
                off = PCL_OFFSET if enc == "pcl" else 0.0 if offs is None else offs[(m, fold, seed)]
                spread = CLASS_SPREAD.get(enc, 0.1)
                for i, vol in enumerate(("v0", "v1")):
                    dice = base + off + (-0.01 if i == 0 else 0.01)
                    hd = None if (enc, m, fold, seed, vol) in HD_NONE else HD.get(enc, HD["random"])[i]
                    rows.append({"cell": f"{enc}-M{m}-f{fold}-s{seed}", "encoder": enc, "labeled": m, "fold": fold,
                                 "seed": seed, "volume": vol, "dice_mean": dice,
                                 "dice_a": dice + spread, "dice_white_matter": dice - spread,
                                 "hd95_mm_mean": hd, "hd95_mm_a": hd, "hd95_mm_white_matter": None if hd is None else hd + 1})
    return rows


def section(text, title):
    """The lines of the markdown section starting at heading ``title`` up to the next heading of any level."""
    lines = text.splitlines()
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return [ln for ln in lines[start + 1:end] if ln]


def table_row(lines, method):
    return next(ln for ln in lines if ln.startswith(f"| {method} |"))


# ------------------------------------------------------------------------------------------- CSV

def test_csv_round_trip_keeps_types_and_order(tmp_path):
    rows = make_rows()
    rows[0]["dice_a"] = 0.1 + 0.2  # 0.30000000000000004 must come back bit-exact
    rows[1]["dice_mean"] = np.float64(0.5)  # numpy scalars are written as plain floats
    rows[2]["labeled"] = np.int64(1)
    path = write_results_csv(rows, tmp_path / "results.csv", CLASSES)
    header = path.read_text().splitlines()[0]
    assert header == ("cell,encoder,mode,labeled,fold,seed,volume,dice_mean,dice_a,dice_white_matter,"
                      "hd95_mm_mean,hd95_mm_a,hd95_mm_white_matter")
    back, names = read_results_csv(path)
    assert names == CLASSES
    assert back == [{"mode": "full", **{k: (float(v) if k == "dice_mean" else int(v) if k == "labeled" else v)
                                        for k, v in r.items()}} for r in rows]  # a row without a mode is full
    assert back[0]["dice_a"] == 0.1 + 0.2
    for r in back:
        assert type(r["labeled"]) is int and type(r["fold"]) is int and type(r["seed"]) is int
        assert type(r["dice_mean"]) is float and isinstance(r["cell"], str)
        assert r["hd95_mm_mean"] is None or type(r["hd95_mm_mean"]) is float
    assert sum(r["hd95_mm_mean"] is None for r in back) == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "results.csv"]  # no temporary left behind


def test_csv_of_before_modes_reads_as_mode_full(tmp_path):
    rows = [{**r, "mode": "frozen" if r["encoder"] == "pcl" else "full"} for r in make_rows()]
    path = write_results_csv(rows, tmp_path / "r.csv", CLASSES)
    back, _ = read_results_csv(path)
    assert [r["mode"] for r in back] == [r["mode"] for r in rows]
    lines = [ln.split(",") for ln in path.read_text().splitlines()]
    assert lines[0][2] == "mode"
    path.write_text("\n".join(",".join(ln[:2] + ln[3:]) for ln in lines) + "\n")  # the CSV without its mode column
    old, names = read_results_csv(path)
    assert names == CLASSES and {r["mode"] for r in old} == {"full"}
    assert old == [{**r, "mode": "full"} for r in back]


def test_csv_rejects_rows_that_do_not_fit_the_classes(tmp_path):
    with pytest.raises(ValueError, match="missing columns.*dice_b"):
        write_results_csv(make_rows(), tmp_path / "r.csv", ["a", "b"])
    rows = make_rows()
    rows[3]["extra"] = 1
    with pytest.raises(ValueError, match="row 3.*unexpected columns.*extra"):
        write_results_csv(rows, tmp_path / "r.csv", CLASSES)
    rows = make_rows()
    rows[0]["fold"] = 1.5
    with pytest.raises(ValueError, match="row 0.*fold"):
        write_results_csv(rows, tmp_path / "r.csv", CLASSES)
    assert not (tmp_path / "r.csv").exists()


def test_read_csv_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_results_csv(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="bad.csv"):
        read_results_csv(bad)
    path = write_results_csv(make_rows(), tmp_path / "ok.csv", CLASSES)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",1,", ",x,", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="ok.csv line 3: column 'labeled'"):
        read_results_csv(path)


# --------------------------------------------------------------------------------------- summary

def test_dice_table_means_stds_n_and_bold():
    text = summarize(make_rows(), CLASSES)
    std = math.sqrt((0.03 ** 2 + 0.01 ** 2 + 0.01 ** 2 + 0.03 ** 2) / 3)  # 0.0258 -> 0.026
    assert f"{std:.3f}" == "0.026"
    t1 = section(text, "## Table 1: Dice, overall (mean over classes)")
    assert t1[0] == "| method | M=1 | M=2 |"
    assert t1[2] == "| random | 0.630 ± 0.026 (n=4) | 0.730 ± 0.026 (n=4) |"  # baseline first
    assert t1[3] == "| pcl | **0.680 ± 0.026** (n=4) | **0.780 ± 0.026** (n=4) |"
    # Per class: pcl wins class a (+0.05 + 0.1), random wins white_matter (pcl is -0.2 + 0.05 < -0.1).
    a = section(text, "### a")
    assert table_row(a, "random") == "| random | 0.730 ± 0.026 (n=4) | 0.830 ± 0.026 (n=4) |"
    assert table_row(a, "pcl") == "| pcl | **0.880 ± 0.026** (n=4) | **0.980 ± 0.026** (n=4) |"
    wm = section(text, "### white_matter")
    assert table_row(wm, "random") == "| random | **0.530 ± 0.026** (n=4) | **0.630 ± 0.026** (n=4) |"
    assert table_row(wm, "pcl") == "| pcl | 0.480 ± 0.026 (n=4) | 0.580 ± 0.026 (n=4) |"
    assert "Cells: 16 (random 8, pcl 8) from 32 volume rows; classes: a, white_matter." in text


def test_hd95_table_leaves_out_missing():
    t2 = section(summarize(make_rows(), CLASSES), "## Table 2: HD95 (mm), overall")
    # random M=2: cells 11, 11, 11 and 10 (v1 missing) -> 10.75 ± 0.50; pcl M=1: one cell has none -> n=3.
    assert table_row(t2, "random") == "| random | 11.00 ± 0.00 (n=4) | 10.75 ± 0.50 (n=4) |"
    assert table_row(t2, "pcl") == "| pcl | **8.00 ± 0.00** (n=3) | **8.00 ± 0.00** (n=4) |"  # lowest is best
    note = t2[-1]
    assert "left out of the mean" in note
    assert "Volumes without HD95: 3 of 32; cells without HD95: 1 of 16 (pcl M=1 fold=0 seed=0)." in note


def test_paired_comparison_known_answers():
    text = summarize(make_rows(), CLASSES)
    paired = section(text, "## Paired comparison against random (Dice, overall)")
    # pcl - random is 0.05 on every matched cell: mean 0.050, CI [0.050, 0.050]; all 4 (8) pairs positive.
    diffs = {m: [RANDOM_CELL[m][k] + PCL_OFFSET - RANDOM_CELL[m][k] for k in sorted(RANDOM_CELL[m])] for m in (1, 2)}
    p1 = stats.wilcoxon(diffs[1]).pvalue
    p_all = stats.wilcoxon(diffs[1] + diffs[2]).pvalue
    assert (f"{p1:.3f}", f"{p_all:.3f}") == ("0.125", "0.008")  # exact: 2/16 and 2/256
    assert f"| pcl | 1 | 4 | +0.050 | [+0.050, +0.050] | {p1:.3f} |" in paired
    assert f"| pcl | 2 | 4 | +0.050 | [+0.050, +0.050] | {p1:.3f} |" in paired
    assert f"| pcl | all | 8 | +0.050 | [+0.050, +0.050] | {p_all:.3f} |" in paired


def test_paired_mixed_signs_ci_and_wilcoxon_and_zero_pairs():
    gcl = {(1, 0, 0): 0.03, (1, 0, 1): -0.01, (1, 1, 0): 0.02, (1, 1, 1): 0.06,
           (2, 0, 0): -0.02, (2, 0, 1): 0.04, (2, 1, 0): 0.01, (2, 1, 1): 0.07}
    same = {k: 0.0 for k in gcl}  # identical to random: no non-zero pair
    one = {**same, (2, 1, 1): 0.02}  # a single non-zero pair
    text = summarize(make_rows({"gcl": gcl, "same": same, "one": one}), CLASSES)
    t1 = section(text, "## Table 1: Dice, overall (mean over classes)")
    assert [ln.split(" |")[0] for ln in t1[2:]] == ["| random", "| gcl", "| one", "| pcl", "| same"]
    paired = section(text, "## Paired comparison against random (Dice, overall)")
    for m, keys in ((1, [k for k in sorted(gcl) if k[0] == 1]), (2, [k for k in sorted(gcl) if k[0] == 2]),
                    ("all", sorted(gcl))):
        d = np.array([gcl[k] for k in keys])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        p = stats.wilcoxon(d).pvalue
        row = f"| gcl | {m} | {len(d)} | {d.mean():+.3f} | [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] | {p:.3f} |"
        assert row in paired, (row, paired)
    assert "| gcl | 1 | 4 | +0.025 | [-0.021, +0.071] | 0.250 |" in paired  # the numbers, once by hand
    assert "| same | all | 8 | +0.000 | [+0.000, +0.000] | n/a |" in paired
    d = np.array([0.0] * 7 + [0.02])
    half = stats.t.ppf(0.975, 7) * d.std(ddof=1) / math.sqrt(8)
    assert f"| one | all | 8 | {d.mean():+.3f} | [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] | n/a |" in paired
    assert "| one | 2 | 4 | +0.005 | [-0.011, +0.021] | n/a |" in paired


def test_unmatched_cells_and_missing_m():
    rows = [r for r in make_rows() if not (r["encoder"] == "random" and r["labeled"] == 2 and r["seed"] == 1)]
    text = summarize(rows, CLASSES)
    paired = section(text, "## Paired comparison against random (Dice, overall)")
    assert "| pcl | 2 | 2 | +0.050 | [+0.050, +0.050] | 0.500 |" in paired  # 2 pairs, both positive: p = 2/4
    assert "Cells without a matching random cell (left out): pcl M=2 fold=0 seed=1, pcl M=2 fold=1 seed=1." in paired
    rows = [r for r in make_rows() if not (r["encoder"] == "pcl" and r["labeled"] == 1)]
    t1 = section(summarize(rows, CLASSES), "## Table 1: Dice, overall (mean over classes)")
    assert table_row(t1, "pcl") == "| pcl | – | **0.780 ± 0.026** (n=4) |"
    assert table_row(t1, "random") == "| random | **0.630 ± 0.026** (n=4) | 0.730 ± 0.026 (n=4) |"


def frozen_rows(offsets):
    """make_rows() again as mode frozen cells, each encoder's Dice moved by ``offsets[encoder]``."""
    moved = ("dice_mean", "dice_a", "dice_white_matter")
    return [{**r, "cell": r["cell"] + "-frozen", "mode": "frozen", **{k: r[k] + offsets[r["encoder"]] for k in moved}}
            for r in make_rows()]


def test_modes_get_their_own_tables_and_pairs():
    full = [{**r, "mode": "full"} for r in make_rows()]
    text = summarize(full + frozen_rows({"random": -0.10, "pcl": 0.10}), CLASSES)
    assert text.splitlines()[2].startswith("Averaged: a cell (encoder × mode × M labeled patients × fold × seed)")
    assert "Cells: 32 (random 8, pcl 8, random (frozen) 8, pcl (frozen) 8)" in text
    assert "each method against random in the same mode" in text
    # full: as without modes (pcl − random = +0.05). frozen: random − 0.10 and pcl + 0.10 = random + 0.15, so
    # +0.25 against the frozen random cell (against the full one it would be +0.15: no pair crosses modes).
    t1 = section(text, "## Table 1: Dice, overall (mean over classes), mode full")
    assert table_row(t1, "pcl") == "| pcl | **0.680 ± 0.026** (n=4) | **0.780 ± 0.026** (n=4) |"
    t1 = section(text, "## Table 1: Dice, overall (mean over classes), mode frozen")
    assert table_row(t1, "random") == "| random | 0.530 ± 0.026 (n=4) | 0.630 ± 0.026 (n=4) |"
    assert table_row(t1, "pcl") == "| pcl | **0.780 ± 0.026** (n=4) | **0.880 ± 0.026** (n=4) |"
    full_pairs = section(text, "## Paired comparison against random (Dice, overall), mode full")
    assert "| pcl | all | 8 | +0.050 | [+0.050, +0.050] | 0.008 |" in full_pairs
    frozen_pairs = section(text, "## Paired comparison against random (Dice, overall), mode frozen")
    assert "| pcl | all | 8 | +0.250 | [+0.250, +0.250] | 0.008 |" in frozen_pairs
    assert text.count("## Dice per class") == 2 and "## Table 1: Dice, overall (mean over classes)\n" not in text
    # A mode without its baseline skips its pairs; the other mode's stay.
    text = summarize(full + [r for r in frozen_rows({"random": 0, "pcl": 0}) if r["encoder"] == "pcl"], CLASSES)
    assert section(text, "## Paired comparison against random (Dice, overall), mode frozen") == [
        "Baseline random is absent from the rows (methods: pcl): paired comparison skipped."]
    full_pairs = section(text, "## Paired comparison against random (Dice, overall), mode full")
    assert "| pcl | all | 8 | +0.050 | [+0.050, +0.050] | 0.008 |" in full_pairs


def test_baseline_absent():
    rows = [r for r in make_rows() if r["encoder"] == "pcl"]
    text = summarize(rows, CLASSES)
    assert "Baseline random is absent from the rows (methods: pcl): paired comparison skipped." in text
    assert "| method | M | n pairs |" not in text
    assert "| pcl | **0.680 ± 0.026** (n=4) | **0.780 ± 0.026** (n=4) |" in text
    text = summarize(make_rows(), CLASSES, baseline="simclr")
    assert "Baseline simclr is absent from the rows (methods: pcl, random): paired comparison skipped." in text


def test_summary_is_deterministic(tmp_path):
    rows = make_rows({"gcl": {(m, f, s): 0.01 * (f + s) for m in (1, 2) for f in (0, 1) for s in (0, 1)}})
    text = summarize(rows, CLASSES)
    shuffled = list(rows)
    pyrandom.Random(0).shuffle(shuffled)
    assert summarize(shuffled, CLASSES) == text
    back, names = read_results_csv(write_results_csv(shuffled, tmp_path / "r.csv", CLASSES))
    assert summarize(back, names) == text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_summary_rejects_inconsistent_rows():
    rows = make_rows()
    rows.append(dict(rows[0]))
    with pytest.raises(ValueError, match="volume.*more than once"):
        summarize(rows, CLASSES)
    rows = make_rows()
    rows[1]["seed"] = 7
    with pytest.raises(ValueError, match="mixes"):
        summarize(rows, CLASSES)
    with pytest.raises(ValueError, match="no rows"):
        summarize([], CLASSES)
    with pytest.raises(ValueError, match="dice_b"):
        summarize(make_rows(), ["a", "b"])


def test_example_summary(capsys):
    """The whole text for a small case, so a format change is a visible diff."""
    rows = [r for r in make_rows() if r["labeled"] == 1]
    text = summarize(rows, CLASSES)
    print(text)
    assert text.startswith("# Label-efficiency summary\n\nAveraged: a cell (encoder × M labeled patients × fold × seed)")


# ------------------------------------------------------------------------------------------ plot

def test_plot_is_a_640x480_png(tmp_path):
    import matplotlib.image

    path = plot_label_efficiency(make_rows(), tmp_path / "label_efficiency.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (480, 640) and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0  # something was drawn
    assert [p.name for p in tmp_path.iterdir()] == ["label_efficiency.png"]
    again = plot_label_efficiency(make_rows(), tmp_path / "again.png")
    assert again.read_bytes() == path.read_bytes()  # no timestamp in the PNG
    # No baseline, a single M: still a plot.
    one = [r for r in make_rows() if r["encoder"] == "pcl" and r["labeled"] == 2]
    img = matplotlib.image.imread(plot_label_efficiency(one, tmp_path / "one.png"))
    assert img.shape[:2] == (480, 640)
    # Two modes: a line style each, the same colour per method; a mode without some method is drawn too.
    modes = make_rows() + [r for r in frozen_rows({"random": -0.1, "pcl": 0.1}) if r["encoder"] == "pcl"]
    both = plot_label_efficiency(modes, tmp_path / "modes.png")
    assert both.read_bytes() != path.read_bytes()
    assert matplotlib.image.imread(both).shape[:2] == (480, 640)


def test_paired_plot_has_a_panel_per_mode_and_nothing_without_a_baseline(tmp_path):
    import matplotlib.image

    from pcl_hpc.summary import plot_paired_differences

    path = plot_paired_differences(make_rows(), tmp_path / "paired.png")
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (480, 640) and img[..., :3].std() > 0
    assert plot_paired_differences(make_rows(), tmp_path / "again.png").read_bytes() == path.read_bytes()
    modes = make_rows() + frozen_rows({"random": -0.1, "pcl": 0.1})
    assert plot_paired_differences(modes, tmp_path / "modes.png").read_bytes() != path.read_bytes()
    only_pcl = [r for r in make_rows() if r["encoder"] == "pcl"]
    only_random = [r for r in make_rows() if r["encoder"] == "random"]
    for rows in (only_pcl, only_random):
        assert plot_paired_differences(rows, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_import_is_light():
    code = ("import sys, pcl_hpc.summary; "
            "print(sorted(m for m in ('matplotlib', 'scipy', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
