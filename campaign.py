"""
Run an experiment plan unattended, the way program.md says, with no coding agent: a baseline, then each experiment
(an edit of train.py's constants) as its own commit on top of the baseline, screened against the baseline by
program.md's noise rule with its re-run, crashes logged as crashes, every run a row of results.tsv, and at the end
one more run with every kept edit combined.

Usage: uv run campaign.py PLAN.toml [--workers N | --gpus 0,1,...] [--tag TAG] [--shard K/N] [--sigma S] [--hub URL]

A plan (campaigns/ has two):

    [campaign]
    name = "muon-tuning"

    [[experiment]]
    id = "NS-1"
    description = "3 orthogonalisation steps"
    edits = { NS_STEPS = 3 }

An edit sets a constant of train.py; a string stays a string literal, an array becomes a tuple. A constant set per
profile is edited in the branch that runs here. Run from the top of the repository: the commit checked out now is the
baseline, and branch autoresearch/<tag> (the tag is the plan's name unless --tag) marks it; at the end the branch
moves to the best kept commit. Runs happen in git worktrees under .campaign/<tag>/, beside their logs, so this
checkout is never touched. Running the same command again after Ctrl-C, a crash or a reboot continues where it
stopped and never runs a finished experiment again.
"""
import argparse
import fcntl
import math
import os
import queue
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness

RUN_TIMEOUT = 900    # seconds before a run is stopped and counted as a crash (program.md's `timeout 900`)
KILL_AFTER = 30      # seconds from its SIGTERM to its SIGKILL (program.md's `timeout --kill-after=30`)
COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
HEADER = "\t".join(COLUMNS) + "\n"
RESERVED_IDS = {"baseline", "combined"}
SIGMA_SEEDS = (43, 44)  # program.md's two re-runs of the baseline when σ is not in its table
LIVE = set()          # running train.py processes, stopped on Ctrl-C
LOCK = threading.Lock()


def fail(message):
    raise SystemExit(f"campaign: {message}")

# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------

def python_literal(value, where):
    """A TOML value as Python source: strings stay string literals, arrays become tuples."""
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            fail(f"{where}: {value} is not a finite number")
        return repr(value)
    if isinstance(value, list):
        items = [python_literal(v, where) for v in value]
        return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
    fail(f"{where}: a {type(value).__name__} cannot be a constant: use a number, a string, a boolean or an array")


