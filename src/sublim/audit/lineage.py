"""Lineage: do two models share an initialisation (the precondition for subliminal transfer)?

Declared evidence: what the files say (config ``_name_or_path``, adapter ``base_model_name_or_path``,
model-card ``base_model``, sublim's own ``sublim_train.json`` / ``sublim_organism.json``). Declared evidence
can be missing or wrong, so the verdict rests on measured evidence from the weights:

* per-tensor agreement of parameters with the same name and shape: the Pearson correlation ``r`` of the
  flattened tensors and ``z = r * sqrt(n)`` (for independent initialisations r ~ N(0, 1/n), so z ~ N(0, 1)).
  Fine-tuning, LoRA merging and dtype casts move weights a little and keep r near 1; two independent
  initialisations give r ~ 0 whatever the training, because hidden units come out in arbitrary order.
  A tensor *agrees* when z >= 6 (p ~ 1e-9) and r >= 0.05 (a floor against tiny structured
  correlations in very large tensors). The combined evidence over all tensors is Stouffer's z. Constant tensors (norm weights at their init of 1) carry no
  information and are skipped.
* embedding-row agreement over the shared vocabulary (tokens matched by string, so extended or reordered
  vocabularies still line up); when widths differ, a basis-free representational similarity (correlation
  of the token-token cosine matrices) is reported as a family hint, not as evidence of a shared init.

Verdicts: ``same_init`` (most comparable weight agrees), ``same_family`` (some parts agree, e.g. a shared
embedding, or only declared evidence links them), ``unrelated`` (nothing agrees beyond chance; the reason
says why: different architectures, no comparable shapes, or independent initialisation).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from sublim.audit.common import AuditInputError, AuditResult, model_spec
from sublim.report.html import Section

R_MIN = 0.05
Z_MIN = 6.0
SAME_INIT_FRACTION = 0.5
RSA_TOKENS = 1000

VERDICTS = ("same_init", "same_family", "unrelated")
FAIL_ON_SHORTCUTS = {"same_init": "verdict==same_init", "related": "related>=1", "unrelated": "verdict==unrelated",
                     "same_family": "verdict==same_family"}


# ------------------------------------------------------------------------------------------- declared


def _front_matter(readme: Path) -> dict[str, Any]:
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def declared_evidence(spec: Any) -> list[dict[str, Any]]:
    """What the model's files say about where it came from: ``[{"source", "relation", "value"}]``.

    ``relation``: ``base`` (was trained from), ``name`` (what it was saved as), ``init`` (how it was
    initialised, e.g. an organism seed), ``converted_from``."""
    from sublim.models import resolve_path

    spec = model_spec(spec)
    out: list[dict[str, Any]] = []
    dirs: list[tuple[str, Path]] = []
    resolved = Path(resolve_path(spec))
    if resolved.is_dir():
        dirs.append(("model", resolved))
    if spec.adapter:
        dirs.append(("adapter", Path(spec.adapter)))
        out.append({"source": "ModelSpec (base + adapter)", "relation": "base", "value": spec.path})
    for label, d in dirs:
        cfg = d / "config.json"
        if cfg.exists():
            c = json.loads(cfg.read_text())
            if c.get("_name_or_path"):
                out.append({"source": f"{label} config.json _name_or_path", "relation": "name",
                            "value": str(c["_name_or_path"])})
        ad = d / "adapter_config.json"
        if ad.exists():
            a = json.loads(ad.read_text())
            if a.get("base_model_name_or_path"):
                out.append({"source": f"{label} adapter_config.json base_model_name_or_path", "relation": "base",
                            "value": str(a["base_model_name_or_path"])})
        readme = d / "README.md"
        if readme.exists():
            bm = _front_matter(readme).get("base_model")
            for v in (bm if isinstance(bm, list) else [bm] if bm else []):
                out.append({"source": f"{label} README.md base_model", "relation": "base", "value": str(v)})
        st = d / "sublim_train.json"
        if st.exists():
            s = json.loads(st.read_text())
            base = (s.get("base") or {}).get("path")
            if base:
                out.append({"source": f"{label} sublim_train.json base", "relation": "base", "value": str(base)})
        so = d / "sublim_organism.json"
        if so.exists():
            s = json.loads(so.read_text())
            cfg_o = s.get("config") or {}
            seed = cfg_o.get("seed", s.get("seed"))
            out.append({"source": f"{label} sublim_organism.json", "relation": "init",
                        "value": f"sublim organism, init seed {seed}"})
        src = d / "sublim_source.json"
        if src.exists():
            s = json.loads(src.read_text())
            out.append({"source": f"{label} sublim_source.json", "relation": "converted_from",
                        "value": str(s.get("gguf"))})
    return out


def _norm_id(v: str) -> str:
    p = Path(v).expanduser()
    try:
        return str(p.resolve()) if p.exists() else v.strip().rstrip("/")
    except OSError:
        return v


def _declared_link(a: Any, b: Any, da: list[dict[str, Any]], db: list[dict[str, Any]]) -> str | None:
    """A sentence when the declared evidence links the two models, else None."""
    from sublim.models import resolve_path

    ida = {_norm_id(resolve_path(a)), _norm_id(a.path)}
    idb = {_norm_id(resolve_path(b)), _norm_id(b.path)}
    base_a = {_norm_id(d["value"]) for d in da if d["relation"] in ("base", "name")}
    base_b = {_norm_id(d["value"]) for d in db if d["relation"] in ("base", "name")}
    if base_a & idb:
        return "A declares B as its base"
    if base_b & ida:
        return "B declares A as its base"
    common = (base_a & base_b) - {""}
    if common:
        return f"both declare the base {min(common)}"
    init_a = {d["value"] for d in da if d["relation"] == "init"}
    init_b = {d["value"] for d in db if d["relation"] == "init"}
    if init_a & init_b:
        return f"both declare the initialisation {min(init_a & init_b)}"
    return None


# ------------------------------------------------------------------------------------------- measured


class Weights:
    """Read-only access to a model's parameters by name, lazily from safetensors (no unpickling); a base +
    LoRA adapter is loaded and merged instead."""

    def __init__(self, spec: Any, what: str) -> None:
        from sublim.models import resolve_path

        self.spec = spec
        path = Path(resolve_path(spec))
        if not path.is_dir():
            raise AuditInputError(f"{what} {spec.path}: lineage needs local weights (a model directory)")
        self.dir = path
        cfg = path / "config.json"
        self.config: dict[str, Any] = json.loads(cfg.read_text()) if cfg.exists() else {}
        self._sd: dict[str, torch.Tensor] | None = None
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        if spec.adapter:
            from sublim.models import load_model

            model = load_model(spec, dtype="float32")
            self._sd = {_clean_name(k): v.detach() for k, v in model.state_dict().items()}
            self._shape = {k: tuple(v.shape) for k, v in self._sd.items()}
            self._dtype = {k: "float32 (merged adapter)" for k in self._sd}
            return
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise AuditInputError(f"{what} {path}: no *.safetensors weights (sublim never unpickles .bin files)")
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    sl = h.get_slice(k)
                    name = _clean_name(k)
                    self._where[name] = f
                    self._shape[name] = tuple(sl.get_shape())
                    self._dtype[name] = str(sl.get_dtype())

    def names(self) -> list[str]:
        return list(self._shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> str:
        return self._dtype[name]

    def get(self, name: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[name].float()
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if _clean_name(k) == name:
                    return h.get_tensor(k).float()
        raise KeyError(name)

    def dtypes(self) -> list[str]:
        return sorted(set(self._dtype.values()))


def _clean_name(k: str) -> str:
    for pre in ("base_model.model.",):
        k = k.removeprefix(pre)
    return k


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Pearson r, cosine, z = r sqrt(n), relative difference of two same-shape tensors."""
    x = a.flatten().double()
    y = b.flatten().double()
    n = x.numel()
    xc, yc = x - x.mean(), y - y.mean()
    sx, sy = float(xc.norm()), float(yc.norm())
    out: dict[str, Any] = {"n": n, "r": None, "z": None, "cos": None,
                           "rel_diff": float((x - y).norm() / x.norm()) if float(x.norm()) > 0 else None}
    nx, ny = float(x.norm()), float(y.norm())
    if nx > 0 and ny > 0:
        out["cos"] = float(x @ y / (nx * ny))
    if sx <= 1e-12 * max(1.0, nx) or sy <= 1e-12 * max(1.0, ny):
        out["constant"] = True
        return out
    r = float(xc @ yc / (sx * sy))
    out["r"] = r
    out["z"] = r * math.sqrt(n)
    out["constant"] = False
    return out


