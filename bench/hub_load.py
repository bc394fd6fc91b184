"""
Load benchmark of the hub: simulated agents replay the agenthub loop's calls against hub.py on 127.0.0.1.

    uv run bench/hub_load.py                                   # 24 agents on 8 client threads, 15 s, flat out
    uv run bench/hub_load.py --rate 200                        # the same, paced to 200 requests/s
    uv run bench/hub_load.py --seconds 20 --keep /tmp/hub-demo # keep the hub's data (e.g. for a screenshot)
    uv run bench/hub_load.py --rate 200 --large                # the hub after a long night: see below

One simulated experiment makes the calls program-hub.md makes: read #results and #discussion, the results table
for its platform, the leaves and the children of its best commit, post its result; and sometimes push an
improvement (a real git bundle of its whole history), fetch another agent's commit, diff two commits, post to
#discussion or load the dashboard. Without --rate there is no think time: each client thread sends its next call as
soon as the last one answers, so the figure is the hub's capacity; with --rate the calls are spread evenly at that
rate and the latencies are those of a hub under that load. The client's own Python runs on the same cores.
Setting up (registering, building the bundles) is not timed. --large first fills the hub with 50,000 commits (real
git objects, made by git fast-import; each builds on a random earlier one, so about half are leaves) and 10,000
#results posts, as a night of many agents leaves it, then runs the same load. A real agent makes about ten calls
per 5-minute experiment, so N requests/s serve about N * 30 agents. Prints a table and writes it as JSON to
bench/results/hub-load-<machine>-[large-]<flat-out or rate>.json, or --out.
"""

import argparse
import datetime
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
from hub.core import Config, Hub
from hub.gitrepo import checkout_files, create_refs, pack_refs
from hub.results import parse_result
from hub.store import utc_now

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADMIN_KEY = "bench-admin-key"
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@example.com", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}
# platform -> (baseline val_bpb, dataset, profile): made-up but plausible starting points
PLATFORMS = {"H100": (0.998, "climbmix", "gpu"), "A100-40GB": (1.034, "climbmix", "gpu"),
             "M3-Max": (1.412, "climbmix", "cpu"), "cpu-EPYC-2c": (1.947, "stdlib", "cpu")}
IDEAS = ["lower matrix lr to 0.03", "warmup 5% of steps", "halve weight decay", "depth 10", "GeLU instead of ReLU^2",
         "window pattern SSSL", "unembedding lr x2", "batch 2^18 tokens", "rope base 200k", "qk-norm off",
         "value embeddings on every layer", "shorter warmdown", "NorMuon beta 0.9", "tie embeddings", "wider MLP x5"]
