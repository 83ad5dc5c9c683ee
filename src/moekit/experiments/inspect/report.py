"""report.html, the PNG figures and routing.json of ``moekit inspect``; the coloured text.

report.html is self-contained: every PNG is embedded as a base64 data URI (the files are
also written next to it), no script, no network.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from moekit.experiments.inspect.record import LayerRouting, Probe, token_pieces

CHOICE_TITLES = {
    "either": "either choice (all assignments)",
    "first": "first choice (rank 0)",
    "second": "second choice (rank 1)",
}


# --------------------------------------------------------------------------------------------
# Colours and coloured text
# --------------------------------------------------------------------------------------------


def expert_colors(num_experts: int) -> list[tuple[int, int, int]]:
    """One distinct RGB colour per expert: tab20 (light and dark pairs interleaved by
    hue) up to 20 experts, evenly spaced hues beyond."""
    if num_experts <= 20:
        cmap = plt.get_cmap("tab20")
        order = [2 * i for i in range(10)] + [2 * i + 1 for i in range(10)]
        colors = [cmap(order[e]) for e in range(num_experts)]
    else:
        cmap = plt.get_cmap("hsv")
        colors = [cmap(e / num_experts) for e in range(num_experts)]
    return [tuple(int(round(255 * c)) for c in rgba[:3]) for rgba in colors]  # type: ignore[misc]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _text_on(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def colored_pieces(tokens: np.ndarray, experts: np.ndarray, tokenizer) -> list[tuple[str, int]]:
    """(text, first-choice expert) per decodable piece of ``tokens``."""
    return [(text, int(experts[first])) for text, first in token_pieces(tokens.tolist(), tokenizer)]


def html_colored(pieces: list[tuple[str, int]], colors: list[tuple[int, int, int]]) -> str:
    spans = []
    for text, expert in pieces:
        shown = html.escape(text.replace("\n", "↵\n").replace("\t", "⇥\t"))
        if expert < 0:
            spans.append(f'<span class="sep" title="no expert">{shown}</span>')
            continue
        rgb = colors[expert]
        spans.append(
            f'<span class="tok" style="background:{_hex(rgb)};color:{_hex(_text_on(rgb))}" '
            f'title="expert {expert}">{shown}</span>'
        )
    return "".join(spans)


def ansi_colored(pieces: list[tuple[str, int]], colors: list[tuple[int, int, int]]) -> str:
    """24-bit ANSI background colours; reset before each newline so lines stay clean."""
    out = []
    for text, expert in pieces:
        if expert < 0:
            out.append(text)
            continue
        bg, fg = colors[expert], _text_on(colors[expert])
        start = f"\x1b[48;2;{bg[0]};{bg[1]};{bg[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m"
        for i, line in enumerate(text.split("\n")):
            if i:
                out.append("\n")
            if line:
                out.append(f"{start}{line}\x1b[0m")
    return "".join(out)


def ansi_legend(num_experts: int, colors: list[tuple[int, int, int]], specialities: list[str]) -> str:
    cells = []
    for e in range(num_experts):
        bg, fg = colors[e], _text_on(colors[e])
        cells.append(
            f"\x1b[48;2;{bg[0]};{bg[1]};{bg[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m {e:>2} \x1b[0m {specialities[e]}"
        )
    return "\n".join(cells)


def sample_rows(probe: Probe, domain: int, sample_windows: int) -> np.ndarray:
    """Token rows of the first ``sample_windows`` windows of a domain (probe order)."""
    sequences = np.unique(probe.sequence_T[probe.domain_T == domain])[:sample_windows]
    return np.flatnonzero(np.isin(probe.sequence_T, sequences))


def terminal_text(
    results: dict,
    probe: Probe,
    routings: list[LayerRouting],
    tokenizer,
    sample_windows: int,
) -> str:
    """The --terminal output: per chosen layer and domain, the sample coloured by first choice."""
    lines = []
    by_block = {r.block: r for r in routings}
    for block in results["chosen_layers"]:
        routing = by_block[block]
        colors = expert_colors(routing.num_experts)
        specialities = results["per_layer"][str(block)]["classes"]["speciality"]
        lines.append(f"== layer {block}: text coloured by first-choice expert ==")
        lines.append(ansi_legend(routing.num_experts, colors, specialities))
        for d, name in enumerate(probe.domains):
            rows = sample_rows(probe, d, sample_windows)
            pieces = _window_pieces(probe, rows, routing, tokenizer)
            lines.append(f"-- {name} --")
            lines.append(ansi_colored(pieces, colors))
        lines.append("")
    return "\n".join(lines)


def _window_pieces(probe: Probe, rows: np.ndarray, routing: LayerRouting, tokenizer) -> list[tuple[str, int]]:
    """Pieces of each window of ``rows``, with a visible break between windows."""
    pieces: list[tuple[str, int]] = []
    for sequence in np.unique(probe.sequence_T[rows]):
        window = rows[probe.sequence_T[rows] == sequence]
        if pieces:
            pieces.append((" ⋯ ", -1))
        pieces += colored_pieces(probe.token_T[window], routing.expert_TK[window, 0], tokenizer)
    return pieces


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_shares(results: dict, path: Path) -> Path:
    """Mixtral Fig. 7: per chosen layer, each domain's share of assignments per expert."""
    chosen = results["chosen_layers"]
    choices = list(results["per_layer"][str(chosen[0])]["shares"])
    num_experts = results["model_config"]["num_experts"]
    domains = [d["name"] for d in results["domains"]]
    fig, axes = plt.subplots(len(chosen), len(choices), figsize=(5.2 * len(choices), 2.6 * len(chosen)), squeeze=False)
    width = 0.8 / len(domains)
    for i, block in enumerate(chosen):
        for j, choice in enumerate(choices):
            ax = axes[i][j]
            shares = results["per_layer"][str(block)]["shares"][choice]["domains"]
            for d, name in enumerate(domains):
                ax.bar(np.arange(num_experts) + (d - (len(domains) - 1) / 2) * width, shares[d], width, label=name)
            ax.axhline(1 / num_experts, color="k", ls="--", lw=1, label="1/E")
            ax.set_title(f"layer {block}: {CHOICE_TITLES[choice]}", fontsize=9)
            ax.set_xticks(range(num_experts))
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("share of assignments", fontsize=8)
            if i == len(chosen) - 1:
                ax.set_xlabel("expert", fontsize=8)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def figure_divergence(results: dict, path: Path) -> Path:
    layers = results["layers"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for d, domain in enumerate(results["domains"]):
        js = [results["per_layer"][str(b)]["divergence"]["either"]["js"][d] for b in layers]
        shuffled = [results["per_layer"][str(b)]["divergence"]["either"]["shuffled_js"][d] for b in layers]
        (line,) = ax.plot(layers, js, marker="o", label=domain["name"])
        ax.plot(layers, shuffled, ls="--", color=line.get_color(), lw=1, label=f"{domain['name']} (shuffled labels)")
    ax.set_xlabel("layer")
    ax.set_ylabel("JS divergence from the whole (bits)")
    ax.set_xticks(layers)
    ax.set_title("domain vs all: expert shares (either choice)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def figure_repetition(results: dict, path: Path) -> Path:
    """Mixtral Table 5 as bars: measured vs uniform vs load-matched, per layer."""
    layers = results["layers"]
    top_k = results["model_config"]["top_k"]
    keys = [("first", "first choice repeated")]
    if top_k > 1:
        keys.append(("any_shared", f"top-{top_k} sets share an expert"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.4), squeeze=False)
    x = np.arange(len(layers))
    for j, (key, title) in enumerate(keys):
        ax = axes[0][j]
        for k, (kind, name) in enumerate(
            [("measured", "measured"), ("uniform", "uniform random"), ("load_matched", "load-matched random")]
        ):
            values = [results["per_layer"][str(b)]["repetition"][kind][key] or 0 for b in layers]
            ax.bar(x + (k - 1) * 0.27, values, 0.27, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels([str(b) for b in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("rate over consecutive tokens")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.3 * max(ax.get_ylim()[1], 1e-3))  # room for the legend above the bars
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    return _save(fig, path)


def figure_determinism(results: dict, path: Path) -> Path:
    labels = results["position_buckets"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for b in results["layers"]:
        det = results["per_layer"][str(b)]["determinism"]
        values = [np.nan if v is None else v for v in det["by_position"]]
        ax.plot(range(len(labels)), values, marker="o", label=f"layer {b}")
    ax.axhline(1 / results["model_config"]["num_experts"], color="k", ls="--", lw=1, label="chance 1/E")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("first choice predicted from the token id alone", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def figure_load(results: dict, path: Path) -> Path:
    layers = results["layers"]
    num_experts = results["model_config"]["num_experts"]
    fig, axes = plt.subplots(1, len(layers), figsize=(min(3.4 * len(layers), 16), 2.8), squeeze=False, sharey=True)
    for i, b in enumerate(layers):
        load = results["per_layer"][str(b)]["load"]
        ax = axes[0][i]
        ax.bar(range(num_experts), load["load"], color="tab:blue")
        ax.axhline(1 / num_experts, color="k", ls="--", lw=1)
        ax.set_title(f"layer {b}: CV {load['cv']:.2f}, H {load['entropy']:.2f}/{load['entropy_max']:.2f}", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("share of assignments", fontsize=8)
    return _save(fig, path)


def figure_classes(results: dict, path: Path) -> Path:
    """Per chosen layer, the share of each expert's first-choice tokens in each token class."""
    chosen = results["chosen_layers"]
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.6 * len(chosen), 5.2), squeeze=False)
    for i, b in enumerate(chosen):
        classes = results["per_layer"][str(b)]["classes"]
        share_EC = np.array(classes["share"])
        ax = axes[0][i]
        ax.imshow(share_EC, aspect="auto", cmap="Blues", vmin=0, vmax=1)
        for e in range(share_EC.shape[0]):
            for c in range(share_EC.shape[1]):
                if share_EC[e, c] >= 0.05:
                    ax.text(
                        c,
                        e,
                        f"{share_EC[e, c]:.0%}"[:-1],
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if share_EC[e, c] > 0.6 else "black",
                    )
        ax.set_xticks(range(len(classes["names"])))
        ax.set_xticklabels(classes["names"], rotation=45, fontsize=7)
        ax.set_yticks(range(share_EC.shape[0]))
        ax.tick_params(labelsize=7)
        ax.set_ylabel("expert", fontsize=8)
        ax.set_title(f"layer {b}: % of each expert's tokens by class", fontsize=9)
    return _save(fig, path)


def figure_drops(results: dict, path: Path) -> Path:
    labels = results["position_buckets"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for b in results["layers"]:
        drops = results["per_layer"][str(b)]["drops"]
        values = [np.nan if v is None else v for v in drops["assignments"]]
        ax.plot(range(len(labels)), values, marker="o", label=f"layer {b}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("assignments dropped")
    ax.set_title("capacity drops by position (training capacity, replayed)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def figure_stability(results: dict, path: Path) -> Path:
    rows = results["stability"]["checkpoints"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    xs = [row["step"] if row["step"] is not None else i for i, row in enumerate(rows)]
    for b in results["layers"]:
        ax.plot(xs, [row["per_layer"][str(b)]["topk"] for row in rows], marker="o", label=f"layer {b}")
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("top-k choices equal to the final model's")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# report.html and routing.json
# --------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;
 color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1em;margin-bottom:.3em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}td.nw{white-space:nowrap}
img{max-width:100%}
.ref{color:#666;font-size:.85em}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;line-height:1.5;
 border:1px solid #ddd;padding:.5em;background:#fafafa}
.tok{border-radius:2px}.sep{color:#999;font-weight:bold}
.legend span{display:inline-block;font-family:ui-monospace,monospace;font-size:12px;padding:.1em .4em;margin:.1em;
 border-radius:3px}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:.4em .8em}
code{background:#f4f4f4;padding:0 .2em}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{path.name}">'


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _tok(label: str) -> str:
    return f"<code>{html.escape(label)}</code>"


def _js_cell(results: dict, js: dict) -> str:
    names = [d["name"] for d in results["domains"]]
    rows = zip(names, js["js"], js["shuffled_js"], strict=True)
    return "<br>".join(f"{html.escape(name)} <b>{v:.4f}</b> ({b:.4f})" for name, v, b in rows)


def _legend(num_experts: int, colors: list[tuple[int, int, int]], specialities: list[str]) -> str:
    cells = [
        f'<span style="background:{_hex(colors[e])};color:{_hex(_text_on(colors[e]))}" '
        f'title="{html.escape(specialities[e])}">{e}: {html.escape(specialities[e])}</span>'
        for e in range(num_experts)
    ]
    return '<div class="legend">' + "".join(cells) + "</div>"


def write_report(
    out: Path,
    results: dict[str, Any],
    probe: Probe,
    routings: list[LayerRouting],
    tokenizer,
    chosen: list[int],
    sample_windows: int,
    replacing: bool,
) -> Path:
    """Write the PNGs, routing.json and report.html into ``out``; returns report.html."""
    if replacing:
        for name in ("report.html", "routing.json") + tuple(p.name for p in out.glob("*.png")):
            (out / name).unlink(missing_ok=True)
    figures = {
        "shares": figure_shares(results, out / "shares.png"),
        "divergence": figure_divergence(results, out / "divergence.png"),
        "repetition": figure_repetition(results, out / "repetition.png"),
        "determinism": figure_determinism(results, out / "determinism.png"),
        "classes": figure_classes(results, out / "classes.png"),
        "load": figure_load(results, out / "load.png"),
    }
    if any(results["per_layer"][str(b)]["drops"] for b in results["layers"]):
        figures["drops"] = figure_drops(results, out / "drops.png")
    if results["stability"]["checkpoints"]:
        figures["stability"] = figure_stability(results, out / "stability.png")
    results["figures"] = {key: path.name for key, path in figures.items()}
    tmp = out / f"routing.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
    os.replace(tmp, out / "routing.json")
    page = _html(results, probe, routings, tokenizer, chosen, sample_windows, figures)
    tmp = out / f"report.html.tmp-{os.getpid()}"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / "report.html")
    return out / "report.html"


def _html(
    results: dict,
    probe: Probe,
    routings: list[LayerRouting],
    tokenizer,
    chosen: list[int],
    sample_windows: int,
    figures: dict[str, Path],
) -> str:
    cfg = results["model_config"]
    num_experts, top_k = cfg["num_experts"], cfg["top_k"]
    layers = results["layers"]
    per_layer = results["per_layer"]
    h: list[str] = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>moekit inspect</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>What the experts learned</h1>",
        f"<p>Model <code>{html.escape(results['model'])}</code>: {cfg['n_layer']} blocks, "
        f"{num_experts} experts, top-{top_k}, router <code>{cfg['router']}</code>, capacity factor "
        f"{cfg['capacity_factor']}, {cfg['tokenizer']} tokens, context {cfg['seq_len']}. "
        f"Probe: {results['tokens']:,} tokens in windows of the context length, evenly spaced over each file: "
        + ", ".join(
            f"<b>{html.escape(d['name'])}</b> {d['tokens']:,} tokens ({d['sequences']} windows)"
            for d in results["domains"]
        )
        + f". Made by <code>{html.escape(results['command'])}</code> in {results['seconds']:.1f} s. "
        "Every number here is also in <code>routing.json</code>.</p>",
    ]

    # Summary table
    h.append("<h2>Summary per layer</h2>")
    capacity_column = cfg["capacity_factor"] is not None
    # NOTE: with top-1 the top-k set is the first choice: the set columns would repeat it.
    repeat_keys = ("first", "any_shared", "overlap") if top_k > 1 else ("first",)
    h.append(
        "<table><tr><th>layer</th><th>router entropy<br>nats (max log E)</th><th>load CV</th><th>dead experts</th>"
        "<th>first choice repeated<br>(uniform / load-matched)</th>"
        + (f"<th>top-{top_k} sets share an expert<br>(uniform / load-matched)</th>" if top_k > 1 else "")
        + "<th>token id predicts<br>first choice<br>(held out; coverage)</th>"
        "<th class='l'>JS domain vs all, bits<br>(shuffled labels)</th>"
        + ("<th>dropped<br>(training capacity)</th>" if capacity_column else "")
        + "</tr>"
    )
    for b in layers:
        row = per_layer[str(b)]
        rep, det, load = row["repetition"], row["determinism"], row["load"]
        cells = [
            str(b),
            f"{load['entropy']:.3f}<br>({load['entropy_max']:.3f})",
            f"{load['cv']:.3f}",
            f"{len(load['dead'])}{' ' + str(load['dead']) if load['dead'] else ''}",
        ]
        for key in repeat_keys[:2]:
            cells.append(
                f"<b>{_pct(rep['measured'][key])}</b><br>"
                f"({_pct(rep['uniform'][key])} / {_pct(rep['load_matched'][key])})"
            )
        cells.append(f"<b>{_pct(det['accuracy'])}</b><br>({_pct(det['coverage'], 0)})")
        h.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells))
        h.append(f"<td class='l nw'>{_js_cell(results, row['divergence']['either'])}</td>")
        if capacity_column:
            h.append(f"<td>{_pct(row['drops']['overall'])}</td>")
        h.append("</tr>")
    h.append("</table>")

    # Shares per domain
    h.append("<h2>Expert shares per domain</h2>")
    h.append(
        "<p class='ref'>Mixtral (Jiang et al. 2024) §5, Fig. 7. Bars: the share of a domain's assignments that "
        "each expert received (a token routed to two experts makes two assignments; bars of one domain sum to 1). "
        "Either = every assignment, first / second = the assignments of that rank only. Dashed: 1/E, a perfectly "
        "even router. Below: the Jensen-Shannon divergence (bits, 0 = same shares, 1 = disjoint) of each domain's "
        "shares from the whole probe's, against the same with domain labels shuffled over whole windows "
        "(what sampling noise alone gives).</p>"
    )
    h.append(_img(figures["shares"]))
    h.append(_img(figures["divergence"]))

    # Coloured text
    h.append("<h2>Text coloured by first-choice expert</h2>")
    h.append(
        f"<p class='ref'>Mixtral §5, Fig. 8. The first {sample_windows} windows of each file, each token's "
        "background the colour of its first-choice expert (hover for the number); ⋯ separates windows, ↵ is a "
        "newline. Legend: each expert's speciality on the whole probe: its token class when that class is ≥ 30% "
        "of its first-choice tokens and twice as common there as overall, then the fewest frequent tokens (≤ 4) "
        "that make up 80% of them.</p>"
    )
    by_block = {r.block: r for r in routings}
    for b in chosen:
        routing = by_block[b]
        colors = expert_colors(routing.num_experts)
        h.append(f"<h3>layer {b}</h3>")
        h.append(_legend(routing.num_experts, colors, per_layer[str(b)]["classes"]["speciality"]))
        for d, name in enumerate(probe.domains):
            pieces = _window_pieces(probe, sample_rows(probe, d, sample_windows), routing, tokenizer)
            h.append(f"<div><b>{html.escape(name)}</b></div><div class='text'>{html_colored(pieces, colors)}</div>")

    # Repetition
    h.append("<h2>Consecutive tokens routed to the same expert</h2>")
    h.append(
        "<p class='ref'>Mixtral §5, Table 5. Over consecutive tokens of one window: how often token t's first "
        "choice equals token t−1's"
        + (
            f", and how often their top-{top_k} sets share at least one expert; overlap = the share of top-{top_k} "
            "choices repeated. Uniform random: 1/E; 1 − C(E−k,k)/C(E,k); k/E. "
            if top_k > 1
            else ". Uniform random: 1/E. "
        )
        + "Load-matched random: independent draws from the measured routing (Σ p<sub>i</sub>² for the first choice), "
        "i.e. the repetition that uneven load alone explains.</p>"
    )
    h.append(
        "<table><tr><th>layer</th><th>pairs</th>"
        + "".join(
            f"<th>{name}: measured</th><th>uniform</th><th>load-matched</th>"
            for name in ("first", "share ≥1", "overlap")[: len(repeat_keys)]
        )
        + "</tr>"
    )
    for b in layers:
        rep = per_layer[str(b)]["repetition"]
        m, u, lm = rep["measured"], rep["uniform"], rep["load_matched"]
        h.append(
            f"<tr><td>{b}</td><td>{m['pairs']:,}</td>"
            + "".join(
                f"<td>{'<b>' if src is m else ''}{_pct(src[key])}{'</b>' if src is m else ''}</td>"
                for key in repeat_keys
                for src in (m, u, lm)
            )
            + "</tr>"
        )
    h.append("</table>")
    h.append(_img(figures["repetition"]))

    # Determinism
    h.append("<h2>Does the token decide the expert?</h2>")
    h.append(
        "<p class='ref'>OpenMoE (Xue et al. 2024) §4.1, context-independent specialisation. For token ids seen "
        f"at least {per_layer[str(layers[0])]['determinism']['min_count']} times in the even-numbered windows, "
        "the majority first-choice expert of the id is fitted there and scored on the odd-numbered windows "
        "(held out). Coverage: the share of held-out tokens whose id was fitted. Majority baseline: always "
        "predicting the most used expert.</p>"
    )
    h.append(
        "<table><tr><th>layer</th><th>accuracy</th><th>majority baseline</th><th>chance</th><th>coverage</th>"
        "<th>ids fitted</th>" + "".join(f"<th>pos {html.escape(x)}</th>" for x in results["position_buckets"]) + "</tr>"
    )
    for b in layers:
        det = per_layer[str(b)]["determinism"]
        h.append(
            f"<tr><td>{b}</td><td><b>{_pct(det['accuracy'])}</b></td><td>{_pct(det['majority_baseline'])}</td>"
            f"<td>{_pct(det['chance'])}</td><td>{_pct(det['coverage'], 0)}</td><td>{det['fitted_token_ids']}</td>"
            + "".join(f"<td>{_pct(v, 0)}</td>" for v in det["by_position"])
            + "</tr>"
        )
    h.append("</table>")
    h.append(_img(figures["determinism"]))

    # Top tokens and classes
    h.append("<h2>What each expert takes</h2>")
    h.append(
        "<p class='ref'>ST-MoE (Zoph et al. 2022) §7 and OpenMoE §4.1. First-choice tokens only. Heat map: the "
        "share of each expert's tokens in each class (indent = whitespace at the start of a line, space = other "
        "whitespace, upper/lower = case of the first letter, other = non-ASCII). Tables: the most frequent tokens "
        "of each expert (share of its tokens) and the tokens with the highest lift P(token | expert) / P(token) "
        "(ids seen ≥ 20 times, ≥ 5 at the expert). ␣ space, ↵ newline, ⇥ tab.</p>"
    )
    h.append(_img(figures["classes"]))
    for b in chosen:
        row = per_layer[str(b)]
        colors = expert_colors(num_experts)
        h.append(
            f"<h3>layer {b}</h3><table><tr><th>expert</th><th class='l'>speciality</th><th>tokens</th>"
            "<th class='l'>top by count</th><th class='l'>top by lift</th></tr>"
        )
        for e, top in enumerate(row["top_tokens"]):
            by_count = " ".join(
                f"{_tok(lab)}&nbsp;{share:.0%}" for lab, _, _, share in top["by_count"][:8] if share >= 0.01
            )
            by_lift = " ".join(f"{_tok(lab)}&nbsp;×{lift:.1f}" for lab, _, lift, _ in top["by_lift"][:8] if lift >= 1)
            h.append(
                f"<tr><td style='background:{_hex(colors[e])};color:{_hex(_text_on(colors[e]))}'>{e}</td>"
                f"<td class='l'>{html.escape(row['classes']['speciality'][e])}</td><td>{top['tokens']:,}</td>"
                f"<td class='l'>{by_count}</td><td class='l'>{by_lift}</td></tr>"
            )
        h.append("</table>")

    # Load and entropy, drops
    h.append("<h2>Load and router entropy</h2>")
    h.append(
        "<p class='ref'>ST-MoE §7 and Switch Transformers. Share of all assignments per expert (dashed: 1/E), "
        "the coefficient of variation of the counts (0 = even), dead experts (no assignment on the whole probe) "
        f"and the mean entropy of the router's distribution in nats (max log E = {math.log(num_experts):.3f}).</p>"
    )
    h.append(_img(figures["load"]))
    h.append("<h2>Capacity drops by position</h2>")
    if "drops" in figures:
        h.append(
            f"<p class='ref'>OpenMoE §4.3 (drops towards the end of sequences). The training capacity (factor "
            f"{cfg['capacity_factor']}, priority {cfg['drop_priority']}) replayed on the recorded choices, batch "
            f"by batch of {cfg['batch_size']} windows: the share of assignments an expert over capacity drops.</p>"
        )
        h.append(_img(figures["drops"]))
    else:
        h.append("<p class='note'>This model trains dropless (capacity_factor None): no assignment is dropped.</p>")

    # Stability
    h.append("<h2>Routing stability over training</h2>")
    stability = results["stability"]
    if stability["note"]:
        h.append(f"<p class='note'>{html.escape(stability['note'])}.</p>")
    else:
        h.append(
            "<p class='ref'>OpenMoE §4.2 (routing is fixed early in training). Each checkpoint's routing on the "
            "same probe, compared with MODEL's: the share of first choices equal, and of top-k choices in common.</p>"
        )
        h.append(
            "<table><tr><th class='l'>checkpoint</th><th>step</th>"
            + "".join(f"<th>layer {b}: first</th><th>top-k</th>" for b in layers)
            + "</tr>"
        )
        for row in stability["checkpoints"]:
            h.append(
                f"<tr><td class='l'><code>{html.escape(row['path'])}</code></td><td>{row['step']}</td>"
                + "".join(
                    f"<td>{_pct(row['per_layer'][str(b)]['first'])}</td><td>{_pct(row['per_layer'][str(b)]['topk'])}</td>"
                    for b in layers
                )
                + "</tr>"
            )
        h.append("</table>")
        h.append(_img(figures["stability"]))
    h.append("</body></html>")
    return "\n".join(h)
