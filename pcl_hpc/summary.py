"""Label-efficiency outputs: the per-volume results CSV, ``summary.md`` and the label-efficiency plot.

The sweep fine-tunes *cells* of encoder × mode × M (labeled patients) × fold × seed and scores every
test volume of each cell per class. One *row* is one test volume of one cell::

    cell, encoder, mode, labeled, fold, seed, volume,
    dice_mean, dice_<class>..., hd95_mm_mean, hd95_mm_<class>...

``mode`` is the cell's fine-tuning mode (``full``: encoder and decoder, ``frozen``: the decoder alone).
A row without it, and a CSV written before it existed (no ``mode`` column), is mode ``full``. Tables
and paired comparisons are made per mode (a method is paired with the baseline in the same mode); with
the single mode ``full`` the text is the one of before modes.

``hd95_mm_*`` may be None (a class in only one of prediction and label; the mean is None when no
class has a value). Everything here is a pure function of the rows: a cell's score is the mean over
its test volumes (HD95: over the volumes that have one), and the tables show mean ± sample std
(ddof=1) over the cells of each method × M, i.e. over folds × seeds.

Sums use :func:`math.fsum` and groups are sorted, so the same rows in any order give byte-identical
text. matplotlib is imported only inside the plot functions.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pcl_hpc.atomic import atomic_path
from pcl_hpc.errors import UserError

ID_COLUMNS = ("cell", "encoder", "mode", "labeled", "fold", "seed", "volume")
DEFAULT_MODE = "full"  # the mode of a row (or a CSV) without one
_REQUIRED = tuple(c for c in ID_COLUMNS if c != "mode") + ("dice_mean", "hd95_mm_mean")  # in every row
_MODE_TEXT = {"full": "encoder and decoder fine-tuned", "frozen": "only the decoder trained, on the frozen encoder"}
_LINE_STYLES = {"full": "-", "frozen": "--"}  # the plot's line per mode (another mode: dotted)
_STR_COLUMNS = ("cell", "encoder", "mode", "volume")
_INT_COLUMNS = ("labeled", "fold", "seed")
_ZERO_TOL = 1e-12  # a paired difference this small is a tie (zero) for the Wilcoxon test


# --------------------------------------------------------------------------------------------- CSV

def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(c) for c in class_names]
    bad = [c for c in names if not c or c == "mean"]
    if bad:
        raise ValueError(f"class names must be non-empty and not 'mean' (that column is the class mean), got {bad!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names!r}")
    return names


def result_columns(class_names: Sequence[str]) -> list[str]:
    """The CSV's fixed column order for these classes."""
    names = _check_class_names(class_names)
    return (list(ID_COLUMNS) + ["dice_mean"] + [f"dice_{c}" for c in names]
            + ["hd95_mm_mean"] + [f"hd95_mm_{c}" for c in names])


def _cell_text(key: str, value) -> str:
    if key in _STR_COLUMNS:
        if value is None:
            raise ValueError(f"column {key!r} is None")
        return str(value)
    if key in _INT_COLUMNS:
        if value is None or isinstance(value, bool) or int(value) != value:
            raise ValueError(f"column {key!r} must be an integer, got {value!r}")
        return str(int(value))
    if value is None:
        return ""
    return repr(float(value))  # shortest text that reads back to the same float (numpy scalars too)


def write_results_csv(rows: Iterable[Mapping], path: str | Path, class_names: Sequence[str]) -> Path:
    """Write the per-volume ``rows`` to ``path`` (atomically) in the fixed column order; None is an empty cell.

    Every row must have exactly the columns of :func:`result_columns`, but ``mode`` may be left out
    (:data:`DEFAULT_MODE`); a missing or unexpected key is a ValueError naming the row: it usually means
    ``class_names`` does not match the rows."""
    columns = result_columns(class_names)
    wanted = set(columns)
    lines = []
    for i, row in enumerate(rows):
        row = {"mode": DEFAULT_MODE, **row}
        keys = set(row)
        missing, extra = [c for c in columns if c not in keys], sorted(map(str, keys - wanted))
        if missing or extra:
            raise ValueError(f"row {i}: missing columns {missing}, unexpected columns {extra} "
                             f"(class names {list(class_names)})")
        try:
            lines.append([_cell_text(c, row[c]) for c in columns])
        except (TypeError, ValueError) as err:
            raise ValueError(f"row {i}: {err}") from None
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(lines)
    return path


