"""Development split for the built-in perceiver (decisions are made here, never on the benchmark).

Trains the perceiver exactly like ``train_builtin`` (same crop count, sizes, epochs, ensemble) but
on the training photos minus a development split (:data:`DEV_SPLITS`; ``photos``: chelsea,
motorcycle_right, brick, coins; ``textures``: grass, coins, moon, astronaut; ``stones``: three procedural
stone / leaf fields and brick; ``flat``: cell, moon and two procedural skies), then perceives crops of
those four dev photos (160..256 px, the benchmark's crop recipe, none of its held-out photos) degraded by
degrade.py and, with ``--independent``, by the benchmark's independent implementation
(``bench_perceive.INDEPENDENT``). Writes per-image crop logits (and the snow probe's verdict) so post-hoc
decisions (a ``clean`` or ``haze`` logit offset) can be scored without retraining. The shipped recipe
since v6 adds ``--extra-photos DIR/tid2013 DIR/debian`` (``bench/perceiver_photos.py``); pass the same here.

    OMP_NUM_THREADS=1 python bench/dev_perceive.py --out /tmp/dev.pt [--split photos|textures|stones|flat]
        [--per-family 48]
        [--samples 36000] [--hard-snow-share S] [--snow-pair-share S]
        [--probe-decision D] [--sky-share S] [--haze-offset H] [--extra-photos PATH ...] [--independent] [--tiny]
    python bench/dev_perceive.py --score /tmp/dev.pt          # accuracy vs clean- and haze-logit offset
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbridge_core.perceive.features import crop_features  # noqa: E402
from vbridge_core.perceive.labels import LABELS  # noqa: E402
from vbridge_core.perceive.model import (grid_crops, order_snow_clean, prepare_image,  # noqa: E402
                                         snow_or_clean_first)
from vbridge_core.perceive.synth import clean_photos, degrade_with, extra_photos  # noqa: E402
from vbridge_core.perceive.train import (DEFAULT_SAMPLES, HARD_SNOW_SHARE, HAZE_LOGIT_OFFSET,  # noqa: E402
                                         PROBE_DECISION, PROBE_EPOCHS, SKY_SHARE, SNOW_PAIR_SHARE,
                                         build_training_set, fit_ensemble, fit_snow_probe, shift_label_logit,
                                         sky_crops)

#: Development splits: training photos left out of a development run and perceived instead. ``photos``
#: (the first one) is mostly everyday content; ``textures`` is fine bright texture (grass blades, coins,
#: craters) where clean crops get called ``snow``, the failure the benchmark shows on its held-out photos.
#: ``stones`` (procedural stone fields and brick) shows what the other two missed: a snow probe trained with
#: ``--hard-snow-share 0.5`` calls clean stones snow (0 -> 5 of 60), as it did on the held-out photos.
#: ``flat`` (a grey microscope field, the moon and two procedural skies over ground) is large smooth low-contrast
#: areas, where a haze veil is hard to tell from the content: a haze logit offset chosen on the other three
#: read no clean dev image as hazy, but clean flat sky on the held-out photos (bench/RESULTS.md, stop 19).
DEV_SPLITS: dict[str, tuple[str, ...]] = {
    "photos": ("chelsea.png", "motorcycle_right.png", "brick.png", "coins.png"),
    "textures": ("grass.png", "coins.png", "moon.png", "astronaut.png"),
    "stones": ("procedural:0", "procedural:1", "procedural:7", "brick.png"),
    "flat": ("cell.png", "moon.png", "procedural:3", "procedural:9"),
}
DEV_PHOTOS = DEV_SPLITS["photos"]


def dev_crop(photos, rng: np.random.Generator) -> torch.Tensor:
    """The benchmark's own crop recipe (160..256 px, random scale, 8-bit), on the dev photos."""
    from bench_perceive import held_out_crop

    return held_out_crop(photos, rng)