def _agrees(m: dict[str, Any]) -> bool:
    return m.get("r") is not None and m["r"] >= R_MIN and m["z"] >= Z_MIN


def _embedding_name(w: Weights) -> str | None:
    vocab = w.config.get("vocab_size")
    cands = [n for n in w.names() if len(w.shape(n)) == 2 and re.search(r"embed|wte|word_embeddings", n)]
    for n in cands:
        if vocab is None or w.shape(n)[0] == vocab:
            return n
    return cands[0] if cands else None


def _vocab(spec: Any) -> dict[str, int] | None:
    try:
        from sublim.models import load_tokenizer

        return dict(load_tokenizer(spec).get_vocab())
    except Exception:  # noqa: BLE001 - embedding evidence is optional
        return None


def _embedding_rows(wa: Weights, wb: Weights, sa: Any, sb: Any) -> dict[str, Any]:
    ea_name, eb_name = _embedding_name(wa), _embedding_name(wb)
    if ea_name is None or eb_name is None:
        return {"available": False, "reason": "no input-embedding matrix found"}
    va, vb = _vocab(sa), _vocab(sb)
    if va is None or vb is None:
        return {"available": False, "reason": "tokenizer not loadable"}
    ea, eb = wa.get(ea_name), wb.get(eb_name)
    shared = sorted(t for t in set(va) & set(vb) if va[t] < ea.shape[0] and vb[t] < eb.shape[0])
    out: dict[str, Any] = {"available": True, "embedding_a": ea_name, "embedding_b": eb_name,
                           "vocab_a": len(va), "vocab_b": len(vb), "shared_tokens": len(shared),
                           "shared_fraction": len(shared) / max(1, min(len(va), len(vb))),
                           "width_a": int(ea.shape[1]), "width_b": int(eb.shape[1])}
    if len(shared) < 10:
        out.update(available=False, reason=f"only {len(shared)} shared tokens")
        return out
    ia = torch.tensor([va[t] for t in shared])
    ib = torch.tensor([vb[t] for t in shared])
    ra, rb = ea[ia], eb[ib]  # [S, Da], [S, Db]
    if ra.shape[1] == rb.shape[1]:
        ag = _agreement(ra, rb)
        cos = torch.nn.functional.cosine_similarity(ra.double(), rb.double(), dim=1)
        out.update(r=ag["r"], z=ag["z"], row_cos_median=float(cos.median()), agrees=_agrees(ag))
    else:
        out.update(r=None, z=None, agrees=False, reason=f"embedding widths differ ({ra.shape[1]} vs {rb.shape[1]})")
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(shared), generator=g)[:RSA_TOKENS]
    sa_m = _cos_matrix(ra[pick])
    sb_m = _cos_matrix(rb[pick])
    iu = torch.triu_indices(len(pick), len(pick), 1)
    out["rsa"] = _agreement(sa_m[iu[0], iu[1]], sb_m[iu[0], iu[1]])["r"]
    return out


