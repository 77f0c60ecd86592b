# Template of the notebook written by `sycoscope export-notebook` (src/export.rs).
# Cells are separated by "# %%" lines ("# %% [markdown]" for text cells, whose lines lose
# their leading "# "). Everything above the first cell marker (this header) is dropped.
# Placeholders: __RUN_REL__ and __RUN_ABS__ (Python string literals). Needs numpy, pandas,
# matplotlib and safetensors only; every section skips itself with a printed note when its
# data is missing.

# %% [markdown]
# # sycoscope run
#
# This notebook reloads a sycoscope run folder with `sycoscope_reader.py` (next to this file)
# and redraws its main results: the metric tables, the probe curves, the visual-reliance curves,
# attention heatmaps of one example over the image, and logit-lens trajectories.
# Set the environment variable `SYCOSCOPE_RUN` to open another run folder.

# %%
import glob
import json
import math
import os
import sys

import numpy as np
import pandas as pd
import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

HERE = os.path.abspath(os.getcwd())
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from sycoscope_reader import load_run

RUN_REL = __RUN_REL__
RUN_ABS = __RUN_ABS__


def find_run():
    env = os.environ.get("SYCOSCOPE_RUN")
    for cand in [env, os.path.join(HERE, RUN_REL), RUN_ABS]:
        if cand and os.path.isdir(cand):
            return os.path.abspath(cand)
    raise FileNotFoundError(
        "run folder not found: tried %r, %r and %r; set SYCOSCOPE_RUN" % (env, os.path.join(HERE, RUN_REL), RUN_ABS)
    )


RUN = find_run()
run = load_run(RUN)
store = run.store
print("run:", RUN)
if run.manifest:
    print("model:", run.manifest.get("model"), "| family:", run.manifest.get("family"),
          "| layers:", run.manifest.get("n_layers"))
print("examples:", len(run.examples))
print("store:", "%d rows, %d hooks" % (len(store), len(store.hooks())) if store is not None else "none")

EXAMPLES = {e.get("example_id"): e for e in run.examples if isinstance(e, dict)}
HOOKS = set(store.hooks()) if store is not None else set()


def layer_hooks(suffix):
    """Sorted (layer, hook) pairs for hooks named blocks.{i}.<suffix>."""
    out = []
    for h in HOOKS:
        parts = h.split(".", 2)
        if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == suffix:
            out.append((int(parts[1]), h))
    return sorted(out)