def load_plan(path):
    """(name, [experiment]) with each experiment dict(id, description, edits={NAME: Python source}); any problem
    is one line naming the plan, the experiment and what to fix."""
    try:
        plan = tomllib.loads(Path(path).read_text())
    except OSError as e:
        fail(f"cannot read the plan {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        fail(f"{path} is not valid TOML: {e}")
    name = plan.get("campaign", {}).get("name")
    if not isinstance(name, str) or not name:
        fail(f"{path}: give the campaign a name: [campaign] name = \"...\"")
    experiments, seen = [], set()
    for i, exp in enumerate(plan.get("experiment", []), 1):
        eid = exp.get("id")
        if not isinstance(eid, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", eid):
            fail(f"{path}: experiment {i} needs an id of letters, digits, '.', '_' or '-', e.g. id = \"NS-1\"")
        if eid in seen or eid.lower() in RESERVED_IDS:
            fail(f"{path}: experiment id {eid!r} is " + ("used twice" if eid in seen else "reserved") + ": rename it")
        seen.add(eid)
        edits = exp.get("edits")
        if not isinstance(edits, dict) or not edits:
            fail(f"{path}: experiment {eid} has no edits: edits = {{ NAME = value }}")
        unknown = set(exp) - {"id", "description", "edits"}
        if unknown:
            fail(f"{path}: experiment {eid} has unknown key(s) {', '.join(sorted(unknown))}: use id, description, edits")
        description = " ".join(str(exp.get("description", "")).split())  # no tabs or newlines in a row
        experiments.append(dict(id=eid, description=description,
                                edits={k: python_literal(v, f"{path}: experiment {eid}, {k}") for k, v in edits.items()}))
    if not experiments:
        fail(f"{path}: no experiments: add [[experiment]] tables")
    return name, experiments


def next_seed(source):
    """One more than train.py's SEED: the re-run's other random draws."""
    return int(re.search(r"^SEED = (\d+)", source, flags=re.M).group(1)) + 1


def edited_source(source, exp, profile):
    """train.py of the baseline with the experiment's edits, or a clear error naming the experiment."""
    try:
        edited = harness.edit_constants(source, exp["edits"], profile)
        compile(edited, "train.py", "exec")
    except ValueError as e:
        fail(f"experiment {exp['id']}: {e}: check the constant's name in train.py")
    except SyntaxError as e:
        fail(f"experiment {exp['id']}: the edit leaves train.py invalid ({e.msg}, line {e.lineno})")
    return edited

# ---------------------------------------------------------------------------
# Git: commits made with plumbing, so no checkout changes (harness.py runs git and makes the worktrees)
# ---------------------------------------------------------------------------

def identity(repo):
    """Commit author from git's config, or a placeholder for this process only (as program.md's setup does)."""
    env = {}
    for key, var, default in (("user.name", "NAME", "autoresearch campaign"), ("user.email", "EMAIL", "campaign@localhost")):
        if subprocess.run(["git", "config", key], cwd=repo, capture_output=True).returncode:
            env[f"GIT_AUTHOR_{var}"] = env[f"GIT_COMMITTER_{var}"] = default
    return env


def commit_edit(repo, tag, name, baseline, source, message):
    """The commit `baseline` + train.py = source, kept under refs/campaigns/<tag>/<name>; on a resume the existing
    one, provided it still holds this source."""
    ref = f"refs/campaigns/{tag}/{name}"
    existing = harness.ref_commit(repo, ref)
    if existing:
        if harness.git("show", f"{existing}:train.py", cwd=repo) != source.rstrip("\n"):
            fail(f"{name}: its edits differ from its commit {existing[:7]} of an earlier run of this campaign: "
                 "restore the plan or start another with --tag")
        return existing
    blob = harness.git("hash-object", "-w", "--stdin", cwd=repo, input=source)
    entries = [line if line.split("\t")[1] != "train.py" else f"100644 blob {blob}\ttrain.py"
               for line in harness.git("ls-tree", baseline, cwd=repo).splitlines()]
    tree = harness.git("mktree", cwd=repo, input="\n".join(entries) + "\n")
    commit = harness.git("commit-tree", tree, "-p", baseline, "-m", message, cwd=repo, env=identity(repo))
    harness.git("update-ref", ref, commit, cwd=repo)
    return commit


def find_baseline(repo, tag, orphan):
    """(baseline commit, new): the one of an earlier run of this tag, else HEAD. `orphan`: HEAD's files in a commit
    without history, as program-hub.md's setup makes for the hub."""
    baseline = harness.ref_commit(repo, f"refs/campaigns/{tag}/baseline")
    if baseline:
        return baseline, False
    if harness.ref_commit(repo, f"refs/heads/autoresearch/{tag}"):
        fail(f"branch autoresearch/{tag} exists already and is not this campaign's: choose another --tag")
    if harness.git("status", "--porcelain", "--", "train.py", cwd=repo):
        print("note: train.py has uncommitted changes; the baseline is the committed one")
    head = harness.git("rev-parse", "HEAD", cwd=repo)
    if orphan:
        return harness.git("commit-tree", f"{head}^{{tree}}", "-m", "baseline", cwd=repo, env=identity(repo)), True
    return head, True

# ---------------------------------------------------------------------------
# Runs and rows
# ---------------------------------------------------------------------------

def run_commit(repo, path, commit, log, env):
    """Run train.py of `commit` in the worktree at `path`, output into `log`. Returns dict(summary, hardware,
    crash): crash is None for a run that printed its summary, else why not, in a few words."""
    harness.git("checkout", "--detach", "--force", "--quiet", commit, cwd=path)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "train.py"], cwd=path, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True)
        LIVE.add(proc)
        try:
            proc.wait(timeout=RUN_TIMEOUT)
            timed_out = False
        except subprocess.TimeoutExpired:
            harness.stop([proc], KILL_AFTER)
            timed_out = True
        finally:
            LIVE.discard(proc)
    text = Path(log).read_text(errors="replace")
    summary = harness.read_summary(text)
    crash = None
    if timed_out:
        crash = f"timeout after {RUN_TIMEOUT} s"
    elif "val_bpb" not in summary:
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        crash = (lines[-1] if lines else f"exit {proc.returncode}, no output")[:120].replace("\t", " ")
    return dict(summary=summary, hardware=hardware(text), crash=crash)