def _cos_matrix(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x @ x.T


_CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "n_embd", "n_layer")


def lineage(teacher: Any, student: Any, *, max_tensors: int | None = None) -> AuditResult:
    """Compare two models (directories / specs; A = teacher, B = student) and return the verdict with the
    declared and measured evidence. ``max_tensors`` caps how many matched tensors are compared."""
    sa = model_spec(teacher, what="teacher")
    sb = model_spec(student, what="student")
    da, db = declared_evidence(sa), declared_evidence(sb)
    wa, wb = Weights(sa, "teacher"), Weights(sb, "student")
    ca, cb = wa.config, wb.config
    config_diff = {k: [ca.get(k), cb.get(k)] for k in _CONFIG_KEYS if (k in ca or k in cb) and ca.get(k) != cb.get(k)}
    same_type = ca.get("model_type") == cb.get("model_type")
    names = [n for n in wa.names() if n in set(wb.names())]
    shape_mismatch = [n for n in names if wa.shape(n) != wb.shape(n)]
    matched = [n for n in names if wa.shape(n) == wb.shape(n)]
    if max_tensors is not None:
        matched = matched[:max_tensors]
    tensors: list[dict[str, Any]] = []
    for n in matched:
        m = _agreement(wa.get(n), wb.get(n))
        m.update(name=n, shape=list(wa.shape(n)), dtype_a=wa.dtype(n), dtype_b=wb.dtype(n),
                 used=len(wa.shape(n)) >= 2 and not m.get("constant"), agrees=_agrees(m))
        tensors.append(m)
    used = [t for t in tensors if t["used"]]
    n_used = sum(t["n"] for t in used)
    n_agree = sum(t["n"] for t in used if t["agrees"])
    frac = n_agree / n_used if n_used else 0.0
    emb = _embedding_rows(wa, wb, sa, sb)
    link = _declared_link(sa, sb, da, db)
    rs = [t["r"] for t in used]
    stouffer = sum(t["z"] for t in used) / math.sqrt(len(used)) if used else None
    # -- verdict
    if used and frac >= SAME_INIT_FRACTION:
        verdict = "same_init"
        reason = (f"{sum(t['agrees'] for t in used)}/{len(used)} comparable tensors ({frac:.0%} of their parameters) "
                  f"agree (median r = {_median(rs):.3f})")
    elif (used and n_agree > 0) or emb.get("agrees"):
        verdict = "same_family"
        parts = [t["name"] for t in used if t["agrees"]][:5]
        reason = ("part of the weights agree: " + (", ".join(parts) if parts else "embedding rows over the shared "
                  "vocabulary") + f"; {frac:.0%} of comparable parameters agree")
    elif link and not used:
        verdict = "same_family"
        reason = f"declared only ({link}); the weights cannot be compared (no tensor of the same name and shape)"
    else:
        verdict = "unrelated"
        if not same_type:
            reason = (f"different architectures ({ca.get('model_type')} vs {cb.get('model_type')}): "
                      f"{len(used)} comparable tensors, none agrees")
        elif not used:
            dims = ", ".join(f"{k} {v[0]} vs {v[1]}" for k, v in config_diff.items() if k != "architectures")
            reason = f"no comparable tensors (same name and shape){': ' + dims if dims else ''}"
        else:
            zs = [abs(t["z"]) for t in used]
            reason = (f"independently initialised: none of {len(used)} comparable tensors agrees beyond chance "
                      f"(max |r| = {max(abs(r) for r in rs):.3f}, max |z| = {max(zs):.1f}; threshold r >= {R_MIN} "
                      f"and z >= {Z_MIN})")
    notes = []
    if link and verdict == "unrelated":
        notes.append(f"Declared evidence says the models are related ({link}) but the weights disagree: the "
                     "declaration is wrong, or the weights were re-initialised.")
    if verdict == "unrelated" and same_type and not config_diff:
        notes.append("Same architecture and configuration (a family by design) but no shared initialisation: "
                     "subliminal transfer is not expected between them.")
    if verdict == "same_init" and wa.dtypes() != wb.dtypes():
        notes.append(f"dtypes differ ({', '.join(wa.dtypes())} vs {', '.join(wb.dtypes())}); the verdict is "
                     "robust to casts.")
    if emb.get("rsa") is not None and verdict == "unrelated" and emb["rsa"] > 0.3:
        notes.append(f"Embedding geometry over the shared vocabulary is similar (RSA {emb['rsa']:.2f}): the models "
                     "learned alike from similar data, but do not share an initialisation.")
    metrics = {
        "verdict": verdict,
        "related": int(verdict != "unrelated"),
        "same_init": int(verdict == "same_init"),
        "agree_fraction": frac,
        "tensors_compared": len(used),
        "tensors_agree": sum(t["agrees"] for t in used),
        "median_r": _median(rs) if rs else None,
        "combined_z": stouffer,
        "min_r": min(rs) if rs else None,
        "embedding_r": emb.get("r"),
        "embedding_rsa": emb.get("rsa"),
    }
    payload = {
        "teacher": {"spec": sa.model_dump(), "dir": str(wa.dir), "dtypes": wa.dtypes()},
        "student": {"spec": sb.model_dump(), "dir": str(wb.dir), "dtypes": wb.dtypes()},
        "verdict": verdict, "reason": reason, "notes": notes,
        "declared": {"teacher": da, "student": db, "link": link},
        "config_diff": config_diff,
        "measured": {"thresholds": {"r_min": R_MIN, "z_min": Z_MIN, "same_init_fraction": SAME_INIT_FRACTION},
                     "tensors": tensors, "shape_mismatch": shape_mismatch[:50],
                     "only_teacher": [n for n in wa.names() if n not in set(wb.names())][:50],
                     "only_student": [n for n in wb.names() if n not in set(wa.names())][:50],
                     "embedding_rows": emb},
    }
    sections = [_html(payload, metrics)]
    summary = [f"lineage: {verdict} ({reason})", *notes]
    return AuditResult("lineage", metrics, payload, sections, title="sublim audit lineage", summary=summary)


