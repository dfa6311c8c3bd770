"""A report as terminal tables, CSV rows or one self-contained HTML page (inline SVG). No I/O."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Iterator
from typing import Any

# --- numbers ---------------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    """A duration for people: ms below a second, s below a minute, then m and h."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.2f} s"
    if value < 3600:
        return f"{value / 60:.1f} m"
    return f"{value / 3600:.1f} h"


def usd(value: float | None) -> str:
    """Dollars with cents (and more digits for sub-cent figures)."""
    if value is None:
        return "-"
    return f"${value:,.4f}" if 0 < abs(value) < 0.01 else f"${value:,.2f}"


# --- terminal tables -------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Rows under headers in aligned columns; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]


def _looks_numeric(text: str) -> bool:
    stripped = text.replace("$", "").replace(",", "").replace(".", "").replace(" ms", "")
    return stripped.rstrip("smh ").lstrip("-").isdigit() or text == "-"


def _counts(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return [f"{title}: none"]
    return table([title, "tasks"], [[k, v] for k, v in counts.items()])


def text(report: dict[str, Any]) -> str:
    """The report as terminal tables."""
    period = report["period"]
    out = [f"koubou report {period['label']} ({period['timezone']}: {period['start']} to "
           f"{period['end']})", ""]
    out.append("queues now: " + "  ".join(f"{k} {v}" for k, v in report["queues"].items()))
    out.append(f"tasks finished in the period: {report['tasks']['total']}")
    for key, title in (("by_state", "state"), ("by_type", "type"),
                       ("by_craftsman", "craftsman"), ("by_model", "model")):
        out += [""] + _counts(title, report["tasks"][key])
    out += [""] + table(["time", "count", "mean", "p50", "p95"], [
        [name, s["count"], seconds(s["mean"]), seconds(s["p50"]), seconds(s["p95"])]
        for name, s in (("queue wait", report["queue_wait_s"]), ("run time", report["run_time_s"]))])
    out += [""] + _usage(report)
    out += [""] + _answers(report)
    if report.get("repositories"):
        out += [""] + _repositories(report["repositories"])
    if report.get("endpoints"):
        out += [""] + table(["craftsman", "endpoint", "tasks", "run p50", "run p95"],
                            [[e["craftsman"], e["endpoint"], e["tasks"], seconds(e["run_p50_s"]),
                              seconds(e["run_p95_s"])] for e in report["endpoints"]])
    out += [""] + _budget(report["budget"])
    failures = report["failures_by_kind"]
    out += [""] + (table(["failure", "tasks"], [[k, v] for k, v in failures.items()])
                   if failures else ["failures: none"])
    if report.get("cluster", {}).get("hosts") is not None:
        out += [""] + _cluster(report["cluster"])
    return "\n".join(out) + "\n"


def _freshness(host: dict[str, Any]) -> str:
    return "stale" if host["stale"] else "fresh"


def hosts_table(hosts: list[dict[str, Any]]) -> list[str]:
    """The Hosts section of `koubou status`: each host's queues as its bridge last wrote them."""
    if not hosts:
        return ["hosts: none has written its row yet (each host's `koubou cluster` does)"]
    return ["hosts (as each host's bridge last wrote):"] + table(
        ["host", "row age", "row", "pending", "in progress", "completed", "failed", "workers"],
        [[h["host"] + (" (this host)" if h["this_host"] else ""), seconds(h["age_s"]),
          _freshness(h), *(h["queues"].get(state, "-") for state in
                           ("pending", "in_progress", "completed", "failed")), h["workers"]]
         for h in hosts])


def _cluster(cluster: dict[str, Any]) -> list[str]:
    """The cluster's figures per host: what each host ran in the period, from its row."""
    def cells(line: dict[str, Any]) -> list[Any]:
        return [line["tasks"], line["completed"], line["failed"], line["prompt_tokens"],
                line["completion_tokens"], usd(line["cost_usd"])]
    rows = [[h["host"], seconds(h["age_s"]), _freshness(h),
             *(cells(h) if h["covered"] else ["-"] * 6)] for h in cluster["hosts"]]
    rows.append(["total", "", "", *cells(cluster["total"])])
    out = [f"cluster hosts, tasks each ran in {cluster['period']}:"] + table(
        ["host", "row age", "row", "tasks", "completed", "failed", "tokens in", "tokens out",
         "cost"], rows)
    missing = [h["host"] for h in cluster["hosts"] if not h["covered"]]
    if missing:
        out.append(f"no figures for this period from {', '.join(missing)}: a host writes "
                   "its days and months while its bridge runs (last month's too, as it starts)")
    return out


def _usage(report: dict[str, Any]) -> list[str]:
    tokens, cost = report["tokens"], report["cost"]
    rows = [[u["craftsman"], u["model"], u["tasks"], u["prompt_tokens"], u["completion_tokens"],
             usd(u["cost_usd"])] for u in report["usage"]]
    rows.append(["total", "", report["tasks"]["total"], tokens["prompt"], tokens["completion"],
                 usd(cost["total_usd"])])
    return table(["craftsman", "model", "tasks", "tokens in", "tokens out", "cost"], rows)


def _answers(report: dict[str, Any]) -> list[str]:
    answers = report.get("answers") or []
    if not answers:
        return ["answers: none"]
    return table(["craftsman", "answers", "truncated", "invalid outputs"],
                 [[a["craftsman"], a["completed"], a["truncated"], a["invalid_output"]]
                  for a in answers])


def _repositories(rows: list[dict[str, Any]]) -> list[str]:
    return table(["repository", "tasks", "completed", "verify passed", "attempts", "cost"],
                 [[r["repo"], r["tasks"], r["completed"],
                   f"{r['verify_passed']}/{r['verified']}" if r["verified"] else "-",
                   r["attempts"], usd(r["cost_usd"])] for r in rows])


def _budget(budget: dict[str, Any]) -> list[str]:
    lines = [] if budget["configured"] else [
        "budget: none configured (set budget: {daily_usd, monthly_usd, timezone} in the config)"]
    rows = [[name, line["period"], usd(line["used_usd"]), usd(line["limit_usd"]),
             usd(line["left_usd"])]
            for name, line in (("daily", budget["daily"]), ("monthly", budget["monthly"]))]
    return lines + table(["budget", "period", "used", "limit", "left"], rows)


# --- CSV -------------------------------------------------------------------------------------

CSV_HEADER = ("section", "name", "metric", "value")


def csv_rows(report: dict[str, Any]) -> Iterator[tuple[str, str, str, Any]]:
    """The report as long-format rows: section, name, metric, value."""
    period = report["period"]
    for key in ("label", "timezone", "start", "end"):
        yield "period", key, "value", period[key]
    for state, count in report["queues"].items():
        yield "queue", state, "tasks", count
    for key in ("by_state", "by_type", "by_craftsman", "by_model"):
        for name, count in report["tasks"][key].items():
            yield f"tasks_{key}", name, "tasks", count
    for section in ("queue_wait_s", "run_time_s"):
        for metric, value in report[section].items():
            yield section, "all", metric, value
    for usage in report["usage"]:
        name = f"{usage['craftsman']}/{usage['model']}"
        for metric in ("tasks", "prompt_tokens", "completion_tokens", "cost_usd"):
            yield "usage", name, metric, usage[metric]
    for answers in report.get("answers") or []:
        for metric in ("completed", "truncated", "invalid_output"):
            yield "answers", answers["craftsman"], metric, answers[metric]
    for repo in report.get("repositories") or []:
        for metric in ("tasks", "completed", "verified", "verify_passed", "attempts", "cost_usd"):
            yield "repositories", repo["repo"], metric, repo[metric]
    yield "tokens", "all", "prompt", report["tokens"]["prompt"]
    yield "tokens", "all", "completion", report["tokens"]["completion"]
    yield "cost", "all", "usd", report["cost"]["total_usd"]
    for which in ("daily", "monthly"):
        for metric in ("limit_usd", "used_usd", "left_usd"):
            yield "budget", which, metric, report["budget"][which][metric]
    for kind, count in report["failures_by_kind"].items():
        yield "failures", kind, "tasks", count
    for day in report["cost_per_day"]:
        yield "cost_per_day", day["day"], "usd", day["cost_usd"]
    for host in report.get("cluster", {}).get("hosts") or []:
        for metric in ("age_s", "stale", "tasks", "completed", "failed", "prompt_tokens",
                       "completion_tokens", "cost_usd"):
            yield "cluster_hosts", host["host"], metric, host[metric]


def csv_text(report: dict[str, Any]) -> str:
    """The report as CSV with a header row; empty values for figures that do not exist."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in csv_rows(report):
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


# --- HTML ------------------------------------------------------------------------------------

BAR = "#3b6ea5"


def bar_chart(title: str, bars: list[tuple[str, float]], label: Any = str,
              width: int = 640, height: int = 220) -> str:
    """An inline SVG bar chart of (name, value) pairs."""
    top = max([v for _, v in bars] + [0]) or 1
    slot = (width - 40) / max(len(bars), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="10" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="30" y1="{height - 30}" x2="{width - 10}" y2="{height - 30}" stroke="#888"/>']
    for i, (name, value) in enumerate(bars):
        bar_h = (height - 70) * value / top
        x, y = 30 + i * slot + slot * 0.1, height - 30 - bar_h
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" height="{bar_h:.1f}" '
                     f'fill="{BAR}"><title>{html.escape(f"{name}: {label(value)}")}</title></rect>')
        if len(bars) <= 16 or i % max(len(bars) // 8, 1) == 0:
            parts.append(f'<text x="{x:.1f}" y="{height - 14}" font-size="10">'
                         f'{html.escape(name[-5:] if len(bars) > 8 else name)}</text>')
        if len(bars) <= 16:
            parts.append(f'<text x="{x:.1f}" y="{y - 4:.1f}" font-size="10">'
                         f'{html.escape(label(value))}</text>')
    return "\n".join(parts + ["</svg>"])


def _wait_bars(report: dict[str, Any]) -> list[tuple[str, float]]:
    bars = []
    for name, key in (("wait", "queue_wait_s"), ("run", "run_time_s")):
        for metric in ("mean", "p50", "p95"):
            bars.append((f"{name} {metric}", report[key][metric] or 0.0))
    return bars


def html_page(report: dict[str, Any]) -> str:
    """One self-contained page: no scripts, no links out, charts as inline SVG."""
    period = report["period"]
    title = f"koubou report {period['label']}"
    charts = [
        bar_chart("Cost per day (USD)", [(d["day"], d["cost_usd"]) for d in report["cost_per_day"]],
                  usd),
        bar_chart("Tasks per craftsman", list(report["tasks"]["by_craftsman"].items()),
                  lambda v: f"{v:g}"),
        bar_chart("Queue wait and run time (s)", _wait_bars(report), seconds),
    ]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;background:#fff;color:#222}"
        "pre{background:#f4f4f4;padding:1em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<div>{chart}</div>" for chart in charts),
        f"<pre>{html.escape(text(report))}</pre>", "</body></html>", ""])