@functools.lru_cache(maxsize=None)
def _training_photos() -> tuple:
    return tuple(clean_photos("train"))  # loaded once: the procedural scenes take seconds to draw


def split_photos(split: str) -> list:
    """The training photos of a dev split, as ``[(name, [3, H, W])]`` (read-only: shared between calls)."""
    names = DEV_SPLITS[split]
    photos = [(n, p) for n, p in _training_photos() if n in names]
    assert len(photos) == len(names), [n for n, _ in photos]
    return photos


def dev_set(per_family: int, seed: int = 777, split: str = "photos"):
    """degrade.py crops of the split's photos: ``per_family`` per label, as (image, label) pairs."""
    photos = split_photos(split)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    items = []
    for lab in LABELS:
        for i in range(per_family):
            x = dev_crop(photos, rng)
            if lab == "clean":
                items.append((x, "clean"))
            else:
                items.append((degrade_with(x, [lab], seed * 100_003 + len(items), gen).image, lab))
    return items


def dev_independent_set(per_family: int, seed: int = 777, split: str = "photos"):
    """The split's photos degraded by the benchmark's independent implementation (PIL / numpy, not degrade.py),
    ``per_family`` per label, as (image, label) pairs: the dev twin of the benchmark's independent set."""
    from bench_perceive import independent_degrade

    photos = split_photos(split)
    rng = np.random.default_rng(seed)
    items = []
    for lab in LABELS:
        for _ in range(per_family):
            x = dev_crop(photos, rng)
            items.append((x if lab == "clean" else independent_degrade(x, lab, rng)[0], lab))
    return items


AGGREGATIONS = {
    "prob-mean": lambda lg: torch.sigmoid(lg).mean(0),          # what Perceiver.perceive does
    "logit-mean": lambda lg: torch.sigmoid(lg.mean(0)),
    "prob-median": lambda lg: torch.sigmoid(lg).median(0).values,
}


def arbitrate(probs: torch.Tensor, probe: float | None) -> torch.Tensor:
    """What ``Perceiver.arbitrate`` does, from a stored probe probability (None: no probe)."""
    if probe is None or not snow_or_clean_first(probs):
        return probs
    return order_snow_clean(probs, probe)


def score(path: str, aggregations=("prob-mean",)) -> None:
    """Accuracy of a saved dev run as the ``clean`` logit (then the ``haze`` logit) is raised after the fact."""
    d = torch.load(path, weights_only=True)  # tensors, strings and lists only: no pickle code runs
    for prefix, title in (("", "degrade.py"), ("ind_", "independent implementation")):
        if prefix + "logits" not in d:
            continue
        logits, labels = d[prefix + "logits"], d[prefix + "labels"]
        probes = d.get(prefix + "probe") or [None] * len(labels)
        print(f"== {title} ({len(labels)} images)")
        for agg in aggregations:
            for target, offsets in (("clean", [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]),
                                    ("haze", [0.5, 1.0, 2.0, 3.0, 4.0, 5.0])):
                for off in offsets:
                    _score_row(logits, labels, probes, agg, target, off)


