"""analysis.ipynb runs headless on every shape of results.tsv an overnight run can leave behind.

Each test writes a fixture log into a temporary folder, executes the notebook there with nbclient and checks that
no cell raised, that progress.png is a real PNG exactly when there was something to plot, and that the printed
baseline and best match values computed here from the fixture rows. All runs share one python3 kernel from this
venv (importing pandas and matplotlib costs more than a run); a first cell clears its namespace, enters the folder
and sets RESULTS_TSV.

Run: uv run pytest tests/test_analysis.py
"""

import json
import random
import re
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
    """Hand-written: statuses in any case, stray spaces, trailing blank lines, '#' and quotes in descriptions."""
    return "\n".join([
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription  ",
        "a1b2c3d\t0.997900\t44.0\tKEEP\tbaseline",
        " b2c3d4e \t 0.993200 \t44.2\t Keep \tincrease LR to 0.04 # after warmup",
        'c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to "GeLU" activation',
        "d4e5f6a\t0.000000\t0.0\tcrash\tdouble model width (OOM)",
        "e5f6a7b\t0.990100\t45.1\tkeep\tit's the 'value embeddings' again, with a\ttab",
        "f6a7b8c\t0.991000\t45.0\tDiscard\t#comment-looking description",
        "", "  ",
    ])


def keep_values(text):
    """val_bpb of the keep rows, parsed independently of the notebook."""
    rows = [[f.strip() for f in line.split("\t")] for line in text.splitlines()[1:] if line.strip()]
    return [float(r[1]) for r in rows if r[3].lower() == "keep"]


def first_result(text):
    rows = [[f.strip() for f in line.split("\t")] for line in text.splitlines()[1:] if line.strip()]
    return next(float(r[1]) for r in rows if r[3].lower() != "crash")


@pytest.fixture(scope="module")
def kernel():
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    yield km
    km.shutdown_kernel(now=True)


def execute(kernel, tmp_path, text):
    """Run the notebook in tmp_path against a fixture (None: no file); return all printed text and the figure path."""
    results = tmp_path / "results.tsv"
    if text is not None:
        results.write_text(text)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(0, new_code_cell(f"%reset -f\nimport os\nos.chdir({str(tmp_path)!r})\n"
                                     f"os.environ['RESULTS_TSV'] = {str(results)!r}"))
    NotebookClient(nb, km=kernel, timeout=120).execute()
    printed = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            printed.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
    return "\n".join(printed), tmp_path / "progress.png"


def printed_value(label, printed):
    return float(re.search(rf"^{label}:\s+([0-9.]+)", printed, re.MULTILINE).group(1))


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 1000 and height > 500


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        assert not cell.get("outputs") and cell.get("execution_count") is None


@pytest.mark.parametrize("text", [night(40, seed=1), messy_night()], ids=["normal", "messy"])
def test_normal_night(kernel, tmp_path, text):
    printed, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert printed_value("baseline", printed) == pytest.approx(first_result(text), abs=1e-6)
    assert printed_value("best", printed) == pytest.approx(min(keep_values(text)), abs=1e-6)
    assert f"keep rate: {len(keep_values(text))} of" in printed


@pytest.mark.parametrize("text", [HEADER + "\n", None], ids=["header_only", "missing_file"])
def test_no_experiments_yet(kernel, tmp_path, text):
    printed, png = execute(kernel, tmp_path, text)
    assert "No experiments yet" in printed
    assert not png.exists()


def test_first_run_crashed(kernel, tmp_path):
    text = night(25, seed=2, first_crashes=2)
    printed, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert "runs 1..2 crashed" in printed
    assert printed_value("baseline", printed) == pytest.approx(first_result(text), abs=1e-6)
    assert printed_value("best", printed) == pytest.approx(min(keep_values(text)), abs=1e-6)


def test_all_runs_crashed(kernel, tmp_path):
    printed, png = execute(kernel, tmp_path, night(6, seed=3, all_crash=True))
    assert "nothing to plot" in printed and "6 crashed" in printed
    assert not png.exists()


def test_long_night(kernel, tmp_path):
    text = night(300, seed=4)
    printed, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert "300 runs loaded" in printed
    assert printed_value("best", printed) == pytest.approx(min(keep_values(text)), abs=1e-6)


def test_nothing_kept_yet(kernel, tmp_path):
    text = "\n".join([HEADER, row("a1b2c3d", 1.01, "discard", "baseline logged as discard"), "b2c3d4e\tnot-a-number"])
    printed, png = execute(kernel, tmp_path, text)
    assert_png(png)
    assert "best:         no kept run yet" in printed and "2 runs loaded" in printed
