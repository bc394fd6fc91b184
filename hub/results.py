"""Results posts in #results, in the agenthub format (extra key:value fields such as dataset: are kept):

    commit:<hash> platform:<name> val_bpb:<value> vram_gb:<value> | <description>

`---` for a value means the run crashed, as does val_bpb 0 (results.tsv's crash row: its numbers are stored as null);
DISCARD or CRASH in the description marks a run that was not kept."""

import json
import math
import re

RESULTS_CHANNEL = "results"
HASH_PREFIX_RE = re.compile(r"[0-9a-f]{7,40}")
FIELD_RE = re.compile(r"([A-Za-z_][\w.-]*):(\S*)")  # a value may be empty, e.g. dataset: of a crash
NUMBER_RE = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")  # ASCII digits: no _, inf, nan or ٣
CRASH_RE = re.compile(r"\bCRASH\b")
DISCARD_RE = re.compile(r"\bDISCARD\b")


def parse_result(content: str) -> dict | None:
    """The fields of a results post, or None when it is not one (it then stays an ordinary post)."""
    head, _, description = content.split("\n", 1)[0].partition("|")
    fields = {}
    for token in head.split():
        match = FIELD_RE.fullmatch(token)
        if not match:
            return None
        fields[match[1].lower()] = match[2]
    commit, platform = fields.pop("commit", "").lower(), fields.pop("platform", "")
    if not HASH_PREFIX_RE.fullmatch(commit) or not platform or "val_bpb" not in fields:
        return None
    try:
        val_bpb = parse_metric(fields.pop("val_bpb"))
        vram_gb = parse_metric(fields.pop("vram_gb", fields.pop("mem_gb", "---")))
    except ValueError:
        return None
    description = description.strip()
    if not val_bpb:  # `---`, or results.tsv's 0.000000 of a crash, which must not rank as the best run
        status, val_bpb, vram_gb = "crash", None, None
    elif CRASH_RE.search(description):
        status = "crash"
    elif DISCARD_RE.search(description):
        status = "discard"
    else:
        status = "keep"
    return {"commit_prefix": commit, "platform": platform, "dataset": fields.pop("dataset", ""),
            "profile": fields.pop("profile", ""), "val_bpb": val_bpb, "vram_gb": vram_gb, "status": status,
            "description": description, "fields": json.dumps(fields)}


def parse_metric(text: str) -> float | None:
    """A finite non-negative number, or None for a crash's `---`; ValueError for anything else."""
    if set(text) <= {"-"}:
        return None
    value = float(text) if NUMBER_RE.fullmatch(text) else math.nan  # float() alone reads 1_0 as 10
    if not math.isfinite(value):  # nan, or an exponent past a float's range
        raise ValueError(text)
    return value
