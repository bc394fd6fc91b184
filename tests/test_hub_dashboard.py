"""The hub's #results parsing and its dashboard.

Results posts in the agenthub format are parsed into the results table (and anything else stays a plain post);
the markdown subset escapes everything a post says; the page renders in a real headless Chromium (skipped with a
reason when it is not installed) with the best run per platform, the frontier and the posts, and no script from a
post ever runs.
Run: uv run pytest tests/test_hub_dashboard.py
"""
import shutil
import subprocess

import pytest
import requests
from hub_helpers import HubServer, bundle, commit_change, make_repo

from hub.dashboard import render_markdown
from hub.results import parse_result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
EVIL = ('<script>document.title="pwned"</script><img src=x onerror="document.title=1"> '
        '[click](javascript:alert(1)) [docs](https://example.com/"onmouseover="x) **bold** `<b>code</b>`')


@pytest.mark.parametrize("content, expected", [
    ("commit:a1b2c3d platform:H100 val_bpb:0.991200 vram_gb:44.1 | warmup 0.1 -> 0.05",
     {"commit_prefix": "a1b2c3d", "platform": "H100", "val_bpb": 0.9912, "vram_gb": 44.1, "status": "keep",
      "description": "warmup 0.1 -> 0.05", "dataset": "", "profile": ""}),
    ("commit:B2C3D4E platform:M3-Max val_bpb:1.085 mem_gb:11.0 dataset:climbmix profile:cpu seed:3 | GeLU (DISCARD)",
     {"commit_prefix": "b2c3d4e", "platform": "M3-Max", "val_bpb": 1.085, "vram_gb": 11.0, "status": "discard",
      "dataset": "climbmix", "profile": "cpu", "fields": '{"seed": "3"}'}),
    ("commit:c3d4e5f platform:A100 val_bpb:--- vram_gb:--- | double the width (CRASH: OOM)",
     {"val_bpb": None, "vram_gb": None, "status": "crash"}),
    ("commit:c3d4e5f platform:A100 val_bpb:1.2 vram_gb:30 | CRASH after eval", {"status": "crash"}),
    ("commit:c3d4e5f platform:A100 val_bpb:0.000000 vram_gb:0.0 dataset:stdlib | CRASH: OOM",  # results.tsv's crash
     {"val_bpb": None, "vram_gb": None, "status": "crash", "dataset": "stdlib"}),
    ("commit:c3d4e5f platform:A100 val_bpb:1.2\n\nmore *markdown* below", {"description": "", "status": "keep"}),
])
def test_results_posts_parse(content, expected):
    parsed = parse_result(content)
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.parametrize("content", [
    "commit:a1b2c3d platform:H100 | no val_bpb", "platform:H100 val_bpb:1.0 | no commit",
    "commit:a1b2 platform:H100 val_bpb:1.0 | hash too short", "commit:a1b2c3d val_bpb:1.0 | no platform",
    "commit:a1b2c3d platform:H100 val_bpb:fast | not a number", "commit:a1b2c3d platform:H100 val_bpb:nan | nan",
    "I think commit:a1b2c3d platform:H100 val_bpb:1.0 was lucky", "just talking about val_bpb",
])
def test_other_posts_are_not_results(content):
    assert parse_result(content) is None


def test_markdown_escapes_everything_it_does_not_render():
    out = render_markdown(EVIL + "\n\n- one\n- two\n\n```\n<script>x</script>\n```\n# Heading")
    assert "<script" not in out and "<img" not in out and 'href="javascript' not in out
    assert "&lt;script&gt;" in out and "<strong>bold</strong>" in out and "<code>&lt;b&gt;code&lt;/b&gt;</code>" in out
    assert '<a href="https://example.com/&quot;onmouseover=&quot;x"' in out
    assert "<ul><li>one</li><li>two</li></ul>" in out and "<h4>Heading</h4>" in out
    assert "<pre><code>&lt;script&gt;x&lt;/script&gt;\n</code></pre>" in out


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    server = HubServer(tmp / "data").start()
    agent = server.register("painter")
    for name in ("results", "discussion"):
        agent.post("/api/channels", json={"name": name, "description": name})
    repo = make_repo(tmp / "repo", "painter")
    for i, (val, note) in enumerate([(1.10, "baseline"), (1.07, "lower lr"), (1.05, "warmup")]):
        sha = commit_change(repo, f"v = {i}\n", note)
        assert agent.push(bundle(repo)).status_code == 200
        agent.post("/api/channels/results/posts",
                   json={"content": f"commit:{sha[:7]} platform:H100 val_bpb:{val:.6f} vram_gb:40.0 | {note}"})
    agent.post("/api/channels/results/posts",
               json={"content": f"commit:{sha[:7]} platform:H100 val_bpb:1.2 vram_gb:40.0 | wider DISCARD"})
    agent.post("/api/channels/discussion/posts", json={"content": EVIL})
    yield server, sha
    server.stop()


def test_dashboard_shows_the_night(populated):
    server, leaf = populated
    r = requests.get(server.url + "/")
    assert r.status_code == 200 and "script-src" not in r.headers["content-security-policy"]
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    page = r.text
    assert "1.050000" in page and "warmup" in page and "<svg" in page  # best run, its description, the chart
    assert leaf[:7] in page and "<td class=num>3</td>" in page  # the frontier leaf, 3 improvements deep
    assert "<script" not in page and "&lt;script&gt;" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_dashboard_renders_in_headless_chromium_without_running_post_scripts(populated, tmp_path):
    server, _ = populated
    shot = tmp_path / "hub.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", server.url + "/"], capture_output=True, text=True, timeout=90).stdout
    assert "<title>autoresearch hub</title>" in dom and "pwned" not in dom.split("</title>")[0]
    assert "<script" not in dom and "Best val_bpb per platform" in dom and "1.050000" in dom
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,1600", server.url + "/"],
                   capture_output=True, timeout=90)
    assert shot.stat().st_size > 10_000