LARGE_COMMITS, LARGE_POSTS = 50_000, 10_000  # --large: a long night of many agents
NOTES = ["**Observation:** the last three gains on `{p}` all came from the schedule, not the model.",
         "Tried {i} on {p}: within noise. Has anyone seen it help on another platform?",
         "Plan: combine the two best `{p}` branches.\n\n- lr from one\n- warmup from the other"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_baseline(folder: Path) -> Path:
    """The operator's checkout for the simulated agents, whose repositories hold train.py alone."""
    folder.mkdir(parents=True)
    git = partial(harness.git, cwd=folder, env=GIT_ENV)
    git("init", "--quiet")
    (folder / "train.py").write_text("# the baseline\n")
    git("add", "train.py")
    git("commit", "--quiet", "-m", "baseline")
    return folder

# ---------------------------------------------------------------------------
# --large: a hub after a long night, filled straight into repo.git and hub.db


def fill(data: Path, baseline: Path, commits: int, posts: int) -> None:
    """`commits` commits, each on a random earlier one, by 200 past agents, and `posts` #results posts."""
    commit, files = checkout_files(baseline)
    hub = Hub(Config(data, baseline=commit, baseline_files=files))
    rng = random.Random(0)
    parents = [None] + [rng.randrange(i) for i in range(1, commits)]
    stream = []
    for i, parent in enumerate(parents):
        message, source = f"past idea {i}".encode(), f"# past experiment {i}\nlr = {rng.random():.6f}\n".encode()
        stream += [b"commit refs/heads/fill\nmark :%d\ncommitter bench <b@example.com> %d +0000\n" % (i + 1,
                   1_700_000_000 + i), b"data %d\n%s\n" % (len(message), message)]
        stream += [b"from :%d\n" % (parent + 1)] if parent is not None else []  # the first is the root
        stream += [b"M 100644 inline train.py\ndata %d\n%s\n" % (len(source), source)]
    marks = data / "marks"
    subprocess.run(["git", "--git-dir", str(hub.repo), "fast-import", "--quiet", f"--export-marks={marks}"],
                   input=b"".join(stream), check=True)
    subprocess.run(["git", "--git-dir", str(hub.repo), "update-ref", "-d", "refs/heads/fill"], check=True)
    hashes = [line.split()[1] for line in sorted(marks.read_text().splitlines(), key=lambda m: int(m[1:].split()[0]))]
    marks.unlink()
    create_refs(hub.repo, hashes)
    pack_refs(hub.repo)
    index(hub, hashes, parents, posts, rng)


def index(hub: Hub, hashes: list[str], parents: list, posts: int, rng: random.Random) -> None:
    depth, now = [0] * len(hashes), utc_now()
    with hub.store.transaction() as db:
        for i, (sha, parent) in enumerate(zip(hashes, parents)):
            depth[i] = 0 if parent is None else depth[parent] + (rng.random() < 0.2)
            db.execute("INSERT INTO commits (hash, parents, message, author_time, agent_id, pushed_at, depth) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (sha, hashes[parent] if parent is not None else "",
                                                        f"past idea {i}", now, f"past-{i % 200}", now, depth[i]))
            if parent is not None:
                db.execute("INSERT INTO edges (parent, child) VALUES (?, ?)", (hashes[parent], sha))
                db.execute("UPDATE commits SET leaf = 0 WHERE hash = ?", (hashes[parent],))
        for channel in ("results", "discussion"):
            db.execute("INSERT INTO channels (name, description, created_by, created_at) VALUES (?, ?, ?, ?)",
                       (channel, channel, "past-0", now))
        for i in range(posts):
            platform = rng.choice(list(PLATFORMS))
            best, dataset, profile = PLATFORMS[platform]
            content = (f"commit:{hashes[rng.randrange(len(hashes))][:7]} platform:{platform} val_bpb:"
                       f"{best * rng.uniform(0.95, 1.1):.6f} vram_gb:40.0 dataset:{dataset} profile:{profile} | "
                       f"{rng.choice(IDEAS)}{rng.choice(['', ' (DISCARD)'])}")
            post_id = db.execute("INSERT INTO posts (channel, agent_id, content, created_at) VALUES (?, ?, ?, ?)",
                                 ("results", f"past-{i % 200}", content, now)).lastrowid
            db.execute("INSERT INTO results (post_id, agent_id, created_at, commit_prefix, platform, dataset, "
                       "profile, val_bpb, vram_gb, status, description, fields) VALUES (:post_id, :agent_id, "
                       ":created_at, :commit_prefix, :platform, :dataset, :profile, :val_bpb, :vram_gb, :status, "
                       ":description, :fields)", {"post_id": post_id, "agent_id": f"past-{i % 200}",
                                                  "created_at": now, **parse_result(content)})

# ---------------------------------------------------------------------------
# Simulated agents


