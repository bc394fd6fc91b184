"""analysis.ipynb runs headless on every shape of results.tsv an overnight run can leave behind.

Each test writes a fixture log into a temporary folder, executes the notebook there with nbclient and checks that
no cell raised, that progress.png is a real PNG exactly when there was something to plot, and that what the notebook
shows (printed lines, and the tables it displays, read back from their HTML) matches values computed here from the
fixture rows: counts per status, the kept runs in order with their gains, the summary, the top improvements.
All runs share one python3 kernel from this venv (importing pandas and matplotlib costs more than a run); a first
cell clears its namespace, enters the folder and sets RESULTS_TSV.

Run: uv run pytest tests/test_analysis.py
"""

import json
import random
import re
import statistics
from collections import Counter, namedtuple
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

NOTEBOOK = Path(__file__).resolve().parents[1] / "analysis.ipynb"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IDEAS = [
    "raise MATRIX_LR to 0.05", "DEPTH 8 -> 10", 'WINDOW_PATTERN "SSSL" -> "SL"', "halve TOTAL_BATCH_SIZE",
    "WARMDOWN_RATIO 0.5 # longer cooldown", "swap relu^2 for GELU", "ASPECT_RATIO 64 -> 48",
    "weight decay 0.2 on matrices only", "untie value embeddings", "FINAL_LR_FRAC 0.0 -> 0.1",
]


def row(commit, val_bpb, status, description):
    memory = 0.0 if status == "crash" else 44.0
    return f"{commit}\t{val_bpb:.6f}\t{memory:.1f}\t{status}\t{description}"


def night(n_runs, seed, first_crashes=0, all_crash=False):
    """A plausible log: a baseline, then ideas that are kept when they beat the best so far; a few crash."""
    rng = random.Random(seed)
    lines, best = [HEADER], 1.0
    for i in range(n_runs):
        commit = f"{rng.getrandbits(28):07x}"
        if all_crash or i < first_crashes or rng.random() < 0.08:
            lines.append(row(commit, 0.0, "crash", f"{rng.choice(IDEAS)} (OOM)"))
            continue
        val = best if i == first_crashes else best + rng.gauss(0.006, 0.006)
        status = "keep" if val <= best else "discard"
        best = min(best, val)
        lines.append(row(commit, val, status, "baseline" if i == first_crashes else rng.choice(IDEAS)))
    return "\n".join(lines) + "\n"


def messy_night():
    """Hand-written: statuses in any case, stray spaces, trailing blank lines, '#' and quotes in descriptions,
    and a kept run that came out worse than the one before it (a negative gain)."""
    return "\n".join([
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription  ",
        "a1b2c3d\t0.997900\t44.0\tKEEP\tbaseline",
        " b2c3d4e \t 0.993200 \t44.2\t Keep \tincrease LR to 0.04 # after warmup",
        'c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to "GeLU" activation',
        "d4e5f6a\t0.000000\t0.0\tcrash\tdouble model width (OOM)",
        "e5f6a7b\t0.990100\t45.1\tkeep\tit's the 'value embeddings' again, with a\ttab",
        "f6a7b8c\t0.991000\t45.0\tDiscard\t#comment-looking description",
        'a7b8c9d\t0.989000\t45.0\tkeep\tWINDOW_PATTERN "SSSL" -> "SL" # fewer long layers',
        "b8c9d0e\t0.991500\t45.0\tkeep\t#re-run of the window change (noise)",
        "", "  ",
    ])


Run = namedtuple("Run", "run commit val_bpb status description")


def fixture_runs(text):
    """The fixture's runs as program.md defines the log, parsed here independently of the notebook: a leading
    byte-order mark is not data, a row without a positive val_bpb is a crash, a description's whitespace is one
    space."""
    runs = []
    for line in text.removeprefix("\ufeff").splitlines()[1:]:
        if not line.strip():
            continue
        commit, val_bpb, _, status, description = (line.split("\t", 4) + [""] * 4)[:5]
        try:
            val_bpb = float(val_bpb)
        except ValueError:
            val_bpb = 0.0
        status = status.strip().lower()
        if val_bpb <= 0 or status == "crash":
            val_bpb, status = None, "crash"
        runs.append(Run(len(runs) + 1, commit.strip(), val_bpb, status, " ".join(description.split())))
    return runs