def hardware(text):
    """The hardware of a run's start-up line `device:    cpu (AMD EPYC, 2 threads)`, or None."""
    found = re.search(r"^device:\s+\w+ \((.*)\)$", text, re.M)
    return found.group(1) if found else None


def read_rows(results):
    header, rows = harness.read_results(results)
    if header is not None and header + "\n" != HEADER:
        fail(f"{results} has another header than program.md's five columns: move it away")
    return [dict(zip(COLUMNS, row)) for row in rows if len(row) == len(COLUMNS)]


def append_row(results, commit, result, status, description):
    """One whole line, appended under an exclusive lock: two campaigns (or an agent) writing at once never tear a
    row."""
    val = result["summary"].get("val_bpb", "0.000000") if not result["crash"] else "0.000000"
    mb = result["summary"].get("peak_vram_mb", "n/a")
    gb = "0.0" if result["crash"] or mb == "n/a" else f"{float(mb) / 1024:.1f}"
    line = f"{commit[:7]}\t{val}\t{gb}\t{status}\t{description}\n"
    with LOCK, open(results, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if f.tell() == 0:
            f.write(HEADER)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return dict(commit=commit[:7], val_bpb=val, memory_gb=gb, status=status, description=description)


def rows_of(rows, commit):
    return [r for r in rows if commit.startswith(r["commit"]) and r["commit"]]

# ---------------------------------------------------------------------------
# The noise rule of program.md
# ---------------------------------------------------------------------------

def screen(best, new, sigma):
    """program.md's rule for a first run: discard, keep, or re-run (a gain within 3σ). Compared at the six
    decimals of results.tsv, so 1.0 - 0.97 is exactly 3σ = 0.03, not a float's hair above it."""
    gain = round(best - new, 6)
    if gain <= 0:
        return "discard"
    return "keep" if gain > round(3 * sigma, 6) else "rerun"


def rescreen(best, first, second, sigma):
    """(status, M) after the re-run: keep when M, the mean of the two runs, beats best by more than 2σ."""
    mean = round((first + second) / 2, 6)
    return ("keep" if round(best - mean, 6) > round(2 * sigma, 6) else "discard"), mean


def sigma_from_table(program, label):
    """σ from program.md's Noise table for a platform label (hardware, device, precision, profile, dataset), or
    None when no row matches all five."""
    for line in program.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and tuple(cells[:5]) == label:
            try:
                return float(cells[5])
            except ValueError:
                return None
    return None


def platform_label(result):
    s = result["summary"]
    return (result["hardware"], s.get("device"), s.get("precision"), s.get("profile"),
            s.get("dataset", "").split("-")[0])

# ---------------------------------------------------------------------------
# Sharing through the hub: program-hub.md's calls
# ---------------------------------------------------------------------------

class Hub:
    """Register once (.agenthub/creds, as program-hub.md keeps it), post every row to #results in its format, and
    push each kept commit: the hub ranks a result only for a commit its poster pushed."""

    def __init__(self, url, repo):
        import requests
        self.url, self.repo, self.http, self.lock = url.rstrip("/"), repo, requests.Session(), threading.Lock()
        self.platform = self.dataset = self.profile = None
        creds = repo / ".agenthub" / "creds"
        if not creds.exists():
            name = os.environ.get("AGENT_NAME") or f"campaign-{socket.gethostname()[:30]}-{secrets.token_hex(3)}"
            key = self.call("/api/register", json={"id": name}, key=os.environ.get("HUB_ADMIN_KEY"))["api_key"]
            creds.parent.mkdir(exist_ok=True)
            fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'export HUB_KEY="{key}"\nexport AGENT_ID="{name}"\n')
        found = dict(re.findall(r'export (\w+)="([^"]*)"', creds.read_text()))
        self.key, self.agent = found.get("HUB_KEY"), found.get("AGENT_ID")
        if not self.key:
            fail(f"{creds} holds no HUB_KEY: delete it to register again")
        self.call("/api/channels", json={"name": "results", "description": "results"}, allow=(409,))

    def call(self, path, allow=(), key=None, **body):
        import requests
        headers = {"Authorization": f"Bearer {key or getattr(self, 'key', None)}"} if key or hasattr(self, "key") else {}
        try:
            reply = self.http.post(self.url + path, headers=headers, timeout=60, **body)
        except requests.RequestException as e:
            fail(f"hub {self.url} unreachable ({type(e).__name__}): check --hub")
        if reply.status_code >= 400 and reply.status_code not in allow:
            fail(f"hub {path}: {reply.status_code} {reply.text[:200]}")
        return reply.json()

    def post(self, row, result, commit):
        """The row to #results, a kept commit pushed with it. A hub error here is printed, not fatal: the row is in
        results.tsv already."""
        if result["summary"].get("dataset") and self.dataset is None:  # the baseline's, for crashed runs too
            self.platform = harness.slug(result["hardware"] or "unknown")
            self.dataset, self.profile = result["summary"]["dataset"], result["summary"]["profile"]
        prefix = {"discard": "DISCARD: ", "crash": "CRASH: "}.get(row["status"], "")
        content = (f"commit:{row['commit']} platform:{self.platform} val_bpb:{row['val_bpb']} "
                   f"vram_gb:{row['memory_gb']} dataset:{self.dataset} profile:{self.profile} | "
                   f"{prefix}{row['description']}")
        with self.lock:
            try:
                if row["status"] == "keep":
                    bundle = self.repo / ".agenthub" / "push.bundle"
                    ref = harness.git("for-each-ref", "--points-at", commit, "--format=%(refname)", "refs/campaigns/",
                              cwd=self.repo).split()[0]  # a bundle names its tip by a ref
                    harness.git("bundle", "create", "--quiet", str(bundle), ref, cwd=self.repo)
                    self.call("/api/git/push", data=bundle.read_bytes())
                self.call("/api/channels/results/posts", json={"content": content})
            except (SystemExit, harness.GitError) as e:
                print(f"warning: {e}", flush=True)