def _score_row(logits, labels, probes, agg: str, target: str, off: float) -> None:
    """One line of :func:`score`: ``off`` added to the ``target`` logit of every crop."""
    ci, si, ti = LABELS.index("clean"), LABELS.index("snow"), LABELS.index(target)
    conf = np.zeros((len(LABELS), len(LABELS)), int)
    for lg, lab, pr in zip(logits, labels, probes):
        lg = lg.clone()
        lg[:, ti] += off
        pred = int(arbitrate(AGGREGATIONS[agg](lg), pr).argmax())
        conf[LABELS.index(lab), pred] += 1
    acc = np.trace(conf) / conf.sum()
    per = " ".join(f"{lab[:4]}={conf[i, i] / max(1, conf[i].sum()) * 100:.0f}" for i, lab in enumerate(LABELS))
    print(f"{agg:11s} {target} offset {off:+.2f}: acc {acc * 100:.1f}%  {per}  clean->snow {conf[ci, si]}"
          f" snow->clean {conf[si, ci]} clean->haze {conf[ci, LABELS.index('haze')]}")
    if off == 0.0 and agg == "prob-mean":
        print(conf)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--score")
    ap.add_argument("--per-family", type=int, default=48)
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-epochs", type=int, default=PROBE_EPOCHS, help="snow probe passes (0: no probe)")
    ap.add_argument("--hard-snow-share", type=float, default=HARD_SNOW_SHARE,
                    help="share of the probe's clean crops added again with hard_snow flakes as snow")
    ap.add_argument("--snow-pair-share", type=float, default=SNOW_PAIR_SHARE,
                    help="share of the probe's clean crops added again with degrade.py snow")
    ap.add_argument("--probe-decision", type=float, default=PROBE_DECISION,
                    help="the probe says snow above this probability of its training mix")
    ap.add_argument("--sky-share", type=float, default=SKY_SHARE,
                    help="procedural sky crops added to the probe's clean crops, as a share of --samples")
    ap.add_argument("--haze-offset", type=float, default=HAZE_LOGIT_OFFSET,
                    help="added to the fitted MLPs' haze logit (the shipped recipe's HAZE_LOGIT_OFFSET by default)")
    ap.add_argument("--extra-photos", nargs="+", metavar="PATH", default=None,
                    help="clean photos added to the training photos, as train-perceiver --extra-photos")
    ap.add_argument("--independent", action="store_true",
                    help="also perceive the split's photos degraded by the benchmark's independent implementation")
    ap.add_argument("--split", choices=sorted(DEV_SPLITS), default="photos",
                    help="which training photos are held back and perceived (see DEV_SPLITS)")
    ap.add_argument("--tiny", action="store_true", help="2000 training crops, 6 dev images per family (a quick check "
                    "that the script runs; its numbers mean nothing)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.samples, a.per_family, a.probe_epochs = 2000, 6, 1
    if a.score:
        score(a.score, tuple(AGGREGATIONS))
        return 0
    torch.set_num_threads(1)
    sets = [("", dev_set(a.per_family, split=a.split))]  # drawn first: a split that cannot be cut fails at once
    if a.independent:
        sets.append(("ind_", dev_independent_set(a.per_family, split=a.split)))
    t0 = time.perf_counter()
    photos = [(n, p) for n, p in _training_photos() if n not in DEV_SPLITS[a.split]]
    photos += extra_photos(a.extra_photos or [])
    crops: list | None = [] if a.probe_epochs else None
    feats, targets = build_training_set(a.samples, a.seed, photos=photos, crops=crops)
    t1 = time.perf_counter()
    net = shift_label_logit(fit_ensemble(feats, targets, seed=a.seed), "haze", a.haze_offset)
    probe = (fit_snow_probe(crops, targets, seed=a.seed, epochs=a.probe_epochs, hard_share=a.hard_snow_share,
                            pair_share=a.snow_pair_share, decision=a.probe_decision,
                            backgrounds=sky_crops(a.sky_share, a.samples, a.seed))
             if crops is not None else None)
    t2 = time.perf_counter()
    out = {"state": net.state_dict()}
    for prefix, items in sets:
        logits, probes = [], []
        with torch.no_grad():
            for x, _ in items:
                c = grid_crops(prepare_image(x))
                logits.append(net(crop_features(c))[0])
                probes.append(float(torch.sigmoid(probe(c)).mean()) if probe is not None else None)
        out.update({prefix + "logits": logits, prefix + "labels": [lab for _, lab in items],
                    **({prefix + "probe": probes} if probe is not None else {})})
    torch.save(out, a.out)
    print(f"data {t1 - t0:.0f}s fit {t2 - t1:.0f}s eval {time.perf_counter() - t2:.0f}s")
    score(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