class SimAgent:
    """One agent's identity, its repository's prebuilt push bundles, and the val_bpb it has reached."""

    def __init__(self, url: str, name: str, platform: str, workdir: Path, pushes: int):
        key = requests.post(f"{url}/api/register", json={"id": name},
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
        self.url, self.name, self.platform = url, name, platform
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.best, self.dataset, self.profile = PLATFORMS[platform]
        self.leaf = None
        self.bundles = build_bundles(workdir / name, pushes)

    def call(self, record, kind: str, method: str, path: str, **kw) -> requests.Response:
        record.pace()
        t = time.perf_counter()
        r = self.http.request(method, self.url + path, **kw)
        record(kind, time.perf_counter() - t, r.status_code)
        return r


def build_bundles(repo: Path, n: int) -> list[tuple[str, bytes]]:
    """An orphan baseline and n-1 improvements, each bundled whole, as program-hub.md pushes them."""
    repo.mkdir(parents=True)
    git = partial(harness.git, cwd=repo, env=GIT_ENV)
    git("init", "--quiet")
    bundles, bundle = [], repo / ".git" / "push.bundle"
    for i in range(n):
        (repo / "train.py").write_text(f"# {repo.name}\n" + "".join(f"step_{k} = {k}\n" for k in range(i + 1)))
        git("add", "train.py")
        git("commit", "--quiet", "-m", "baseline" if i == 0 else random.choice(IDEAS))
        git("bundle", "create", "-q", str(bundle), "HEAD")
        bundles.append((git("rev-parse", "HEAD"), bundle.read_bytes()))
    return bundles


def experiment(agent: SimAgent, everyone: list[SimAgent], record) -> None:
    """The calls of one loop iteration of program-hub.md, with the loop's odds of each optional one."""
    a, p = agent, agent.platform
    a.call(record, "read #results", "GET", "/api/channels/results/posts", params={"limit": 30})
    a.call(record, "read #discussion", "GET", "/api/channels/discussion/posts", params={"limit": 20})
    a.call(record, "results table", "GET", "/api/results", params={"platform": p, "limit": 20})
    leaves = a.call(record, "leaves", "GET", "/api/git/leaves").json()
    if a.leaf:
        a.call(record, "children", "GET", f"/api/git/commits/{a.leaf[:7]}/children")
    others = [c["hash"] for c in leaves if c["agent_id"] != a.name]
    if others and random.random() < 0.15:
        a.call(record, "fetch", "GET", f"/api/git/fetch/{random.choice(others)[:7]}")
        if a.leaf:
            a.call(record, "diff", "GET", f"/api/git/diff/{a.leaf[:7]}/{random.choice(others)[:7]}")
    idea = random.choice(IDEAS)
    val_bpb = a.best + random.gauss(0.009, 0.01) * a.best  # about one experiment in five improves
    crashed = random.random() < 0.05
    improved = not crashed and val_bpb < a.best and a.bundles
    sha = a.bundles[0][0] if improved else "%07x" % random.getrandbits(28)
    where = f"dataset:{a.dataset} profile:{a.profile}"
    if crashed:
        line = f"commit:{sha[:7]} platform:{p} val_bpb:--- vram_gb:--- {where} | {idea} (CRASH: out of memory)"
    else:
        verdict = "" if improved else " (DISCARD)"
        line = (f"commit:{sha[:7]} platform:{p} val_bpb:{val_bpb:.6f} vram_gb:{40 * a.best:.1f} {where} "
                f"| {idea}{verdict}")
    a.call(record, "post result", "POST", "/api/channels/results/posts", json={"content": line})
    if improved:
        sha, body = a.bundles.pop(0)
        a.call(record, "push", "POST", "/api/git/push", data=body)
        a.best, a.leaf = val_bpb, sha
    if random.random() < 0.2:
        note = random.choice(NOTES).format(p=p, i=idea)
        a.call(record, "post discussion", "POST", "/api/channels/discussion/posts", json={"content": note})
    if random.random() < 0.02:
        a.call(record, "dashboard", "GET", "/")

# ---------------------------------------------------------------------------
# Running and reporting


class Recorder:
    """Latency per call kind, and the pacing: with a rate, call k waits for its slot at start + k / rate."""

    def __init__(self, rate: float):
        self.latencies, self.errors = defaultdict(list), defaultdict(int)
        self.rate, self.lock = rate, threading.Lock()
        self.next_slot = time.perf_counter()

    def pace(self) -> None:
        if self.rate:
            with self.lock:
                slot, self.next_slot = self.next_slot, max(self.next_slot, time.perf_counter() - 1) + 1 / self.rate
            time.sleep(max(0.0, slot - time.perf_counter()))

    def __call__(self, kind: str, seconds: float, status: int) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            if status >= 400:
                self.errors[kind] += 1


def run_load(agents: list[SimAgent], workers: int, seconds: float, rate: float) -> tuple[Recorder, float]:
    record = Recorder(rate)
    deadline = time.perf_counter() + seconds

    def worker(mine):
        while time.perf_counter() < deadline:
            for agent in mine:
                experiment(agent, agents, record)

    threads = [threading.Thread(target=worker, args=(agents[i::workers],)) for i in range(workers)]
    t0 = record.next_slot = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return record, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} CPUs"
    except (OSError, KeyError):
        return "unknown CPU"


