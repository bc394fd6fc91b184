"""
Run a command that may be hostile, such as another agent's train.py, without the hub's key and without network.

    python3 sandbox.py -- uv run train.py            # program-hub.md's `run` block
    AUTORESEARCH_SANDBOX=off python3 sandbox.py -- uv run train.py   # the human's choice where it cannot confine

The command runs in new user, mount, PID and network namespaces (`unshare` from util-linux), so it gets:
- an environment without HUB, HUB_KEY, HUB_ADMIN_KEY or any variable named like a key, token, secret or password;
- no network but a loopback of its own: it cannot reach the hub, or anything else;
- the agents' key folder (~/.config/autoresearch) and the checkout's .agenthub/ hidden under empty tmpfs;
- every file system read-only except /tmp, /dev and /dev/shm: the GPU device nodes work and the dataset cache
  reads, but the command cannot plant code for later (git hooks, ~/.gitconfig, .venv, prepare.py);
- no other process visible, so not the agent's environment through /proc; killing `unshare` kills them all.
Where the kernel allows no user namespace, it prints one line and exits 3 before running anything: the human
decides, and AUTORESEARCH_SANDBOX=off then runs the command with the cleaned environment only, saying so.
Only the standard library, so any python3 runs it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

NAMESPACES = ["unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--fork", "--kill-child",
              "--mount-proc"]
SECRET_RE = re.compile(r"HUB|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
WRITABLE = ("/tmp", "/dev", "/proc", "/sys")  # and what is mounted below them
CANNOT_CONFINE = 3
# the home folder is read-only inside: uv locks its cache even with nothing to install, Triton writes its kernels
CACHES = {"UV_CACHE_DIR": "/tmp/autoresearch-sandbox/uv", "TRITON_HOME": "/tmp/autoresearch-sandbox"}


def key_folder() -> Path:
    """Where program-hub.md keeps the agents' keys: the user's config folder, outside every checkout."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "autoresearch"


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not SECRET_RE.search(k)}


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if not any(p == w or p.startswith(w + "/") for w in WRITABLE)]


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def confine(hidden: list[str]) -> None:
    """Inside the namespaces, before the command: hide the secrets, then make all but WRITABLE read-only, the
    checkout (the working folder) included even where it lies in /tmp."""
    checkout = os.getcwd()
    # binds first: a bind leaves out the mounts below its source, so a tmpfs made before would hide nothing
    mount("--bind", "/tmp", "/tmp")  # a mount of its own, which the read-only root leaves writable
    mount("--bind", checkout, checkout)
    for folder in hidden:
        mount("-t", "tmpfs", "-o", "mode=700,size=64k", "none", folder)
    for point in [*mount_points(), checkout, *hidden]:
        mount("-o", "remount,bind,ro", point)
    os.chdir(checkout)  # the folder through the new mount, not the old one


def can_confine() -> str | None:
    """None when the namespaces can be made here, else why not in a few words."""
    try:
        probe = subprocess.run([*NAMESPACES, "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    lines = probe.stderr.strip().splitlines()
    return None if probe.returncode == 0 else (lines[-1] if lines else f"unshare exited {probe.returncode}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--inside"]:  # the second stage, already inside the namespaces
        split = argv.index("--")
        confine(argv[1:split])
        os.execvp(argv[split + 1], argv[split + 1:])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python3 sandbox.py -- COMMAND...")
    if os.environ.get("AUTORESEARCH_SANDBOX") == "off":
        print("sandbox: off (AUTORESEARCH_SANDBOX=off): the command sees the network and your files, not the key "
              "variables", file=sys.stderr, flush=True)
        os.execvpe(argv[0], argv, clean_env())
    why = can_confine()
    if why:
        print(f"sandbox: cannot confine the run here ({why}); nothing ran. Your human decides: "
              "AUTORESEARCH_SANDBOX=off runs it with the network and your files", file=sys.stderr, flush=True)
        sys.exit(CANNOT_CONFINE)
    keys = key_folder()
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)  # a mount point for the tmpfs that hides it
    hidden = [str(keys)] + [str(p) for p in [Path(".agenthub").resolve()] if p.is_dir()]
    os.execvpe(NAMESPACES[0], [*NAMESPACES, sys.executable, str(Path(__file__).resolve()), "--inside", *hidden,
                               "--", *argv], {**clean_env(), **CACHES})


if __name__ == "__main__":
    main(sys.argv[1:])