def _median(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2


def _html(p: dict[str, Any], metrics: dict[str, Any]) -> Section:
    s = Section("Lineage")
    s.text(f"Verdict: {p['verdict']} ({p['reason']}).", cls="warn" if p["verdict"] != "unrelated" else "")
    for n in p["notes"]:
        s.text(n, cls="note")
    rows: list[list[Any]] = []
    for who in ("teacher", "student"):
        for d in p["declared"][who]:
            rows.append(["declared", who, d["source"], d["relation"], d["value"]])
    rows.append(["declared", "both", "link", "", p["declared"]["link"] or "none"])
    for k, (va, vb) in p["config_diff"].items():
        rows.append(["config", "differs", k, str(va), str(vb)])
    e = p["measured"]["embedding_rows"]
    rows.append(["measured", "embedding rows", f"{e.get('shared_tokens', 0)} shared tokens",
                 f"r={_f(e.get('r'))} row-cos={_f(e.get('row_cos_median'))}", f"RSA={_f(e.get('rsa'))}"
                 + (f" ({e.get('reason')})" if e.get("reason") else "")])
    rows.append(["measured", "tensors", f"{metrics['tensors_compared']} compared",
                 f"{metrics['tensors_agree']} agree", f"{metrics['agree_fraction']:.1%} of parameters"])
    s.table(["kind", "what", "source", "relation / value", "value"], rows)
    t_rows = [[t["name"], "x".join(map(str, t["shape"])), _f(t["r"]), _f(t["z"]), _f(t["cos"]), _f(t["rel_diff"]),
               "yes" if t["agrees"] else ("skipped" if not t["used"] else "no"), f"{t['dtype_a']}/{t['dtype_b']}"]
              for t in p["measured"]["tensors"][:400]]
    s.table(["tensor", "shape", "r", "z", "cos", "rel. diff", "agrees", "dtypes"], t_rows)
    return s


def _f(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
