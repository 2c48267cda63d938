"""``surveypipe train lens_screen``: give a lens model a one-view screen, so the stage runs the full
eight-view model only on the candidates that could matter.

The shipped lens network averages 8 symmetries of the stamp (x 16 fixed dropout masks). Most
deflector candidates are ordinary galaxies that score near zero under any view. The screen is the
same network and weights exported with one view (``tta=1``, about 8x cheaper). The stage scores
every candidate with it and re-scores with the full model those at or above the screen threshold.
The rest keep the screen's score and the ``screened`` flag.

The threshold comes from the validation sets (validation seeds only). First, which stamps matter: those
whose full-model score reaches ``fpr`` (1 %) of the ordinary validation negatives. The threshold is
the lowest screen score among them, divided by ``safety`` (2). No stamp of the validation sets that
the full model puts above the FPR-1 % line is screened out, with a factor of 2 to spare. The card
records the threshold, the rule and what passed. ``surveypipe train lenses`` adds a screen to every
model it trains; this command adds one to an existing model directory (it rewrites ``card.json``
and writes ``screen.onnx``)::

    surveypipe train lens_screen --model stages/models/lenses --workdir out/train/lenses/cache
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SCREEN_ONNX = "screen.onnx"


def screen_threshold(full: np.ndarray, screen: np.ndarray, label: np.ndarray, ordinary: np.ndarray, *,
                     fpr: float = 0.01, safety: float = 2.0) -> dict[str, Any]:
    """The screen threshold and what it keeps: ``full``/``screen`` lens scores of the same stamps,
    ``label`` 1 for lenses, ``ordinary`` True for the ordinary negatives that set the FPR line."""
    neg = np.sort(full[ordinary & (label == 0)])[::-1]
    if neg.size < int(np.ceil(1.0 / fpr)):
        raise ValueError(f"{neg.size} ordinary negatives cannot set an FPR of {fpr:g}")
    line = float(neg[int(fpr * neg.size)])
    matter = full >= line
    lowest = float(screen[matter].min())
    thr = lowest / safety
    keep = screen >= thr
    return {"threshold": round(thr, 6), "fpr_line": fpr, "full_score_at_fpr_line": round(line, 6),
            "safety": safety, "lowest_screen_score_above_the_line": round(lowest, 6),
            "n_above_the_line": int(matter.sum()),
            "ordinary_negatives_passing": round(float(keep[ordinary & (label == 0)].mean()), 4),
            "lenses_passing": round(float(keep[label == 1].mean()), 4) if (label == 1).any() else None}


def export_screen(model_dir: Path, out_name: str = SCREEN_ONNX) -> tuple[Path, float]:
    """``out_name`` (``screen.onnx``): the model's torch weights with one view; returns the path and max
    |ORT - torch| on fresh inputs."""
    import torch

    from pipeline.cutouts import CutoutSpec
    from pipeline.modelcard import load_card

    from . import stamps as S

    card = load_card(model_dir)
    net = dict(card.training.get("net") or {})
    if not net or not (model_dir / "model.pt").exists():
        raise ValueError(f"{model_dir}: a screen needs the card's training.net and model.pt")
    net["tta"] = 1
    spec = CutoutSpec.from_card(card)
    model = S.stamp_net(spec.channels, len(card.classes), **net)
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    tmp = model_dir / ".screen-export"
    tmp.mkdir(exist_ok=True)
    path, diff = S.export_stamp_model(model, tmp, spec)
    out = model_dir / out_name
    path.replace(out)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return out, diff


def add_screen(model_dir: str | Path, sets: Sequence[Any], *, fpr: float = 0.01, safety: float = 2.0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the screen, choose its threshold on the lens ``sets`` (validation :class:`LensSet`s) and
    write both into the card. Returns the card's ``screen`` entry. On any failure the model is left as it was."""
    from pipeline.modelcard import load_card, write_card

    model_dir = Path(model_dir)
    path, diff = export_screen(model_dir, ".screen.onnx.new")  # moved into place once the threshold is set
    try:
        card = load_card(model_dir)
        entry = _screen_entry(model_dir, card, path, diff, sets, fpr, safety, log)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    path.replace(model_dir / SCREEN_ONNX)
    write_card(model_dir, card.model_copy(update={"screen": entry}))
    readme_with_screen(model_dir / "README.md", entry)
    return entry


