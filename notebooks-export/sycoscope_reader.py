"""Read a sycoscope run and its activation store from Python, with numpy + safetensors only.

Layout (written by sycoscope's Rust ``store`` module)::

    RUN/manifest.json, RUN/examples.jsonl, RUN/summary.json     the run
    RUN/store/manifest.json                                      store provenance
    RUN/store/index.jsonl                                        one JSON object per row
    RUN/store/shard-NNNNNN.safetensors                           float32 [rows, ...] per hook

Only committed rows are visible, exactly as in the Rust reader: a torn last index line and the
index lines of a partly indexed last shard are ignored, as are shard files without index lines.

Example::

    from sycoscope_reader import open_store, load_run
    st = open_store("runs/qwen-mmsy")
    x = st.load("blocks.12.hook_resid_post")            # [rows, d_model]
    syc = st.select(lambda r: r["labels"].get("sycophantic") == 1)
    y = st.load("blocks.12.hook_resid_post", rows=syc)
    df = st.frame()                                     # needs pandas
"""

import difflib
import json
import os

import numpy as np
from safetensors import safe_open

__all__ = ["Store", "Run", "open_store", "load_run"]

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.jsonl"


def _shard_path(store_dir, shard):
    return os.path.join(store_dir, "shard-%06d.safetensors" % shard)


