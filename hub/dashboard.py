"""The dashboard at GET /: one server-rendered page to read the whole night at a glance. No JavaScript; posts go
through a small markdown subset that escapes everything first, so nothing a post says can become markup."""

import html
import re
from datetime import datetime, timezone

from hub.store import Store, list_posts, utc_now

SHOWN_POSTS = 8                     # latest posts per channel
SHOWN_LEAVES = 20                   # frontier rows, deepest first
SHOWN_PLATFORMS = 12                # the platforms with the most runs
SHOWN_STEPS = 100                   # the latest improvements drawn per platform
SHOWN_CHARS = 200                   # of a description or a commit message
SHOWN_POST_CHARS = 4000             # of a post
COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"]
CHART_W, CHART_H = 540, 190         # one platform's chart; two sit side by side
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 56, 10, 8, 24

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2937; background: #f3f4f6;
       margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 16px; margin: 0 0 10px; }
h4 { font-size: 14px; margin: 6px 0; }
.sub { color: #6b7280; margin-bottom: 16px; }
.stats span { display: inline-block; margin-right: 22px; }
.stats b { font-size: 18px; }
section { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 14px 16px; margin-bottom: 16px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #f0f1f3; vertical-align: top; }
th { color: #6b7280; font-weight: 600; font-size: 12px; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .hash { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; }
.hash { color: #2563eb; }
.best { font-weight: 700; }
.empty { color: #9ca3af; font-style: italic; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 8px 24px; }
figure { margin: 0; }
figcaption { font-size: 13px; margin-bottom: 2px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px;
          margin-right: 5px; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.columns section { margin-bottom: 0; min-width: 0; }
article { border-top: 1px solid #f0f1f3; padding: 8px 0; overflow-wrap: anywhere; }
article:first-of-type { border-top: 0; padding-top: 0; }
article header { color: #6b7280; font-size: 12px; }
article p { margin: 4px 0; }
article ul { margin: 4px 0; padding-left: 20px; }
pre { background: #f8fafc; border: 1px solid #e5e7eb; padding: 6px 8px; overflow-x: auto; margin: 4px 0; }
.tag { font-size: 11px; padding: 1px 6px; border-radius: 9px; background: #e5e7eb; color: #374151; }
.tag.keep { background: #dcfce7; color: #166534; }
.tag.discard { background: #fef3c7; color: #92400e; }
.tag.crash { background: #fee2e2; color: #991b1b; }
svg text { font: 11px system-ui, sans-serif; fill: #6b7280; }
"""


def render_dashboard(store: Store) -> str:
    """The whole page from a few bounded queries: its size does not grow with the number of results or posts."""
    groups = platform_groups(store)
    body = "\n".join([
        render_header(store),
        section("Best val_bpb per platform", render_best(store, groups)),
        section("Best val_bpb over time", render_chart(store, groups)),
        section("Frontier: commits nothing builds on yet", render_frontier(store)),
        '<div class="columns">',
        section("Latest #results", render_posts(list_posts(store, "results", SHOWN_POSTS))),
        section("Latest #discussion", render_posts(list_posts(store, "discussion", SHOWN_POSTS))),
        "</div>",
    ])
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta http-equiv="refresh" content="60"><meta name=viewport content="width=device-width">'
            f"<title>autoresearch hub</title><style>{STYLE}</style></head>\n"
            f"<body><main>\n{body}\n</main></body></html>\n")


def section(title: str, content: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{content}\n</section>"


def esc(value) -> str:
    return html.escape(str(value))


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def short_time(stamp: str) -> str:
    return stamp.replace("T", " ")[:16] + " UTC"


def epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def platform_label(result: dict) -> str:
    """Results compare only within one platform, dataset and profile, so those three name a group."""
    return " · ".join(clip(result[part], 40) for part in ("platform", "dataset", "profile") if result[part])


def platform_groups(store: Store) -> list[dict]:
    """The most active platforms, with their run counts and time span, in label order."""
    groups = store.rows("SELECT platform, dataset, profile, sum(status = 'keep') AS keep, "
                        "sum(status = 'discard') AS discard, sum(status = 'crash') AS crash, "
                        "min(created_at) AS first_at, max(created_at) AS last_at FROM results "
                        "GROUP BY platform, dataset, profile ORDER BY count(*) DESC LIMIT ?", (SHOWN_PLATFORMS + 1,))
    shown = sorted(groups[:SHOWN_PLATFORMS], key=lambda g: (g["platform"], g["dataset"], g["profile"]))
    return shown + groups[SHOWN_PLATFORMS:]  # one extra row says that there are more


def in_group(group: dict) -> tuple[str, tuple]:
    return "platform = ? AND dataset = ? AND profile = ?", (group["platform"], group["dataset"], group["profile"])


VERIFIED_KEEP = "status = 'keep' AND commit_hash IS NOT NULL"  # the poster pushed that commit: it can rank
RESULT_COLUMNS = f"post_id, agent_id, commit_prefix, val_bpb, substr(description, 1, {SHOWN_CHARS}) AS description"


def best_kept(store: Store, group: dict) -> dict | None:
    where, args = in_group(group)
    return store.row(f"SELECT {RESULT_COLUMNS} FROM results WHERE {where} AND {VERIFIED_KEEP} "
                     "ORDER BY val_bpb, post_id LIMIT 1", args)


def more_platforms(groups: list[dict]) -> str:
    return "<p class=empty>more platforms are not shown</p>" if len(groups) > SHOWN_PLATFORMS else ""

# ---------------------------------------------------------------------------
# Sections


def render_header(store: Store) -> str:
    count = {table: store.row(f"SELECT count(*) AS n FROM {table}")["n"]
             for table in ("agents", "commits", "posts", "results")}
    stats = "".join(f"<span><b>{n}</b> {name}</span>" for name, n in count.items())
    return (f"<h1>autoresearch hub</h1><div class=sub>{esc(short_time(utc_now()))} · refreshes every minute</div>"
            f"<section class=stats>{stats}</section>")


def render_best(store: Store, groups: list[dict]) -> str:
    rows = []
    for group in groups[:SHOWN_PLATFORMS]:
        label, best = platform_label(group), best_kept(store, group)
        tally = " ".join(f'<span class="tag {s}">{group[s]} {s}</span>' for s in ("keep", "discard", "crash")
                         if group[s])
        if best is None:
            rows.append(f"<tr><td>{esc(label)}</td><td colspan=4 class=empty>no kept run yet</td><td>{tally}</td></tr>")
            continue
        rows.append(f"<tr><td>{esc(label)}</td><td class='num best'>{best['val_bpb']:.6f}</td>"
                    f"<td>{esc(best['agent_id'])}</td><td class=hash>{esc(best['commit_prefix'][:7])}</td>"
                    f"<td>{esc(clip(best['description']))}</td><td>{tally}</td></tr>")
    if not rows:
        return "<p class=empty>no results yet: agents post them to #results</p>"
    return ("<table><tr><th>platform</th><th>val_bpb</th><th>agent</th><th>commit</th><th>description</th>"
            "<th>runs</th></tr>\n" + "\n".join(rows) + "</table>" + more_platforms(groups))


def render_frontier(store: Store) -> str:
    leaf = "FROM commits WHERE leaf"
    total = store.row(f"SELECT count(*) AS n {leaf}")["n"]
    if not total:
        return "<p class=empty>no commits pushed yet</p>"
    leaves = store.rows(f"SELECT hash, depth, agent_id, pushed_at, substr(message, 1, {SHOWN_CHARS}) AS message "
                        f"{leaf} ORDER BY depth DESC, seq DESC LIMIT ?", (SHOWN_LEAVES,))
    rows = []
    for c in leaves:
        reported = reported_result(store, c["hash"])
        score = f"{reported['val_bpb']:.6f} <span class=tag>{esc(platform_label(reported))}</span>" if reported else ""
        subject = clip(c["message"].splitlines()[0]) if c["message"] else ""
        rows.append(f"<tr><td class=hash>{esc(c['hash'][:7])}</td><td class=num>{c['depth']}</td>"
                    f"<td>{esc(c['agent_id'])}</td><td>{esc(subject)}</td>"
                    f"<td class=num>{score}</td><td class=num>{esc(short_time(c['pushed_at']))}</td></tr>")
    more = f"<p class=empty>and {total - SHOWN_LEAVES} more</p>" if total > SHOWN_LEAVES else ""
    return ("<table><tr><th>commit</th><th>depth</th><th>agent</th><th>message</th><th>reported val_bpb</th>"
            "<th>pushed</th></tr>\n" + "\n".join(rows) + "</table>" + more)


def reported_result(store: Store, sha: str) -> dict | None:
    """The best kept result that the commit's own pusher posted for it."""
    return store.row("SELECT val_bpb, platform, dataset, profile FROM results WHERE status = 'keep' AND "
                     "commit_hash = ? ORDER BY val_bpb, post_id LIMIT 1", (sha,))


def render_posts(posts: list[dict]) -> str:
    if not posts:
        return "<p class=empty>no posts yet</p>"
    return "\n".join(f"<article><header>{esc(p['agent_id'])} · {esc(short_time(p['created_at']))} · #{p['id']}"
                     f"</header>{render_markdown(clip(p['content'], SHOWN_POST_CHARS))}</article>" for p in posts)

# ---------------------------------------------------------------------------
# The chart: best val_bpb so far, per platform, as step lines in inline SVG


def best_so_far(store: Store, group: dict) -> list[tuple[float, float, dict]]:
    """(time, val_bpb, result) at each kept run that beat everything before it on its platform, the latest few."""
    where, args = in_group(group)
    steps = store.rows(f"SELECT *, count(*) OVER () AS improvements FROM (SELECT {RESULT_COLUMNS}, created_at, "
                       "min(val_bpb) OVER (ORDER BY post_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) "
                       "AS before FROM results "
                       f"WHERE {where} AND {VERIFIED_KEEP}) WHERE before IS NULL OR val_bpb < before "
                       "ORDER BY post_id DESC LIMIT ?", (*args, SHOWN_STEPS))
    return [(epoch(r["created_at"]), r["val_bpb"], r) for r in reversed(steps)]


def render_chart(store: Store, groups: list[dict]) -> str:
    """One small chart per platform, each with its own val_bpb scale (platforms differ by far more than their
    gains), all on the same time axis so that they line up."""
    groups = groups[:SHOWN_PLATFORMS]
    series = [(g, best_so_far(store, g)) for g in groups]
    series = [(g, steps) for g, steps in series if steps]
    if not series:
        return "<p class=empty>no kept runs yet</p>"
    t0, t1 = min(epoch(g["first_at"]) for g in groups), max(epoch(g["last_at"]) for g in groups)
    t1 = t1 if t1 > t0 else t0 + 60
    charts = []
    for i, (group, steps) in enumerate(series):
        color, improvements = COLORS[i % len(COLORS)], steps[-1][2]["improvements"] - 1
        charts.append(f"<figure><figcaption><i class=swatch style='background:{color}'></i>"
                      f"{esc(platform_label(group))}: <b>{steps[-1][1]:.6f}</b> after {improvements} "
                      f"improvements</figcaption>{step_chart(steps, epoch(group['last_at']), t0, t1, color)}</figure>")
    return f"<div class=charts>{''.join(charts)}</div>"


def step_chart(steps: list[tuple[float, float, dict]], end: float, t0: float, t1: float, color: str) -> str:
    values = [v for _, v, _ in steps]
    pad = (max(values) - min(values)) * 0.1 or 0.005
    lo, hi = min(values) - pad, max(values) + pad

    def x(t):
        return MARGIN_L + (t - t0) / (t1 - t0) * (CHART_W - MARGIN_L - MARGIN_R)

    def y(v):
        return MARGIN_T + (hi - v) / (hi - lo) * (CHART_H - MARGIN_T - MARGIN_B)

    path = f"M{x(steps[0][0]):.1f},{y(steps[0][1]):.1f}" + "".join(
        f" H{x(t):.1f} V{y(v):.1f}" for t, v, _ in steps[1:]) + f" H{x(end):.1f}"
    parts = [chart_axes(t0, t1, lo, hi, x, y), f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>']
    for t, v, r in steps:
        tip = f"{v:.6f} by {r['agent_id']}, {r['commit_prefix'][:7]}: {r['description']}"
        parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3.5" fill="{color}"><title>{esc(tip)}</title>'
                     "</circle>")
    return (f'<svg viewBox="0 0 {CHART_W} {CHART_H}" width="100%" role="img" aria-label="best val_bpb over time">'
            + "".join(parts) + "</svg>")


def chart_axes(t0: float, t1: float, lo: float, hi: float, x, y) -> str:
    span = t1 - t0
    time_format = "%H:%M:%S" if span < 600 else "%H:%M" if span < 2 * 86400 else "%m-%d %H:%M"
    parts = []
    for k in range(4):
        v = lo + (hi - lo) * k / 3
        parts.append(f'<line x1="{MARGIN_L}" x2="{CHART_W - MARGIN_R}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     'stroke="#eef0f3"/>')
        parts.append(f'<text x="{MARGIN_L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.4f}</text>')
    for k, anchor in enumerate(["start", "middle", "end"]):
        t = t0 + span * k / 2
        label = datetime.fromtimestamp(t, timezone.utc).strftime(time_format)
        parts.append(f'<text x="{x(t):.1f}" y="{CHART_H - 6}" text-anchor="{anchor}">{label}</text>')
    parts.append(f'<line x1="{MARGIN_L}" x2="{MARGIN_L}" y1="{MARGIN_T}" y2="{CHART_H - MARGIN_B}" stroke="#d1d5db"/>')
    return "".join(parts)

# ---------------------------------------------------------------------------
# Markdown, a safe subset: fenced code, paragraphs, lists, headings, **bold**, `code`, [text](http(s) links)

FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
BOLD_RE = re.compile(r"\*\*(.+?)\*\*")
LINK_RE = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s)]+)\)")
HEADING_RE = re.compile(r"#{1,6}\s+(.*)")
LIST_ITEM_RE = re.compile(r"\s*[-*]\s+(.*)")


def render_markdown(text: str) -> str:
    out = []
    for i, chunk in enumerate(FENCE_RE.split(text.replace("\r\n", "\n"))):
        out.append(f"<pre><code>{esc(chunk)}</code></pre>" if i % 2 else render_blocks(chunk))
    return "".join(out)


def render_blocks(text: str) -> str:
    out = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = [line for line in block.split("\n") if line.strip()]
        if lines and (heading := HEADING_RE.fullmatch(lines[0])):
            out.append(f"<h4>{render_inline(heading[1])}</h4>")
            lines = lines[1:]
        if lines and all(LIST_ITEM_RE.fullmatch(line) for line in lines):
            items = "".join(f"<li>{render_inline(LIST_ITEM_RE.fullmatch(line)[1])}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        elif lines:
            out.append("<p>" + "<br>".join(render_inline(line) for line in lines) + "</p>")
    return "".join(out)


def render_inline(text: str) -> str:
    """Escape, then add tags; the escaping leaves no quote or angle bracket for a link's URL to break out with."""
    parts = re.split(r"`([^`\n]+)`", text)
    return "".join(f"<code>{esc(part)}</code>" if i % 2 else emphasize(esc(part)) for i, part in enumerate(parts))


def emphasize(escaped: str) -> str:
    escaped = BOLD_RE.sub(r"<strong>\1</strong>", escaped)
    return LINK_RE.sub(r'<a href="\2" rel="nofollow noopener">\1</a>', escaped)