# ---------------------------------------------------------------------------
# The campaign
# ---------------------------------------------------------------------------

class Campaign:
    def __init__(self, repo, tag, experiments, worker_envs, sigma, hub):
        self.repo, self.tag, self.experiments, self.sigma_given, self.hub = repo, tag, experiments, sigma, hub
        self.results = repo / "results.tsv"
        self.dir = repo / ".campaign" / tag
        self.baseline, new = find_baseline(repo, tag, orphan=hub is not None)
        self.source = harness.git("show", f"{self.baseline}:train.py", cwd=repo) + "\n"
        self.profile = worker_profile(repo, worker_envs[0])
        for exp in experiments:  # every edit checked before anything is made or run
            exp["source"] = edited_source(self.source, exp, self.profile)
        if new:
            harness.git("branch", f"autoresearch/{tag}", self.baseline, cwd=repo)
            harness.git("update-ref", f"refs/campaigns/{tag}/baseline", self.baseline, cwd=repo)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.free = queue.Queue()  # (worktree path, env) of idle workers
        for k, env in enumerate(worker_envs):
            harness.add_worktree(repo, self.dir / f"worktree-{k}", self.baseline)
            self.free.put((self.dir / f"worktree-{k}", env))
        self.workers = len(worker_envs)

    def run(self, commit, name):
        """One run of `commit` on the next free worker; its log is .campaign/<tag>/<name>.log."""
        path, env = self.free.get()
        try:
            return run_commit(self.repo, path, commit, self.dir / f"{name}.log", env)
        finally:
            self.free.put((path, env))

    def log(self, commit, result, status, description):
        """Append the row, print it, post it to the hub; returns it."""
        row = append_row(self.results, commit, result, status, description)
        shown = row["val_bpb"] if not result["crash"] else f"crash ({result['crash']})"
        print(f"{row['commit']} {shown} {status:7} {description}", flush=True)
        if self.hub:
            self.hub.post(row, result, commit)
        return row

    def baseline_run(self):
        """(val_bpb, platform label) of the baseline: its row, or a first run now."""
        rows = rows_of(read_rows(self.results), self.baseline)
        done = [r for r in rows if r["description"] == "baseline"]
        result = None
        if not done:
            result = self.run(self.baseline, "baseline")
            self.log(self.baseline, result, "crash" if result["crash"] else "keep", "baseline")
            if result["crash"]:
                fail(f"the baseline crashed ({result['crash']}): see {self.dir / 'baseline.log'}")
        elif done[0]["status"] == "crash":
            fail(f"the baseline crashed in an earlier run (see {self.dir / 'baseline.log'}): fix it, then use "
                 "another --tag")
        text = (self.dir / "baseline.log").read_text(errors="replace") if (self.dir / "baseline.log").exists() else ""
        label = platform_label(dict(summary=harness.read_summary(text), hardware=hardware(text)))
        return float(done[0]["val_bpb"] if done else result["summary"]["val_bpb"]), label

    def sigma(self, best, label):
        """σ: --sigma, else program.md's table for this platform (its label names the threads a run had), else
        measured as program.md says, from the baseline and two re-runs with SEEDs 43 and 44."""
        if self.sigma_given is not None:
            return self.sigma_given, "--sigma"
        program = harness.git("show", f"{self.baseline}:program.md", cwd=self.repo)
        table = sigma_from_table(program, label)
        if table is not None:
            return table, f"program.md's table for {', '.join(map(str, label))}"
        values = [best]
        def rerun(seed):
            exp = dict(id=f"seed{seed}", edits={"SEED": str(seed)})
            commit = commit_edit(self.repo, self.tag, f"seed{seed}", self.baseline,
                                 edited_source(self.source, exp, self.profile), f"baseline re-run (SEED {seed})")
            description = f"baseline re-run (SEED {seed})"
            done = [r for r in rows_of(read_rows(self.results), commit) if r["description"] == description]
            if done:
                return done[0]
            result = self.run(commit, f"seed{seed}")
            return self.log(commit, result, "crash" if result["crash"] else "discard", description)
        with ThreadPoolExecutor(self.workers) as pool:
            for row in pool.map(rerun, SIGMA_SEEDS):
                if row["status"] == "crash":
                    fail(f"{row['description']} crashed: σ cannot be measured; see the logs in {self.dir}")
                values.append(float(row["val_bpb"]))
        return statistics.stdev(values), "measured over the baseline and SEEDs 43, 44 (not in program.md's table)"

    def experiment(self, exp, best, sigma):
        """Run one experiment to its decision (the re-run included) unless results.tsv has it; returns (status,
        value it is judged by, commit). The re-run is a commit on top with SEED one higher, as in program.md: on a
        CPU the same commit would give nearly the same val_bpb again."""
        commit = commit_edit(self.repo, self.tag, exp["id"], self.baseline, exp["source"],
                             f"{exp['id']}: {exp['description'] or 'campaign experiment'}\n\n" +
                             "\n".join(f"{k} = {v}" for k, v in exp["edits"].items()))
        description = f"{exp['id']} {exp['description']}".strip()
        rows = rows_of(read_rows(self.results), commit)
        if rows and not rows[0]["description"].endswith("(within noise)"):  # decided before by its one run
            status = rows[0]["status"]
            return status, None if status == "crash" else float(rows[0]["val_bpb"]), commit
        if rows:  # the first run was within noise: only its re-run may be left
            first = float(rows[0]["val_bpb"])
        else:
            result = self.run(commit, exp["id"])
            if result["crash"]:
                self.log(commit, result, "crash", f"{description} ({result['crash']})")
                return "crash", None, commit
            first = float(result["summary"]["val_bpb"])
            decision = screen(best, first, sigma)
            if decision != "rerun":
                self.log(commit, result, decision, description)
                return decision, first, commit
            self.log(commit, result, "discard", f"{description} (within noise)")
        seed = next_seed(exp["source"])
        rerun = commit_edit(self.repo, self.tag, f"{exp['id']}-rerun", commit,
                            harness.edit_constants(exp["source"], {"SEED": str(seed)}),
                            f"{exp['id']}: re-run, SEED {seed}")
        done = rows_of(read_rows(self.results), rerun)
        if done:
            status, second = done[0]["status"], done[0]["val_bpb"]
            return status, None if status == "crash" else rescreen(best, first, float(second), sigma)[1], rerun
        result = self.run(rerun, f"{exp['id']}-rerun")
        if result["crash"]:
            self.log(rerun, result, "crash", f"{description} (re-run; {result['crash']})")
            return "crash", None, rerun
        status, mean = rescreen(best, first, float(result["summary"]["val_bpb"]), sigma)
        self.log(rerun, result, status, f"{description} (re-run; mean {mean:.6f})" if status == "keep"
                 else f"{description} (re-run)")
        return status, mean, rerun

    def combined(self, outcomes, best, sigma):
        """The kept experiments' edits together, one more row; where two set one constant, the better one's
        value. Returns its outcome, or None when fewer than two were kept."""
        kept = sorted((value, exp["id"]) for exp, (status, value, _) in outcomes if status == "keep")
        if len(kept) < 2:
            return None
        by_id = {exp["id"]: exp for exp, _ in outcomes}
        edits = {}
        for _, eid in reversed(kept):  # the best experiment last, so its values win
            edits.update(by_id[eid]["edits"])
        if edits == by_id[kept[0][1]]["edits"]:
            print("combined: the kept experiments set the same constants, so together they are the best one alone")
            return None
        ids = " + ".join(eid for _, eid in kept)
        exp = dict(id="combined", description=f"all kept: {ids}", edits=edits)
        exp["source"] = edited_source(self.source, exp, self.profile)
        return self.experiment(exp, best, sigma)

    def finish(self, results):
        """Move branch autoresearch/<tag> to the best kept commit and remove the worktrees."""
        kept = [(value, commit) for status, value, commit in results if status == "keep"]
        target = min(kept)[1] if kept else self.baseline
        branch = f"refs/heads/autoresearch/{self.tag}"
        if f"branch {branch}\n" in harness.git("worktree", "list", "--porcelain", cwd=self.repo) + "\n":
            print(f"branch autoresearch/{self.tag} is checked out, so it stays; the best kept commit is {target[:7]}")
        else:
            harness.git("update-ref", branch, target, cwd=self.repo)
            print(f"branch autoresearch/{self.tag} is at {target[:7]}" + (" (the best kept)" if kept else
                  " (the baseline: nothing was kept)"))
        for k in range(self.workers):
            path = self.dir / f"worktree-{k}"
            if path.exists():
                harness.git("worktree", "remove", "--force", str(path), cwd=self.repo)