def _screen_entry(model_dir: Path, card: Any, path: Path, diff: float, sets: Sequence[Any], fpr: float, safety: float,
                  log: Callable[[str], None]) -> dict[str, Any]:
    import time

    from pipeline.modelcard import sha256_file
    from pipeline.onnx import run_batched, session

    from . import stamps as S

    k = list(card.classes).index("lens")
    name = next(iter(card.inputs), "input")  # the stamp input's name (one input)
    full_s, screen_s = session(card.onnx_path(model_dir), device="cpu"), session(path, device="cpu")
    scores: dict[str, list[np.ndarray]] = {"full": [], "screen": [], "label": [], "ordinary": []}
    t_full = t_screen = 0.0
    for ls in sets:
        x = ls.x.astype(np.float32)
        t0 = time.process_time()
        scores["full"].append(run_batched(full_s, {name: x}, batch=256, outputs=["probs"])[0][:, k])
        t1 = time.process_time()
        scores["screen"].append(run_batched(screen_s, {name: x}, batch=256, outputs=["probs"])[0][:, k])
        t_full, t_screen = t_full + t1 - t0, t_screen + time.process_time() - t1
        scores["label"].append(np.asarray(ls.label))
        scores["ordinary"].append(np.asarray(ls.kind) == S.LENS_KINDS.index("ordinary"))
    c = {key: np.concatenate(v) for key, v in scores.items()}
    info = screen_threshold(c["full"], c["screen"], c["label"], c["ordinary"], fpr=fpr, safety=safety)
    entry = {"onnx": SCREEN_ONNX, "sha256": sha256_file(path), **info,
             "meaning": "the same network and weights on one view of the stamp (no symmetries); the stage runs it on "
                        "every candidate and the full model where its lens score is at least the threshold",
             "onnx_vs_torch_max_abs_diff": diff, "n_validation_stamps": int(c["full"].size),
             "cpu_seconds_full_vs_screen": [round(t_full, 2), round(t_screen, 2)],
             "rule": f"threshold = (lowest screen score of the validation stamps whose full score reaches the "
                     f"FPR-{fpr:g} line of the ordinary negatives) / {safety:g}"}
    log(f"lens screen: threshold {entry['threshold']} (lowest screen score above the FPR-{fpr:g} line "
        f"{info['lowest_screen_score_above_the_line']}, {info['n_above_the_line']} stamps); passes "
        f"{info['ordinary_negatives_passing']:.1%} of the ordinary negatives and {info['lenses_passing']:.1%} of the lenses; "
        f"CPU {t_full:.1f} s full vs {t_screen:.1f} s screen on {c['full'].size} stamps; |ORT - torch| {diff:.1e}")
    return entry


def readme_with_screen(path: Path, entry: dict[str, Any]) -> None:
    """Put the screen's section into a model README (replacing an older one), leaving the rest as it is."""
    from .lenses import screen_section

    lines = path.read_text().split("\n") if path.exists() else []
    if "## Screen" in lines:  # drop the old section: its heading, the blank line before it, and its text
        i = lines.index("## Screen")
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ") or lines[k].startswith("The benchmark")),
                 len(lines))
        lines = lines[:max(i - 1, 0)] + lines[j - 1:]
    at = next((k for k, ln in enumerate(lines) if ln.startswith("The benchmark")), len(lines))
    new = screen_section(entry)
    if at < len(lines) and at > 0 and lines[at - 1] == "":
        at -= 1
    path.write_text("\n".join(lines[:at] + new + lines[at:]))


def card_val_seed(card: Any) -> int:
    """The validation seed a lens card's metrics were measured on ("validation seed N: ...")."""
    import re

    m = re.match(r"validation seed (\d+)", str(card.metrics.get("holdout", "")))
    if not m:
        raise ValueError(f"model {card.name!r}: its card names no validation seed; give --val-seed")
    return int(m.group(1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surveypipe train lens_screen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="lens model directory (card.json, model.onnx, model.pt)")
    p.add_argument("--val-seed", type=int, default=None, help="validation seed of the lens set (default: the card's)")
    p.add_argument("--val-negatives", type=int, default=30000, help="extra ordinary validation negatives (0: none)")
    p.add_argument("--val-neg-seed", type=int, default=2200, help="their seed (2000-2999)")
    p.add_argument("--workdir", type=Path, default=Path("out/train/lenses/cache"), help="simulated sets are cached here")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the validation set sizes (smoke tests: 0.01)")
    p.add_argument("--field", type=int, default=None, help="mosaic field side (pixels; smoke tests: 256)")
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--safety", type=float, default=2.0)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from pipeline.cutouts import CutoutSpec
    from pipeline.errors import ConfigError
    from pipeline.modelcard import load_card

    from . import stamps as S
    from .lenses import STAGE_CUT, cached_lens_set, set_counts

    try:
        card = load_card(a.model)
        spec = CutoutSpec.from_card(card)
        val_seed = a.val_seed if a.val_seed is not None else card_val_seed(card)
        S.check_purpose(val_seed, "validation")
        if a.val_negatives:
            S.check_purpose(a.val_neg_seed, "validation")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    field = a.field or S.FIELD
    kw = {"field_px": field, "pool_px": None}
    _, va_counts = set_counts(a.scale, 1.0)
    sets = [cached_lens_set(a.workdir, val_seed, "validation", va_counts, spec, 0.0, kw)]
    if a.val_negatives:
        sets.append(cached_lens_set(a.workdir, a.val_neg_seed, "validation", {"ordinary": int(a.val_negatives * a.scale)},
                                    spec, 0.0, {**kw, "cut": STAGE_CUT}))
    try:
        add_screen(a.model, sets, fpr=a.fpr, safety=a.safety)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