class DisplayedTables(HTMLParser):
    """The tables of a display()ed frame's HTML as the reader sees them: per table, (columns, rows) where each row
    maps "index" and every column name to the text of its cell."""

    def __init__(self, html):
        super().__init__()
        self.raw, self.part, self.cell = [], None, None
        self.feed(html)
        self.tables = [(head[0][1:], [dict(zip(["index"] + head[0][1:], row)) for row in body])
                       for head, body in self.raw]

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.raw.append(([], []))
        elif tag in ("thead", "tbody"):
            self.part = 0 if tag == "thead" else 1
        elif tag == "tr":
            self.raw[-1][self.part].append([])
        elif tag in ("th", "td"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.raw[-1][self.part][-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


@pytest.fixture(scope="module")
def kernel():
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    yield km
    km.shutdown_kernel(now=True)


def execute(kernel, tmp_path, text, noise_sigma=None):
    """Run the notebook in tmp_path against a fixture (None: no file), NOISE_SIGMA set when given; return all
    printed text, the displayed tables (columns -> rows) and the figure path."""
    results = tmp_path / "results.tsv"
    if text is not None:
        results.write_text(text, encoding="utf-8")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    sigma = f"os.environ['NOISE_SIGMA'] = {noise_sigma!r}" if noise_sigma else "os.environ.pop('NOISE_SIGMA', None)"
    nb.cells.insert(0, new_code_cell(f"%reset -f\nimport os\nos.chdir({str(tmp_path)!r})\n"
                                     f"os.environ['RESULTS_TSV'] = {str(results)!r}\n{sigma}"))
    NotebookClient(nb, km=kernel, timeout=120).execute()
    printed, tables = [], {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            printed.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
            for columns, rows in DisplayedTables(out.get("data", {}).get("text/html", "")).tables:
                assert tuple(columns) not in tables, columns
                tables[tuple(columns)] = rows
    return "\n".join(printed), tables, tmp_path / "progress.png"


def assert_review(text, printed, tables):
    """Everything the notebook reports, against values computed here from the fixture."""
    runs = fixture_runs(text)
    done = [r for r in runs if r.val_bpb is not None]
    kept = [r for r in runs if r.status == "keep"]
    gains = {b.run: a.val_bpb - b.val_bpb for a, b in zip(kept, kept[1:])}

    assert f"{len(runs)} runs loaded" in printed
    assert {row["index"]: int(row["runs"]) for row in tables[("runs",)]} == Counter(r.status for r in runs)
    assert f"keep rate: {len(kept)} of {len(runs)} runs" in printed

    shown = tables[("commit", "val_bpb", "gain", "memory_gb", "description")]
    assert [(int(row["index"]), row["commit"], row["description"]) for row in shown] == \
        [(r.run, r.commit, r.description) for r in kept]
    assert [float(row["val_bpb"]) for row in shown] == pytest.approx([r.val_bpb for r in kept], abs=1e-6)
    assert [float(row["gain"]) for row in shown[1:]] == pytest.approx([gains[r.run] for r in kept[1:]], abs=1e-6)

    if not done:
        assert f"No run produced a val_bpb yet ({len(runs)} crashed)" in printed
        return
    base = done[0]
    value, run, commit, description = re.search(r"^baseline:\s+(\S+)  run (\d+)  (\S+)  (.+?)(?:  \(runs .*)?$",
                                                printed, re.MULTILINE).groups()
    assert (float(value), int(run), commit, description) == (base.val_bpb, base.run, base.commit, base.description)
    if not kept:
        assert "best:         no kept run yet" in printed
        return
    best = min(kept, key=lambda r: r.val_bpb)
    value, run, commit, description = re.search(r"^best:\s+(\S+)  run (\d+)  (\S+)  (.+)$", printed,
                                                re.MULTILINE).groups()
    assert (float(value), int(run), commit, description) == (best.val_bpb, best.run, best.commit, best.description)
    gain, percent = re.search(r"^improvement:\s+(\S+) \((\S+)% of the baseline\)$", printed, re.MULTILINE).groups()
    assert float(gain) == pytest.approx(base.val_bpb - best.val_bpb, abs=1e-6)
    assert float(percent) == pytest.approx(100 * (base.val_bpb - best.val_bpb) / base.val_bpb, abs=0.006)

    top = sorted((r for r in kept if gains.get(r.run, 0) > 0), key=lambda r: -gains[r.run])[:10]
    if not top:
        assert "No improvement over a previous kept run yet." in printed
        return
    shown = tables[("commit", "val_bpb", "gain", "description")]
    assert [(int(row["index"]), row["commit"], row["description"]) for row in shown] == \
        [(r.run, r.commit, r.description) for r in top]
    assert [float(row["gain"]) for row in shown] == pytest.approx([gains[r.run] for r in top], abs=1e-6)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 1000 and height > 500


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        assert not cell.get("outputs") and cell.get("execution_count") is None


@pytest.mark.parametrize("text", [night(40, seed=1), messy_night(), "\ufeff" + messy_night()],
                         ids=["normal", "messy", "messy_with_bom"])
def test_normal_night(kernel, tmp_path, text):
    printed, tables, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert_review(text, printed, tables)


def test_messy_night_by_hand(kernel, tmp_path):
    """The messy fixture's expected review, written out by hand: the check of fixture_runs itself."""
    printed, tables, _ = execute(kernel, tmp_path, messy_night())
    assert {row["index"]: row["runs"] for row in tables[("runs",)]} == {"keep": "5", "discard": "2", "crash": "1"}
    assert "best:         0.989000  run 7  a7b8c9d  WINDOW_PATTERN \"SSSL\" -> \"SL\" # fewer long layers" in printed
    assert [row["description"] for row in tables[("commit", "val_bpb", "gain", "memory_gb", "description")]] == [
        "baseline", "increase LR to 0.04 # after warmup", "it's the 'value embeddings' again, with a tab",
        'WINDOW_PATTERN "SSSL" -> "SL" # fewer long layers', "#re-run of the window change (noise)"]
    assert [row["commit"] for row in tables[("commit", "val_bpb", "gain", "description")]] == [
        "b2c3d4e", "e5f6a7b", "a7b8c9d"]  # gains 0.0047, 0.0031, 0.0011; b8c9d0e got worse and is not listed


@pytest.mark.parametrize("text", [HEADER + "\n", None], ids=["header_only", "missing_file"])
def test_no_experiments_yet(kernel, tmp_path, text):
    printed, tables, png = execute(kernel, tmp_path, text)
    assert "No experiments yet" in printed
    assert not png.exists() and not tables


def test_first_run_crashed(kernel, tmp_path):
    text = night(25, seed=2, first_crashes=2)
    printed, tables, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert "runs 1..2 crashed" in printed
    assert_review(text, printed, tables)


def test_all_runs_crashed(kernel, tmp_path):
    text = night(6, seed=3, all_crash=True)
    printed, tables, png = execute(kernel, tmp_path, text)
    assert "nothing to plot" in printed
    assert not png.exists()
    assert_review(text, printed, tables)


def test_long_night(kernel, tmp_path):
    text = night(300, seed=4)
    printed, tables, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert "300 runs loaded" in printed
    assert_review(text, printed, tables)


def test_nothing_kept_yet(kernel, tmp_path):
    text = "\n".join([HEADER, row("a1b2c3d", 1.01, "discard", "baseline logged as discard"), "b2c3d4e\tnot-a-number"])
    printed, tables, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert_review(text, printed, tables)


def test_noise_band_from_the_baseline_re_runs(kernel, tmp_path):
    """program.md's re-runs of the baseline give sigma when no figure is set: their standard deviation."""
    values = [1.5012, 1.5121, 1.4937]
    text = "\n".join([HEADER, row("a1b2c3d", values[0], "keep", "baseline"),
                      row("b2c3d4e", values[1], "discard", "baseline re-run"),
                      row("c3d4e5f", values[2], "discard", "baseline re-run"),
                      row("d4e5f6a", 1.4700, "keep", "DEPTH 4 -> 5")]) + "\n"
    printed, tables, png = execute(kernel, tmp_path, text)
    assert_png(png)
    sigma = re.search(r"σ = (\S+) from 3 baseline runs", printed)
    assert sigma and float(sigma.group(1)) == pytest.approx(statistics.stdev(values), abs=5e-5)


def test_noise_band_from_noise_sigma(kernel, tmp_path):
    printed, _, png = execute(kernel, tmp_path, night(30, seed=5), noise_sigma="0.0042")
    assert_png(png)
    assert "σ = 0.0042 from NOISE_SIGMA" in printed


def test_no_noise_band_without_a_figure(kernel, tmp_path):
    printed, _, _ = execute(kernel, tmp_path, messy_night())  # one baseline run: no spread to measure
    assert "no noise band: set NOISE_SIGMA" in printed
