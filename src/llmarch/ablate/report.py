"""The study's table (one row per variant), ``report.md``, and its plots: validation loss curves and, when the
study evaluates other lengths, perplexity against sequence length (the extrapolation curve)."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from llmarch.ablate.spec import Study

log = logging.getLogger(__name__)
LOSS_PLOT = "loss_curves.png"
LENGTH_PLOT = "extrapolation.png"
ERROR_CHARS = 90  # of a failed variant's error in the table; the full text is listed under it


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged" if math.isnan(x) else "inf"
    if abs(x) >= 1e3:
        for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(x) >= scale:
                return f"{x / scale:.3g}{unit}"
    return f"{x:.{digits}g}"


def table(results: list[dict], eval_lengths: tuple[int, ...] | list[int] = ()) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings), one row per variant, failed variants included with their error."""
    header = ["variant", "status", "params", "FLOPs/tok", "attn FLOPs/tok", "KV B/tok", "tokens/s", "val loss",
              "val ppl"] + [f"ppl@{L}" for L in eval_lengths]
    rows = []
    for r in results:
        if r.get("status") != "ok":
            error = r.get("error", "")
            error = error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS] + "…"
            rows.append([r["name"], f"failed ({r.get('stage', '?')}): {error}"] +
                        ["-"] * (len(header) - 2))
            continue
        ppl_at = r.get("ppl_at", {})
        rows.append([r["name"], "ok", _num(r["params"]), _num(r["flops_per_token"]), _num(r["attn_flops_useful"]),
                     _num(r["kv_bytes_per_token"]), _num(r["tokens_per_s"], 3), _num(r["final_val_loss"]),
                     _num(r["final_ppl"])] + [_num(ppl_at.get(str(L))) for L in eval_lengths])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in esc])


def plot_loss_curves(results: list[dict], path: Path, title: str = "") -> Path | None:
    ok = [r for r in results if r.get("status") == "ok" and r.get("val_curve")]
    if not ok:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in ok:
        steps, losses = zip(*r["val_curve"])
        ax.plot(steps, losses, marker="o", markersize=3, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def extrapolation_points(r: dict, eval_lengths, train_len: int | None = None) -> list[tuple[int, float]]:
    """(length, perplexity) of one variant, the training length included: from ``ppl_at`` where it was evaluated
    there, else its final validation perplexity (measured at the training length)."""
    pts = {L: r["ppl_at"].get(str(L)) for L in eval_lengths}
    if train_len and pts.get(train_len) is None:
        pts[train_len] = r.get("final_ppl")
    return sorted((L, p) for L, p in pts.items() if isinstance(p, (int, float)) and math.isfinite(p))


def plot_extrapolation(results: list[dict], eval_lengths, path: Path, train_len: int | None = None,
                       title: str = "") -> Path | None:
    ok = [r for r in results if r.get("status") == "ok" and r.get("ppl_at")]
    if not ok or not eval_lengths:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.0))
    for r in ok:
        pts = extrapolation_points(r, eval_lengths, train_len)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=r["name"] + (" (no positions past training)" if len(pts) == 1 else ""))
    if train_len:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import LogLocator, StrMethodFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))  # plain numbers at 1-2-3-5 steps
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(StrMethodFormatter(""))
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title or "perplexity vs. length")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the data
    return _save(fig, path)


def write_report(study: Study, results: list[dict], out: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                 image_prefix: str = "") -> Path:
    """Write ``out/report.md`` with the table and plots (images in ``image_dir``, default ``out``)."""
    out = Path(out)
    images = Path(image_dir) if image_dir is not None else out
    images.mkdir(parents=True, exist_ok=True)
    header, rows = table(results, study.eval_lengths)
    train_len = next((r["seq_len"] for r in results if r.get("status") == "ok"), None)
    loss_png = plot_loss_curves(results, images / f"{image_prefix}{LOSS_PLOT}", f"{study.name}: validation loss")
    len_png = plot_extrapolation(results, study.eval_lengths, images / f"{image_prefix}{LENGTH_PLOT}", train_len,
                                 f"{study.name}: perplexity vs. length")
    lines = [f"# Ablation: {study.name}", ""]
    if study.claim:
        lines += [f"Claim: {study.claim}", ""]
    lines += ["```", study.command or "(library call)", "```", "", section(study, results, header, rows), ""]
    for png in (loss_png, len_png):
        if png is not None:
            lines += [f"![{png.stem}]({os.path.relpath(png, out)})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def section(study: Study, results: list[dict], header: list[str], rows: list[list[str]]) -> str:
    """The settings line, the table and the variants' definitions (shared by report.md and docs)."""
    ok = [r for r in results if r.get("status") == "ok"]
    lines = []
    if ok:
        r = ok[0]
        lines += [f"Every variant: {r['steps']} steps, {r['train_tokens']:,} training tokens, sequence length "
                  f"{r['seq_len']}, seed {study.train.get('seed', 0)}, same data and tokenizer. FLOPs are forward "
                  f"matmul FLOPs per token at that length (attention counts only the pairs the mask allows); "
                  f"KV bytes per token at {r.get('kv_dtype', 'bf16')}; tokens/s is the median training throughput.",
                  ""]
    lines += [markdown_table(header, rows), "", "Variants:", ""]
    lines += [f"- `{r['name']}`: {r.get('settings', '')}" for r in results]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines += ["", "Failed variants:", ""]
        lines += [f"- `{r['name']}` ({r.get('stage')}): {r.get('error')}" for r in failed]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


__all__ = ["table", "markdown_table", "write_report", "section", "plot_loss_curves", "plot_extrapolation"]