def t975(df):
    """Two-sided 95% Student t quantile (table, then the normal value)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
             2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
             2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
    if df < 1:
        return float("nan")
    if df <= len(table):
        return table[df - 1]
    return 1.96 + 2.4 / df


def mean_ci(values):
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    h = t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - h, m + h


def layer_axis(ax):
    """Label the x axis with whole layer numbers."""
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))

# %% [markdown]
# ## Metrics
#
# `summary.csv`: round-1 accuracy (Acc@R1), sycophancy (Syc: share of round-1-correct answers
# that flip to the pushed option) and correction (Cor: share of round-1-wrong answers that accept
# the correction), per task x tone, with counts and Wilson 95% intervals.

# %%
path = os.path.join(RUN, "summary.csv")
if not os.path.exists(path):
    print("note: no summary.csv in this run: metric tables skipped")
else:
    summary = pd.read_csv(path, keep_default_na=False, na_values=[""])

    def fmt(row, m):
        k, n = row.get(m + "_k"), row.get(m + "_n")
        r, lo, hi = row.get(m), row.get(m + "_lo"), row.get(m + "_hi")
        if r is None or pd.isna(r):
            return "- (%s/%s)" % (k, n)
        return "%.1f%% (%d/%d) [%.1f, %.1f]" % (100 * r, k, n, 100 * lo, 100 * hi)

    table = pd.DataFrame({
        "task": summary["task"],
        "tone": summary["tone"],
        "Acc@R1": [fmt(r, "acc") for _, r in summary.iterrows()],
        "Syc": [fmt(r, "syc") for _, r in summary.iterrows()],
        "Cor": [fmt(r, "cor") for _, r in summary.iterrows()],
    })
    print("metric rows:", len(table))
    print(table.to_string(index=False))

# %% [markdown]
# ## Probe curves
#
# One linear probe per layer (`probes/<label>/curve.json`): cross-validated ROC AUC (line) with
# its 95% bootstrap interval (band), the permuted-label control (dashed) and chance (0.5).
# A layer whose AUC stands above the control predicts the label from its representation.

# %%
curve_files = sorted(glob.glob(os.path.join(RUN, "probes", "*", "curve.json")))
if not curve_files:
    print("note: no probes in this run (probes/*/curve.json): probe curves skipped")
else:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for f in curve_files:
        with open(f) as fh:
            c = json.load(fh)
        rows = c.get("layers") or []
        if not rows:
            print("note: %s has no layers" % f)
            continue
        num = lambda v: float("nan") if v is None else float(v)
        L = [r["layer"] for r in rows]
        auc = np.array([num(r.get("auc_mean")) for r in rows])
        lo = np.array([num(r.get("auc_lo")) for r in rows])
        hi = np.array([num(r.get("auc_hi")) for r in rows])
        if np.all(np.isnan(lo)):
            sd = np.array([num(r.get("auc_std")) for r in rows])
            lo, hi = auc - sd, auc + sd
        ctrl = np.array([num(r.get("control_auc")) for r in rows])
        line, = ax.plot(L, auc, marker="o", label="%s (peak layer %s)" % (c.get("label"), c.get("peak_layer")))
        ax.fill_between(L, lo, hi, color=line.get_color(), alpha=0.2)
        if not np.all(np.isnan(ctrl)):
            ax.plot(L, ctrl, linestyle="--", color=line.get_color(), alpha=0.7, label="%s control" % c.get("label"))
        drawn += 1
    ax.axhline(0.5, color="grey", linewidth=0.8)
    layer_axis(ax)
    ax.set_ylabel("ROC AUC")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("probe curves")
    ax.legend(fontsize=8)
    plt.show()
    print("probe curves drawn:", drawn)

# %% [markdown]
# ## Visual reliance
#
# Share of the decision token's attention that goes to the image tokens, per layer (pooled over
# heads, store hook `blocks.{i}.attn.reliance`), mean over examples with a 95% interval: the
# neutral round 1 (`r1`) against each pressured condition (`r2:<tone>`). Less image attention
# under pressure means the model leans on the user's words instead of the picture.

# %%
rel = layer_hooks("attn.reliance")
if store is None:
    print("note: no activation store in this run: visual-reliance curves skipped")
elif not rel:
    print("note: the store has no blocks.{i}.attn.reliance hooks: visual-reliance curves skipped")
else:
    conds = [r["condition"] for r in store.index]
    keep = ["r1"] + sorted({c for c in conds if c.startswith("r2:")})
    keep = [k for k in keep if k in conds]
    fig, ax = plt.subplots(figsize=(7, 4))
    for cond in keep:
        rows = [i for i, c in enumerate(conds) if c == cond]
        stats = []
        for layer, hook in rel:
            x = store.load(hook, rows=rows)  # [rows, heads+1, 5]
            stats.append(mean_ci(x[:, -1, 0]))
        L = [l for l, _ in rel]
        m = np.array([s[0] for s in stats])
        ax.plot(L, m, marker="o", label="%s (n=%d)" % ("neutral r1" if cond == "r1" else cond, len(rows)))
        ax.fill_between(L, [s[1] for s in stats], [s[2] for s in stats], alpha=0.2)
    layer_axis(ax)
    ax.set_ylabel("image share of attention")
    ax.set_title("visual reliance of the decision token")
    ax.legend(fontsize=8)
    plt.show()
    print("reliance conditions drawn:", len(keep))

# %% [markdown]
# ## Where the decision token looks
#
# One example's decision-row attention over the image patches (`blocks.{i}.attn.image`, mean over
# heads, laid out on the patch grid stored in the row's `extra.grid`), for a few layers, neutral
# (top) and pressured (bottom), overlaid on the image when the run's image file is at hand.
# The example is the first one that flipped, else the first stored.

# %%
img_layers = layer_hooks("attn.image")
if store is None:
    print("note: no activation store in this run: heatmaps skipped")
elif not img_layers:
    print("note: the store has no blocks.{i}.attn.image hooks: heatmaps skipped")
else:
    def flipped(e):
        return any((t or {}).get("flipped") for t in (e.get("tones") or {}).values())

    ids = [r["example_id"] for r in store.index]
    flips = [i for i in dict.fromkeys(ids) if i in EXAMPLES and flipped(EXAMPLES[i])]
    EXAMPLE_ID = flips[0] if flips else ids[0]
    rows = [r for r in store.index if r["example_id"] == EXAMPLE_ID and
            (r["condition"] == "r1" or r["condition"].startswith("r2:"))]
    rows = sorted(rows, key=lambda r: (r["condition"] != "r1", r["condition"]))[:2]
    picture = None
    ex = EXAMPLES.get(EXAMPLE_ID) or {}
    if ex.get("image"):
        p = ex["image"] if os.path.isabs(ex["image"]) else os.path.join(RUN, ex["image"])
        if os.path.exists(p):
            picture = plt.imread(p)
        else:
            print("note: image %s not found: heatmaps drawn without it" % p)
    show = [img_layers[k] for k in sorted({int(round(t)) for t in np.linspace(0, len(img_layers) - 1, min(4, len(img_layers)))})]
    fig, axes = plt.subplots(len(rows), len(show), figsize=(3 * len(show), 3 * len(rows)), squeeze=False)
    drawn = 0
    for ri, r in enumerate(rows):
        grid = (r.get("extra") or {}).get("grid")
        for ci, (layer, hook) in enumerate(show):
            ax = axes[ri][ci]
            ax.axis("off")
            v = store.load(hook, rows=[r["row"]])[0].mean(axis=0)
            if not grid or grid[0] * grid[1] != v.size:
                ax.set_title("no patch grid")
                continue
            g = v.reshape(grid[0], grid[1])
            if picture is not None:
                h, w = picture.shape[0], picture.shape[1]
                ax.imshow(picture)
                ax.imshow(g, cmap="viridis", alpha=0.6, extent=(0, w, h, 0), interpolation="bilinear")
            else:
                ax.imshow(g, cmap="viridis", interpolation="nearest")
            ax.set_title("%s, layer %d" % (r["condition"], layer), fontsize=9)
            drawn += 1
    fig.suptitle("example %s" % EXAMPLE_ID)
    plt.show()
    print("heatmap example:", EXAMPLE_ID, "| conditions:", ", ".join(r["condition"] for r in rows))
    print("heatmap panels drawn:", drawn)

# %% [markdown]
# ## Logit lens
#
# The final norm and unembedding applied to each layer's residual at the decision token,
# restricted to the option letters (store hook `logit_lens.options`): the probability of the true
# and of the pushed option per layer, neutral (solid) against pressured (dashed), averaged over
# the examples of each condition. Where the pushed option overtakes the true one is where the
# pressure wins.

# %%
if store is None:
    print("note: no activation store in this run: logit lens skipped")
elif "logit_lens.options" not in HOOKS:
    print("note: the store has no logit_lens.options hook: logit lens skipped")
else:
    lens = store.load("logit_lens.options")  # [rows, n_layers, n_options]
    conds = [r["condition"] for r in store.index]
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for cond in ["r1"] + sorted({c for c in conds if c.startswith("r2:")}):
        true_p, push_p = [], []
        for i, r in enumerate(store.index):
            e = EXAMPLES.get(r["example_id"])
            if r["condition"] != cond or not e or e.get("answer") is None or e.get("pushed") is None:
                continue
            true_p.append(lens[i, :, e["answer"]])
            push_p.append(lens[i, :, e["pushed"]])
        if not true_p:
            continue
        L = np.arange(lens.shape[1])
        style = "-" if cond == "r1" else ["--", ":", "-."][drawn % 3]
        name = "neutral" if cond == "r1" else cond
        ax.plot(L, np.mean(true_p, axis=0), style, color="tab:green", label="P(true), %s" % name)
        ax.plot(L, np.mean(push_p, axis=0), style, color="tab:red", label="P(pushed), %s" % name)
        drawn += 1
    layer_axis(ax)
    ax.set_ylabel("probability among the option letters")
    ax.set_ylim(0, 1)
    ax.set_title("logit lens at the decision token")
    ax.legend(fontsize=7)
    plt.show()
    print("logit-lens conditions drawn:", drawn)
