"""A HIL run's reports: ``junit.xml`` for CI and ``report.html`` for a person.

- JUnit: one ``testsuite`` (the rig), one ``testcase`` per scenario and device
  (``classname`` = ``hil.<rig>.<scenario>``, ``name`` = the device id); a failed case carries
  its messages and evidence in ``<failure>``, a skipped one the reason it could not run, and
  the agent's log excerpt in ``<system-out>``.
- HTML: one self-contained file (inline CSS, the latency chart as an embedded PNG): the rig and
  versions, each scenario's verdict with its evidence and log excerpts, a timeline per device of
  its lifecycle transitions, and the predict latency per version and device.
"""

from __future__ import annotations

import base64
import html
import io
import json
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

from hil.runner import RunResult

__all__ = ["write_reports"]


def write_reports(result: RunResult, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"junit": out / "junit.xml", "html": out / "report.html", "json": out / "result.json"}
    paths["junit"].write_bytes(junit(result))
    paths["html"].write_text(report_html(result))
    paths["json"].write_text(json.dumps(result.summary(), indent=2) + "\n")
    return paths


def junit(result: RunResult) -> bytes:
    cases = [(s, c) for s in result.scenarios for c in s.cases]
    suite = ET.Element(
        "testsuite",
        name=f"hil.{result.rig.name}",
        tests=str(len(cases)),
        failures=str(sum(c.status == "failed" for _, c in cases)),
        skipped=str(sum(c.status == "skipped" for _, c in cases)),
        errors="0",
        time=f"{sum(s.duration_s for s in result.scenarios):.3f}",
        timestamp=result.started_at.isoformat(timespec="seconds"),
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("model", result.model),
        ("version", result.version),
        ("baseline", result.baseline or ""),
    ):
        ET.SubElement(props, "property", name=name, value=value)
    for scenario, case in cases:
        share = scenario.duration_s / max(1, len(scenario.cases))
        element = ET.SubElement(
            suite,
            "testcase",
            classname=f"hil.{result.rig.name}.{scenario.name}",
            name=case.device,
            time=f"{share:.3f}",
        )
        if case.status == "failed":
            failure = ET.SubElement(element, "failure", message=case.messages[0][:500])
            failure.text = "\n".join([*case.messages, "", "evidence:", *case.evidence])
        elif case.status == "skipped":
            ET.SubElement(element, "skipped", message=case.messages[0] if case.messages else "")
        if case.log_excerpt:
            ET.SubElement(element, "system-out").text = case.log_excerpt
    ET.indent(suite)
    out: bytes = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    return out


def latency_png(result: RunResult) -> bytes | None:
    """Predict latency per version and device (box plots), or None with no figures."""
    if not result.latencies:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[float]] = {}
    for device, version, ms in result.latencies:
        groups.setdefault((version, device), []).append(ms)
    keys = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(keys)), 3.2), dpi=100)
    ax.boxplot([groups[k] for k in keys], showfliers=False)
    ax.set_xticks(range(1, len(keys) + 1), [f"{v}\n{d}" for v, d in keys], fontsize=7)
    medians = sorted(sorted(groups[k])[len(groups[k]) // 2] for k in keys)
    if medians[0] > 0 and medians[-1] / medians[0] > 20:
        ax.set_yscale("log")  # an emulated board beside x86: both must stay visible
    ax.set_ylabel("milliseconds")
    ax.set_title("Predict latency per version: devices through their local API; "
                 "x86 LiteRT as the bare runtime call", fontsize=8)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;padding:0 1rem;
color:#1c2430}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}h3{font-size:1rem;margin:.8rem 0 .3rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d5dbe3;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f2f5f9}
.passed{color:#137333;font-weight:600}.failed{color:#b3261e;font-weight:600}
.skipped{color:#7a6400;font-weight:600}
pre{background:#f6f8fa;padding:.5rem;overflow-x:auto;font-size:12px;max-height:18rem}
.meta td:first-child{font-weight:600}ul{margin:.2rem 0 .2rem 1.2rem;padding:0}
img{max-width:100%}
"""


def report_html(result: RunResult) -> str:
    e = html.escape
    verdict = "passed" if result.passed else "failed"
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>HIL {e(result.rig.name)}: {e(result.model)} {e(result.version)} {verdict}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>HIL run on rig {e(result.rig.name)}: <span class={verdict}>{verdict}</span></h1>",
        "<table class=meta>",
        f"<tr><td>model</td><td>{e(result.model)}</td></tr>",
        f"<tr><td>candidate</td><td>{e(result.version)}</td></tr>",
        f"<tr><td>baseline</td><td>{e(result.baseline or '(none)')}</td></tr>",
        f"<tr><td>started</td><td>{e(result.started_at.isoformat(timespec='seconds'))}</td></tr>",
        "<tr><td>devices</td><td>"
        + "<br>".join(
            e(f"{d.id}: {d.kind}, {d.profile}")
            + (
                e(", labels " + ",".join(f"{k}={v}" for k, v in d.labels.items()))
                if d.labels
                else ""
            )
            + "".join(f"<br>&nbsp;&nbsp;{e(f)}" for f in result.facts.get(d.id, []))
            for d in result.rig.devices
        )
        + "</td></tr></table>",
    ]
    if result.error:
        parts.append(f"<p class=failed>The rig could not start: {e(result.error)}</p>")
    parts.append("<h2>Scenarios</h2><table><tr><th>scenario</th><th>what it checks</th>")
    parts.append("<th>verdict</th><th>duration</th></tr>")
    for s in result.scenarios:
        status = "skipped" if all(c.status == "skipped" for c in s.cases) else (
            "passed" if s.passed else "failed"
        )  # fmt: skip
        parts.append(
            f"<tr><td><a href='#{e(s.name)}'>{e(s.name)}</a></td><td>{e(s.summary)}</td>"
            f"<td class={status}>{status}</td><td>{s.duration_s:.1f} s</td></tr>"
        )
    parts.append("</table>")
    png = latency_png(result)
    if png is not None:
        data = base64.b64encode(png).decode()
        parts.append("<h2>On-device latency per version</h2>")
        parts.append(
            f"<img alt='predict latency per version and device' src='data:image/png;base64,{data}'>"
        )
    for s in result.scenarios:
        parts.append(f"<h2 id='{e(s.name)}'>{e(s.name)}</h2><p>{e(s.summary)}</p>")
        for c in s.cases:
            parts.append(f"<h3>{e(c.device)}: <span class={c.status}>{c.status}</span></h3>")
            if c.messages:
                parts.append("<ul>" + "".join(f"<li>{e(m)}</li>" for m in c.messages) + "</ul>")
            if c.evidence:
                parts.append("<b>evidence</b><ul>")
                parts.extend(f"<li>{e(x)}</li>" for x in c.evidence)
                parts.append("</ul>")
            if c.timeline:
                parts.append("<table><tr><th>time</th><th>transition</th><th>event</th></tr>")
                for at, old, new, event in c.timeline:
                    when = datetime.fromtimestamp(at).astimezone().strftime("%H:%M:%S.%f")[:-3]
                    parts.append(
                        f"<tr><td>{when}</td><td>{e(old)} → {e(new)}</td><td>{e(event)}</td></tr>"
                    )
                parts.append("</table>")
            if c.log_excerpt:
                parts.append(
                    f"<details><summary>agent log</summary><pre>{e(c.log_excerpt)}</pre></details>"
                )
    parts.append("</body></html>\n")
    return "\n".join(parts)