def summarize(record: Recorder) -> list[dict]:
    """Count, errors, p50 and p99 per call kind, the most frequent first, then all calls together."""
    kinds = sorted(record.latencies.items(), key=lambda kv: -len(kv[1]))
    kinds.append(("all", [dt for _, values in kinds for dt in values]))
    errors = {**record.errors, "all": sum(record.errors.values())}
    return [dict(call=kind, count=len(values), errors=errors.get(kind, 0), p50_ms=1000 * percentile(values, .5),
                 p99_ms=1000 * percentile(values, .99)) for kind, values in kinds]


def report(record: Recorder, elapsed: float, args) -> None:
    rows, machine = summarize(record), cpu_model()
    pacing = f"paced at {args.rate:g} requests/s" if args.rate else "flat out"
    size = f", a hub of {LARGE_COMMITS:,} commits and {LARGE_POSTS:,} posts" if args.large else ""
    print(f"hub load: {args.agents} agents on {args.workers} client threads, {pacing}{size}, {elapsed:.1f} s; "
          f"{machine}")
    print(f"{'call':<18}{'count':>7}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(f"{r['call']:<18}{r['count']:>7}{r['errors']:>8}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")
    rate = rows[-1]["count"] / elapsed
    print(f"throughput: {rate:.0f} requests/s, p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms; at "
          f"~10 calls per 5-minute experiment that is ~{rate * 30:,.0f} agents")
    name = (f"hub-load-{harness.slug(machine)}-{'large-' if args.large else ''}"
            f"{f'rate{args.rate:g}' if args.rate else 'flat-out'}.json")
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, date=datetime.date.today().isoformat(), large=args.large,
                                   agents=args.agents,
                                   workers=args.workers, seconds=args.seconds, rate=args.rate, elapsed=elapsed,
                                   requests_per_second=rate, calls=rows), indent=1))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agents", type=harness.at_least(1), default=24)
    p.add_argument("--workers", type=harness.at_least(1), default=8, help="client threads sending calls at once")
    p.add_argument("--seconds", type=harness.at_least(0.1, float), default=15.0)
    p.add_argument("--rate", type=harness.at_least(0, float), default=0,
                   help="requests/s to pace the calls at (default: flat out)")
    p.add_argument("--pushes", type=harness.at_least(1), default=12,
                   help="bundles prebuilt per agent (its improvements)")
    p.add_argument("--keep", type=Path, help="use this folder for the hub's data and keep it afterwards")
    p.add_argument("--large", action="store_true",
                   help=f"fill the hub with {LARGE_COMMITS:,} commits and {LARGE_POSTS:,} #results posts first")
    p.add_argument("--out", type=Path, help="JSON file to write (default bench/results/hub-load-<machine>-...json)")
    args = p.parse_args()
    if args.workers > args.agents:  # a thread without agents would spin for the whole run
        p.error(f"--workers {args.workers}: at most --agents ({args.agents})")

    with tempfile.TemporaryDirectory() as tmp:
        data = args.keep or Path(tmp) / "data"
        baseline = make_baseline(Path(tmp) / "baseline")
        if args.large:
            started = time.perf_counter()
            fill(data, baseline, LARGE_COMMITS, LARGE_POSTS)
            print(f"filled the hub with {LARGE_COMMITS} commits and {LARGE_POSTS} #results posts in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        port, log = free_port(), Path(tmp) / "hub.log"
        hub = harness.start_hub(data, port, ADMIN_KEY, log, baseline)
        try:
            url = f"http://127.0.0.1:{port}"
            harness.wait_for_hub(url, hub, log)
            names = list(PLATFORMS)
            agents = [SimAgent(url, f"agent-{i:02d}-{names[i % len(names)].lower()}", names[i % len(names)],
                               Path(tmp) / "repos", args.pushes) for i in range(args.agents)]
            for channel in ("results", "discussion"):
                agents[0].http.post(f"{url}/api/channels", json={"name": channel, "description": channel})
            record, elapsed = run_load(agents, args.workers, args.seconds, args.rate)
        finally:
            hub.terminate()
            hub.wait()
    report(record, elapsed, args)


if __name__ == "__main__":
    main()