def _classes_from_header(header: list[str]) -> list[str]:
    """The class names of a results CSV's header (one of before modes, without ``mode``, reads too)."""
    ids = [c for c in ID_COLUMNS if c != "mode" or "mode" in header]
    if header[:len(ids)] != ids or "dice_mean" not in header or "hd95_mm_mean" not in header:
        raise ValueError(f"header must start with {', '.join(ID_COLUMNS)}, dice_mean")
    d0, h0 = header.index("dice_mean"), header.index("hd95_mm_mean")
    names = [c[len("dice_"):] for c in header[d0 + 1:h0] if c.startswith("dice_")]
    expected = [c for c in result_columns(names) if c in ids or c not in ID_COLUMNS]
    if header != expected:
        raise ValueError("columns are not " + ", ".join(result_columns(names)))
    return names


def read_results_csv(path: str | Path) -> tuple[list[dict], list[str]]:
    """``(rows, class_names)`` from a CSV written by :func:`write_results_csv`: ints, floats and None back
    (``mode`` is :data:`DEFAULT_MODE` in a CSV of before modes).

    A missing file or one that is not such a CSV is a UserError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results CSV {path} not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"results CSV {path} cannot be read ({err.__class__.__name__}: {err})") from None
    if not table:
        raise UserError(f"results CSV {path} is empty (no header)")
    try:
        class_names = _classes_from_header(table[0])
    except ValueError as err:
        raise UserError(f"results CSV {path}: {err}") from None
    columns = table[0]
    rows = []
    for lineno, values in enumerate(table[1:], start=2):
        if len(values) != len(columns):
            raise UserError(f"results CSV {path} line {lineno}: {len(values)} fields, expected {len(columns)}")
        row = {}
        for key, text in zip(columns, values):
            try:
                if key in _STR_COLUMNS:
                    row[key] = text
                elif key in _INT_COLUMNS:
                    row[key] = int(text)
                else:
                    row[key] = None if text == "" else float(text)
            except ValueError:
                raise UserError(f"results CSV {path} line {lineno}: column {key!r} has {text!r}") from None
        rows.append({"mode": DEFAULT_MODE, **row})
    return rows, class_names


# ------------------------------------------------------------------------------------ aggregation

def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _std(values: Sequence[float]) -> float | None:
    """Sample std (ddof=1); None with fewer than 2 values."""
    if len(values) < 2:
        return None
    m = _mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def _ident(row: Mapping) -> tuple[str, str, int, int, int]:
    """(encoder, mode, M, fold, seed) of a row; a row without a mode is :data:`DEFAULT_MODE`."""
    return (str(row["encoder"]), str(row.get("mode") or DEFAULT_MODE), int(row["labeled"]), int(row["fold"]),
            int(row["seed"]))


def _cells(rows: Iterable[Mapping], class_names: Sequence[str]) -> list[dict]:
    """One dict per cell: ids, ``dice`` (mean over volumes), ``dice_<class>``, ``hd95`` (mean over the
    volumes that have one, or None), ``volumes`` and ``hd95_volumes`` (how many had an HD95)."""
    by_cell: dict[str, list[Mapping]] = {}
    for i, row in enumerate(rows):
        for key in (*_REQUIRED, *(f"dice_{c}" for c in class_names)):
            if key not in row:
                raise ValueError(f"row {i} has no {key!r} (class names {list(class_names)})")
        by_cell.setdefault(str(row["cell"]), []).append(row)
    cells, seen = [], {}
    for cid, members in by_cell.items():
        ident = _ident(members[0])
        for r in members:
            if _ident(r) != ident:
                raise ValueError(f"cell {cid!r} mixes encoder/mode/labeled/fold/seed: {ident} and {_ident(r)}")
        if ident in seen:
            raise ValueError(f"cells {seen[ident]!r} and {cid!r} are both encoder={ident[0]} mode={ident[1]} "
                             f"M={ident[2]} fold={ident[3]} seed={ident[4]}")
        seen[ident] = cid
        vols = [str(r["volume"]) for r in members]
        if len(set(vols)) != len(vols):
            dup = sorted({v for v in vols if vols.count(v) > 1})
            raise ValueError(f"cell {cid!r} has volume(s) {dup} more than once")
        members = sorted(members, key=lambda r: str(r["volume"]))
        for r in members:
            if r["dice_mean"] is None or any(r[f"dice_{c}"] is None for c in class_names):
                raise ValueError(f"cell {cid!r} volume {r['volume']!r}: Dice is None (Dice is defined for every volume)")
        hds = [float(r["hd95_mm_mean"]) for r in members if r["hd95_mm_mean"] is not None]
        cell = {"cell": cid, **dict(zip(("encoder", "mode", "labeled", "fold", "seed"), ident)),
                "volumes": len(members), "hd95_volumes": len(hds),
                "dice": _mean([float(r["dice_mean"]) for r in members]),
                "hd95": _mean(hds) if hds else None}
        for c in class_names:
            cell[f"dice_{c}"] = _mean([float(r[f"dice_{c}"]) for r in members])
        cells.append(cell)
    cells.sort(key=lambda c: (c["encoder"], c["mode"], c["labeled"], c["fold"], c["seed"], c["cell"]))
    return cells


def _methods(cells: Sequence[Mapping], baseline: str) -> list[str]:
    names = sorted({c["encoder"] for c in cells})
    return ([baseline] if baseline in names else []) + [m for m in names if m != baseline]


def _modes(cells: Sequence[Mapping]) -> list[str]:
    """The modes of the cells: full first, then alphabetical."""
    names = sorted({c["mode"] for c in cells})
    return ([DEFAULT_MODE] if DEFAULT_MODE in names else []) + [m for m in names if m != DEFAULT_MODE]


def _label(method: str, mode: str) -> str:
    """A method in a mode, where modes are told apart: ``pcl`` (full), ``pcl (frozen)``."""
    return method if mode == DEFAULT_MODE else f"{method} ({mode})"


def _stats(cells: Sequence[Mapping], key: str) -> dict[tuple[str, int], tuple[float, float | None, int]]:
    """(method, M) -> (mean, std or None, n cells with a value); cells whose value is None are left out."""
    groups: dict[tuple[str, int], list[float]] = {}
    for c in cells:
        groups.setdefault((c["encoder"], c["labeled"]), [])
        if c[key] is not None:
            groups[(c["encoder"], c["labeled"])].append(c[key])
    return {k: ((_mean(v), _std(v), len(v)) if v else (math.nan, None, 0)) for k, v in groups.items()}


# ------------------------------------------------------------------------------------ formatting

def _fmt(x: float | None, digits: int, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    if text.lstrip("+-").strip("0.") == "":  # no negative (or signed) zero
        text = ("+" if sign else "") + text.lstrip("+-")
    return text


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _table(stats, methods: Sequence[str], ms: Sequence[int], digits: int, lower_is_better: bool) -> list[str]:
    """method rows × M columns of "mean ± std (n=k)"; the best displayed mean per column in bold (ties too)."""
    lines = ["| method | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---|" * len(ms)]
    best = {}
    for m in ms:
        shown = [round(stats[(meth, m)][0], digits) for meth in methods
                 if (meth, m) in stats and stats[(meth, m)][2] > 0 and not math.isnan(stats[(meth, m)][0])]
        if shown:
            best[m] = min(shown) if lower_is_better else max(shown)
    for meth in methods:
        entries = []
        for m in ms:
            if (meth, m) not in stats:
                entries.append("–")
                continue
            mean, std, n = stats[(meth, m)]
            if n == 0:
                entries.append("– (n=0)")
                continue
            text = f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"
            if m in best and round(mean, digits) == best[m]:
                text = f"**{text}**"
            entries.append(f"{text} (n={n})")
        lines.append(f"| {_md(meth)} | " + " | ".join(entries) + " |")
    return lines


def _paired(cells: Sequence[Mapping], method: str, baseline: str, ms: Iterable[int] | None):
    """Differences method − baseline of matched cells (same M, fold, seed), in (M, fold, seed) order."""
    base = {(c["labeled"], c["fold"], c["seed"]): c["dice"] for c in cells if c["encoder"] == baseline}
    diffs = []
    for c in cells:  # sorted by (encoder, M, fold, seed)
        key = (c["labeled"], c["fold"], c["seed"])
        if c["encoder"] == method and (ms is None or c["labeled"] in ms) and key in base:
            d = c["dice"] - base[key]
            diffs.append(0.0 if abs(d) <= _ZERO_TOL else d)
    return diffs


def paired_stats(diffs: Sequence[float]) -> dict:
    """``n``, ``mean``, ``ci`` (95 %, t-distribution; None with n < 2) and ``p`` (two-sided Wilcoxon
    signed-rank; None with fewer than 2 non-zero differences) of paired differences."""
    from scipy import stats

    n = len(diffs)
    out = {"n": n, "mean": _mean(diffs) if n else None, "ci": None, "p": None}
    if n >= 2:
        half = float(stats.t.ppf(0.975, n - 1)) * _std(diffs) / math.sqrt(n)
        out["ci"] = (out["mean"] - half, out["mean"] + half)
    if sum(1 for d in diffs if d != 0.0) >= 2:
        with warnings.catch_warnings():  # e.g. "exact p-value not possible with zeros": the text says nothing of it
            warnings.simplefilter("ignore")
            out["p"] = float(stats.wilcoxon(diffs).pvalue)
    return out


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.0005 else f"{p:.3f}"


def summarize(rows: Iterable[Mapping], class_names: Sequence[str], baseline: str = "random") -> str:
    """The markdown of ``summary.md`` for the per-volume ``rows`` (see the module docstring).

    Deterministic: modes are full first then alphabetical, methods ``baseline`` first then alphabetical,
    M ascending, no timestamps; the same rows (in any order) give byte-identical text."""
    class_names = _check_class_names(class_names)
    cells = _cells(rows, class_names)
    if not cells:
        raise ValueError("summarize: no rows")
    modes = _modes(cells)
    out = ["# Label-efficiency summary", "", _intro(cells, class_names, baseline, modes)]
    for mode in modes:
        suffix = "" if modes == [DEFAULT_MODE] else f", mode {mode}"  # one full mode: the text of before modes
        out += _mode_sections([c for c in cells if c["mode"] == mode], class_names, baseline, suffix)
    return "\n".join(out) + "\n"


def _intro(cells: Sequence[Mapping], class_names: Sequence[str], baseline: str, modes: Sequence[str]) -> str:
    """The paragraph that says how the numbers are averaged, and what the cells are."""
    counts = {}
    for mode in modes:
        of_mode = [c for c in cells if c["mode"] == mode]
        for m in _methods(of_mode, baseline):
            counts[_label(m, mode)] = sum(1 for c in of_mode if c["encoder"] == m)
    what = "encoder × M labeled patients × fold × seed" if modes == [DEFAULT_MODE] else \
        "encoder × mode × M labeled patients × fold × seed"
    text = (
        f"Averaged: a cell ({what}) scores the mean over its test volumes; "
        "table entries are mean ± sample std (ddof=1) over the cells (folds × seeds) of each method × M, "
        "n = cells. Dice: per volume per class, overall = mean over classes (higher is better). "
        "HD95: mm, per volume the mean over the classes that have one (lower is better). "
        f"Cells: {len(cells)} (" + ", ".join(f"{_md(m)} {n}" for m, n in counts.items())
        + f") from {sum(c['volumes'] for c in cells)} volume rows; classes: "
        + (", ".join(_md(c) for c in class_names) or "none") + ". Best per column in **bold**.")
    if modes != [DEFAULT_MODE]:
        text += (" Modes: " + ", ".join(f"{_md(m)} ({_MODE_TEXT[m]})" if m in _MODE_TEXT else _md(m) for m in modes)
                 + f"; the tables and paired comparisons are per mode, each method against {_md(baseline)} "
                 "in the same mode.")
    return text


def _mode_sections(cells: Sequence[Mapping], class_names: Sequence[str], baseline: str, suffix: str) -> list[str]:
    """Tables 1 and 2, Dice per class and the paired comparison of the cells of one mode (``suffix``
    ends each heading: which mode, or nothing)."""
    methods = _methods(cells, baseline)
    ms = sorted({c["labeled"] for c in cells})
    out = ["", f"## Table 1: Dice, overall (mean over classes){suffix}", ""]
    out += _table(_stats(cells, "dice"), methods, ms, 3, lower_is_better=False)

    out += ["", f"## Table 2: HD95 (mm), overall{suffix}", ""]
    out += _table(_stats(cells, "hd95"), methods, ms, 2, lower_is_better=True)
    n_volumes = sum(c["volumes"] for c in cells)
    missing_vol = n_volumes - sum(c["hd95_volumes"] for c in cells)
    no_hd = [c for c in cells if c["hd95"] is None]
    note = ("HD95 is None for a class in only one of prediction and label; a volume's HD95 is the mean over "
            "the classes that have one, a cell's the mean over the volumes that have one, and cells with no "
            f"HD95 at all are left out of the mean (n counts the cells with a value). "
            f"Volumes without HD95: {missing_vol} of {n_volumes}; cells without HD95: {len(no_hd)} of {len(cells)}")
    if no_hd:
        note += " (" + ", ".join(f"{_md(c['encoder'])} M={c['labeled']} fold={c['fold']} seed={c['seed']}"
                                 for c in no_hd) + ")"
    out += ["", note + "."]

    if class_names:
        out += ["", f"## Dice per class{suffix}", ""]
        for c in class_names:
            out += [f"### {_md(c)}", ""]
            out += _table(_stats(cells, f"dice_{c}"), methods, ms, 3, lower_is_better=False)
            out.append("")
        out.pop()
    return out + ["", f"## Paired comparison against {_md(baseline)} (Dice, overall){suffix}", ""] + \
        _paired_section(cells, methods, baseline)


def _paired_section(cells: Sequence[Mapping], methods: Sequence[str], baseline: str) -> list[str]:
    """The paired comparison of each method against ``baseline`` over the cells of one mode."""
    if baseline not in methods:
        return [f"Baseline {_md(baseline)!s} is absent from the rows (methods: "
                + ", ".join(_md(m) for m in methods) + "): paired comparison skipped."]
    if len(methods) == 1:
        return [f"Only the baseline {_md(baseline)} is present: nothing to compare."]
    out = [f"Difference = method − {_md(baseline)} over matched cells (same M, fold and seed); "
           "95% CI from the t-distribution over the paired differences; p: two-sided Wilcoxon "
           "signed-rank test (n/a with fewer than 2 non-zero differences, or no CI with fewer than 2 pairs). "
           "M = all pools the pairs of every M (shown with more than one M)."]
    out += ["", "| method | M | n pairs | mean diff | 95% CI | Wilcoxon p |", "|---|---|---|---|---|---|"]
    unmatched = []
    base_keys = {(c["labeled"], c["fold"], c["seed"]) for c in cells if c["encoder"] == baseline}
    for meth in methods[1:]:
        meth_ms = sorted({c["labeled"] for c in cells if c["encoder"] == meth})
        for m in [*meth_ms, None] if len(meth_ms) > 1 else meth_ms:
            s = paired_stats(_paired(cells, meth, baseline, None if m is None else {m}))
            ci = "n/a" if s["ci"] is None else f"[{_fmt(s['ci'][0], 3, True)}, {_fmt(s['ci'][1], 3, True)}]"
            mean = "n/a" if s["mean"] is None else _fmt(s["mean"], 3, True)
            out.append(f"| {_md(meth)} | {'all' if m is None else m} | {s['n']} | {mean} | {ci} | {_fmt_p(s['p'])} |")
        unmatched += [c for c in cells if c["encoder"] == meth and (c["labeled"], c["fold"], c["seed"]) not in base_keys]
    if unmatched:
        out += ["", f"Cells without a matching {_md(baseline)} cell (left out): " + ", ".join(
            f"{_md(c['encoder'])} M={c['labeled']} fold={c['fold']} seed={c['seed']}" for c in unmatched) + "."]
    return out


# ------------------------------------------------------------------------------------------- plot

def plot_label_efficiency(rows: Iterable[Mapping], path: str | Path, baseline: str = "random") -> Path:
    """A 640×480 PNG (6.4×4.8 in at 100 dpi), written atomically: mean Dice (overall) over cells against M,
    one line with markers per method and mode (a colour per method, a line style per mode: full solid,
    frozen dashed) and a band of ± sample std over cells. x is log2 with integer ticks at the M values
    (linear when some M < 1).

    Uses matplotlib's object-oriented API (``Figure``, Agg canvas): no pyplot, no GUI, and the caller's
    global backend is left unchanged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    cells = _cells(rows, [])
    if not cells:
        raise ValueError("plot_label_efficiency: no rows")
    methods = _methods(cells, baseline)
    ms = sorted({c["labeled"] for c in cells})

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for mode in _modes(cells):
        stats = _stats([c for c in cells if c["mode"] == mode], "dice")
        for i, meth in enumerate(methods):
            xs = [m for m in ms if (meth, m) in stats]
            if not xs:
                continue
            means = [stats[(meth, m)][0] for m in xs]
            stds = [stats[(meth, m)][1] or 0.0 for m in xs]
            ax.plot(xs, means, marker="o", label=_label(meth, mode), color=f"C{i}", linestyle=_LINE_STYLES.get(mode, ":"))
            ax.fill_between(xs, [a - s for a, s in zip(means, stds)], [a + s for a, s in zip(means, stds)],
                            color=f"C{i}", alpha=0.2, linewidth=0)
    if ms[0] >= 1:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms])
    ax.set_xlabel("labeled patients M")
    ax.set_ylabel("Dice (mean over classes, ± std over cells)")
    ax.set_title("Label efficiency")
    ax.grid(True, alpha=0.3)
    ax.legend(title="encoder")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    return path


