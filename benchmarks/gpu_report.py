"""The GPU acceptance check's outputs: the Markdown table of a result (gpu_check.json) and its
sections of BENCHMARKS.md (`gpu_check` for GPU figures, `gpu_check_tiny` for the CPU smoke).

    print(markdown(read_json("runs/gpu_check/gpu_check.json")))
"""

from __future__ import annotations

from typing import Any

from machine import ROOT, write_section


def fmt(value: float | None, unit: str) -> str:
    """A row's value with its unit, e.g. `1,234 tokens/s`, `41.3%`, `6.20x`, `4.3e-09`."""
    if value is None:
        return "null"
    if unit == "fraction":
        return f"{value:.1%}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "abs":
        return f"{value:.1e}"
    number = f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    return number if unit == "count" else f"{number} {unit}"


def markdown(result: dict[str, Any]) -> str:
    m, p = result["machine"], result["peak_tflops"]
    lines = [
        f"- command: `{result['command']}` ({result['mode']} mode)",
        f"- date: {result['date']}, git {result['git']}, total wall time "
        f"{result['wall_seconds']:.0f} s",
        f"- machine: {m['device']}, {m['cpus']} CPUs, CUDA {m['cuda']}; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, trl {m['trl']}",
        f"- load average (1, 5, 15 min): {m['load_average_start']} at the start, "
        f"{m['load_average_end']} at the end",
        f"- peak for MFU: {p['value']} TFLOP/s ({p['source']})",
        "",
        "| stage | metric | value | note |",
        "| --- | --- | ---: | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['stage']} | {r['metric']} | {fmt(r['value'], r['unit'])} | {r['note']} |"
        )
    if result["failed"] or result["skipped"]:
        lines.append("")
    lines += [f"- **{s} failed**: {f['reason']}" for s, f in result["failed"].items()]
    lines += [f"- {s} skipped: {why}" for s, why in result["skipped"].items()]
    return "\n".join(lines)


HEADING = "## GPU acceptance check"
HOW = (
    "Written by `benchmarks/gpu_check.py` (how to run it on a pod or through the device tool: "
    "its docstring; `just gpu-check`). Random-weight Qwen2-shaped models, so the figures are "
    "speed and memory, not quality."
)
SMOKE = (
    "### --tiny: CPU smoke figure\n\nNot a GPU measurement: a 2-layer model for a few steps, to "
    "show that every path runs (the test suite runs the same command)."
)


def write_benchmarks(result: dict[str, Any], table: str) -> None:
    """GPU figures replace the `gpu_check` section; a --tiny run writes only `gpu_check_tiny`."""
    path = ROOT / "BENCHMARKS.md"
    if result["mode"] == "gpu":
        write_section(path, "gpu_check", f"{HEADING}\n\n{HOW}\n\n{table}")
    else:
        write_section(path, "gpu_check_tiny", f"{SMOKE}\n\n{table}")