def _read_jsonl(path):
    """Complete (newline-terminated) lines of a JSONL file as dicts; a torn last line is dropped."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    lines = data.split(b"\n")
    for lineno, line in enumerate(lines[:-1], start=1):  # lines[-1] has no newline: torn or empty
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            raise ValueError("%s: line %d: malformed JSON: %s" % (path, lineno, e)) from None
    return out


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _resolve_store_dir(path):
    if os.path.exists(os.path.join(path, INDEX_FILE)):
        return path
    sub = os.path.join(path, "store")
    if os.path.exists(os.path.join(sub, MANIFEST_FILE)):
        return sub
    return path


class Store:
    """A sycoscope activation store.

    Attributes: ``dir`` (the store folder), ``manifest`` (dict), ``index`` (list of dicts with
    ``row``, ``shard``, ``shard_row``, ``example_id``, ``condition``, ``task``, ``tone``,
    ``labels``, ``extra``), in row order.
    """

    def __init__(self, store_dir):
        self.dir = store_dir
        mpath = os.path.join(store_dir, MANIFEST_FILE)
        if not os.path.exists(mpath):
            raise FileNotFoundError(
                "%s not found: not a sycoscope store (expected RUN/store/manifest.json)" % mpath
            )
        self.manifest = _read_json(mpath)
        ipath = os.path.join(store_dir, INDEX_FILE)
        rows = _read_jsonl(ipath) if os.path.exists(ipath) else []
        self._shards = []  # (shard, first_row, rows, path)
        self.index = []
        i = 0
        while i < len(rows):
            shard = rows[i]["shard"]
            j = i
            while j < len(rows) and rows[j]["shard"] == shard:
                j += 1
            path = _shard_path(store_dir, shard)
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
            n = int(meta.get("rows", -1))
            first = int(meta.get("first_row", -1))
            if first != i or j - i > n:
                raise ValueError(
                    "%s holds rows %d..%d but the index puts rows %d..%d in it"
                    % (path, first, first + n, i, j)
                )
            if j - i < n:
                if j == len(rows):
                    break  # last shard only partly indexed: not committed
                raise ValueError("%s: shard %d has %d rows but only %d are indexed" % (ipath, shard, n, j - i))
            self._shards.append((shard, i, n, path))
            self.index.extend(rows[i:j])
            i = j
        for k, r in enumerate(self.index):
            if r["row"] != k:
                raise ValueError("%s: row number %s out of sequence (expected %d)" % (ipath, r["row"], k))
        self._keys = None

    def __len__(self):
        return len(self.index)

    def __repr__(self):
        return "Store(%r, rows=%d, hooks=%d)" % (self.dir, len(self), len(self.hooks()))

    def _shard_keys(self):
        if self._keys is None:
            self._keys = []
            for _, _, _, path in self._shards:
                with safe_open(path, framework="np") as f:
                    self._keys.append(set(f.keys()))
        return self._keys

    def hooks(self):
        """Hook names present in any shard, sorted."""
        out = set()
        for k in self._shard_keys():
            out |= k
        return sorted(out)

    def _check_hook(self, hook):
        keys = self._shard_keys()
        if not any(hook in k for k in keys):
            near = difflib.get_close_matches(hook, self.hooks(), n=1, cutoff=0.0)
            hint = " (did you mean %r?)" % near[0] if near else ""
            raise KeyError("unknown hook %r%s" % (hook, hint))
        for (shard, first, n, _), k in zip(self._shards, keys):
            if hook not in k:
                raise KeyError("hook %r is missing from shard %d (rows %d..%d)" % (hook, shard, first, first + n))

    def iter_shards(self, hook):
        """Yield ``(first_row, array[rows_in_shard, ...])`` for ``hook``, one shard at a time."""
        self._check_hook(hook)
        for _, first, _, path in self._shards:
            with safe_open(path, framework="np") as f:
                yield first, f.get_tensor(hook)

    def load(self, hook, rows=None):
        """``hook`` for all rows (or the given row numbers, in that order), stacked [rows, ...]
        as float32, like the Rust ``StoreReader::read`` / ``read_rows``."""
        self._check_hook(hook)
        if rows is None:
            parts = [a for _, a in self.iter_shards(hook)]
            if not parts:
                raise ValueError("store %s has no committed rows" % self.dir)
            self._same_shape(hook, parts)
            return np.concatenate(parts, axis=0)
        rows = [int(r) for r in rows]
        for r in rows:
            if r < 0 or r >= len(self.index):
                raise IndexError("row %d is out of range: the store has %d rows" % (r, len(self.index)))
        by_shard = {}
        for k, r in enumerate(rows):
            by_shard.setdefault(self.index[r]["shard"], []).append(k)
        pieces = [None] * len(rows)
        for shard, first, _, path in self._shards:
            ks = by_shard.get(shard)
            if not ks:
                continue
            local = [rows[k] - first for k in ks]
            with safe_open(path, framework="np") as f:
                sl = f.get_slice(hook)
                lo, hi = min(local), max(local) + 1
                block = sl[lo:hi]
            for k, l in zip(ks, local):
                pieces[k] = block[l - lo]
        if not pieces:
            shape = self._shape_of(hook)
            return np.zeros((0,) + shape, dtype=np.float32)
        self._same_shape(hook, [p[None] for p in pieces])
        return np.stack(pieces, axis=0)

    def load_ragged(self, hook):
        """One array per row (without the row dimension), for hooks of varying length."""
        out = []
        for _, a in self.iter_shards(hook):
            out.extend(a[i] for i in range(a.shape[0]))
        return out

    def _shape_of(self, hook):
        _, _, _, path = self._shards[0]
        with safe_open(path, framework="np") as f:
            return tuple(f.get_slice(hook).get_shape()[1:])

    @staticmethod
    def _same_shape(hook, parts):
        shapes = sorted({tuple(p.shape[1:]) for p in parts})
        if len(shapes) > 1:
            raise ValueError(
                "hook %r has per-row shapes %s in different shards: rows of different lengths "
                "cannot be stacked; use load_ragged" % (hook, shapes)
            )

    def select(self, pred):
        """Row numbers whose index dict satisfies ``pred``."""
        return [r["row"] for r in self.index if pred(r)]

    def frame(self):
        """The index as a pandas DataFrame (needs pandas). Labels become columns of their own
        (prefixed ``label_`` when a label's name clashes with an index field)."""
        import pandas as pd

        base = ["row", "shard", "shard_row", "example_id", "condition", "task", "tone"]
        recs = []
        for r in self.index:
            d = {k: r.get(k) for k in base}
            for k, v in (r.get("labels") or {}).items():
                d["label_" + k if k in base or k == "extra" else k] = v
            d["extra"] = r.get("extra") or {}
            recs.append(d)
        return pd.DataFrame.from_records(recs, columns=None if recs else base + ["extra"])


class Run:
    """A run folder: ``manifest`` (dict or None), ``examples`` (list of dicts from
    ``examples.jsonl``), ``summary`` (dict from ``summary.json`` or None), ``store``
    (:class:`Store` or None)."""

    def __init__(self, run_dir):
        self.dir = run_dir
        p = os.path.join(run_dir, MANIFEST_FILE)
        self.manifest = _read_json(p) if os.path.exists(p) else None
        p = os.path.join(run_dir, "examples.jsonl")
        self.examples = _read_jsonl(p) if os.path.exists(p) else []
        p = os.path.join(run_dir, "summary.json")
        self.summary = _read_json(p) if os.path.exists(p) else None
        sdir = os.path.join(run_dir, "store")
        self.store = Store(sdir) if os.path.exists(os.path.join(sdir, MANIFEST_FILE)) else None

    def __repr__(self):
        return "Run(%r, examples=%d, store=%r)" % (self.dir, len(self.examples), self.store)


def open_store(run_or_store_dir):
    """Open the store of a run folder (``RUN``) or a store folder (``RUN/store``)."""
    return Store(_resolve_store_dir(run_or_store_dir))


def load_run(run_dir):
    """Open a run folder: its manifest, examples, summary and store (any of them may be absent)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError("%s is not a folder" % run_dir)
    return Run(run_dir)