def worker_profile(repo, env):
    """The profile train.py will run under in a worker's environment (prepare.py decides it)."""
    result = subprocess.run([sys.executable, "-c", "import prepare; print(prepare.PROFILE)"], cwd=repo,
                            capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode:
        fail((result.stderr.strip().splitlines() or ["prepare.py failed to load"])[-1])
    return result.stdout.split()[-1]


def worker_envs(args):
    """One environment per worker: a GPU each with --gpus; on a CPU, the cores split between the workers."""
    if args.gpus is not None:
        return [{"CUDA_VISIBLE_DEVICES": g} for g in args.gpus]
    if args.workers == 1:
        return [{}]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.workers))
    return [{"OMP_NUM_THREADS": threads} for _ in range(args.workers)]


def parse_gpus(text):
    gpus = [g.strip() for g in text.split(",")]
    if not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: list distinct GPU indices, e.g. 0,1,2,3")
    return gpus


def parse_shard(text):
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r}: write K/N with 1 <= K <= N, e.g. 1/2")
    return int(match.group(1)), int(match.group(2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="the plan, a TOML file (campaigns/*.toml)")
    parallel = parser.add_mutually_exclusive_group()
    parallel.add_argument("--workers", type=harness.at_least(1), default=1,
                          help="runs at once on this CPU (default 1; more share the cores: see the README)")
    parallel.add_argument("--gpus", type=parse_gpus, help="GPU indices, one run on each at once, e.g. 0,1,2,3")
    parser.add_argument("--tag", help="branch autoresearch/<tag> (default: the plan's name)")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1),
                        help="K/N: run every N-th experiment from the K-th, to split a plan over N machines")
    parser.add_argument("--sigma", type=harness.at_least(0.0, float),
                        help="σ of val_bpb for the noise rule (default: program.md's table, else measured)")
    parser.add_argument("--hub", help="post every row to this hub and push kept commits (program-hub.md)")
    args = parser.parse_args()

    name, experiments = load_plan(args.plan)
    tag = args.tag or name
    if subprocess.run(["git", "check-ref-format", "--branch", f"autoresearch/{tag}"], capture_output=True).returncode:
        fail(f"{tag!r} cannot be part of a branch name: choose another --tag")
    inside = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if inside.returncode or not (Path(inside.stdout.strip()) / "train.py").exists():
        fail("run it from the top of an autoresearch checkout (a git repository with train.py)")
    repo = Path(inside.stdout.strip())
    k, n = args.shard
    experiments = experiments[k - 1::n]
    if os.environ.get("AUTORESEARCH_TIME_BUDGET"):
        print(f"WARNING: AUTORESEARCH_TIME_BUDGET={os.environ['AUTORESEARCH_TIME_BUDGET']}: every run is shortened, "
              "results are not comparable with full runs")
    hub = None
    if args.hub:
        hub = Hub(args.hub, repo)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted)
    campaign = Campaign(repo, tag, experiments, worker_envs(args), args.sigma, hub)
    print(f"campaign {name}: {len(experiments)} experiments" + (f" (shard {k}/{n})" if n > 1 else "") +
          f", {campaign.workers} at once, baseline {campaign.baseline[:7]} on branch autoresearch/{tag}, "
          f"profile {campaign.profile}, logs in {campaign.dir.relative_to(repo)}/", flush=True)
    best, label = campaign.baseline_run()
    sigma, why = campaign.sigma(best, label)
    print(f"baseline {best:.6f}, σ {sigma:.6f} ({why}): keep a gain over 3σ = {3 * sigma:.6f}, re-run one within it",
          flush=True)
    with ThreadPoolExecutor(campaign.workers) as pool:
        outcomes = list(zip(experiments, pool.map(lambda e: campaign.experiment(e, best, sigma), experiments)))
    results = [outcome for _, outcome in outcomes]
    combined = campaign.combined(outcomes, best, sigma)
    if combined:
        results.append(combined)
    campaign.finish(results)


def interrupted(signum, frame):
    """Ctrl-C or SIGTERM: stop every run (their rows are not written, so a resume runs them again) and exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for proc in list(LIVE):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print("\ncampaign: interrupted; run the same command again to resume", flush=True)
    os._exit(130)


if __name__ == "__main__":
    try:
        main()
    except harness.GitError as e:  # one line, as every other refusal
        fail(e)