def plot_paired_differences(rows: Iterable[Mapping], path: str | Path, baseline: str = "random") -> Path | None:
    """A 640×480 PNG, written atomically: per mode (a panel each), every method's mean paired Dice difference
    against ``baseline`` (matched cells, every M pooled) with its 95% t-interval as a bar, and a line at 0: the
    answer of the paired comparison at a glance, also where the sweep has a single M. None (nothing written)
    without the baseline or another method to compare with it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = _cells(rows, [])
    modes = [m for m in _modes(cells) if baseline in {c["encoder"] for c in cells if c["mode"] == m}]
    panels = []
    for mode in modes:
        of_mode = [c for c in cells if c["mode"] == mode]
        found = [(meth, paired_stats(_paired(of_mode, meth, baseline, None))) for meth in _methods(of_mode, baseline)[1:]]
        if found := [(meth, st) for meth, st in found if st["n"]]:
            panels.append((mode, found))
    if not panels:
        return None
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=False, squeeze=False)[0]
    for ax, (mode, found) in zip(axes, panels):
        for y, (meth, st) in enumerate(reversed(found)):
            lo, hi = st["ci"] if st["ci"] is not None else (st["mean"], st["mean"])
            ax.errorbar([st["mean"]], [y], xerr=[[st["mean"] - lo], [hi - st["mean"]]], fmt="o", capsize=4,
                        color=f"C{_methods(cells, baseline).index(meth)}")
            ax.annotate(f"n={st['n']}", (hi, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(0.0, color="grey", linewidth=1)
        ax.set_yticks(range(len(found)))
        ax.set_yticklabels([m for m, _ in reversed(found)])
        ax.set_ylim(-0.6, len(found) - 0.4)
        ax.set_title(f"{mode}" if len(panels) > 1 else f"{mode} fine-tuning")
        ax.set_xlabel(f"Dice − {baseline} (95% CI)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Paired differences against {baseline} (matched cells, every M)")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    return path
