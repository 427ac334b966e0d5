"""``python -m vbridge_core train``: the training subcommand (parser and handler)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from ..cli_common import HelpFormatter, collect_inputs, parse_dtype
from ..errors import InputError

logger = logging.getLogger("vbridge_core")


def add_train_parser(sub, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``train`` on the CLI's subparsers."""
    fmt = HelpFormatter
    t = sub.add_parser("train", help="train a restoration LoRA from LQ/HQ pairs", formatter_class=fmt)
    t.add_argument("--pairs", required=True, metavar="DIR", help="folder with lq/ and hq/ (matching file names)")
    t.add_argument("--out", required=True, metavar="FILE", help="LoRA file to write (.safetensors)")
    t.add_argument("--steps", type=int, default=400, help="training steps")
    t.add_argument("--rank", type=int, default=32, help="LoRA rank")
    t.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    t.add_argument("--frames", type=int, default=5, help="pseudo-video length F = 4k+1")
    t.add_argument("--shift", type=float, default=5.0, help="flow shift of the noise-level sampling")
    t.add_argument("--resolution", type=int, default=None, help="square crop side, multiple of 32 (default: "
                   "largest multiple of 32 that fits, at most 512)")
    t.add_argument("--seed", type=int, default=0, help="seed")
    t.add_argument("--prompt", default=None, help="training prompt (default: the V-Bridge release prompt)")
    add_model_args(t)



def cmd_train(a: argparse.Namespace) -> int:
    from ..images import load_image
    from ..pipeline import VBridgePipeline
    from .trainer import TrainConfig, train_lora

    root = Path(a.pairs)
    lq_dir, hq_dir = root / "lq", root / "hq"
    if not lq_dir.is_dir() or not hq_dir.is_dir():
        raise InputError(f"{root} must contain lq/ and hq/ folders with matching file names")
    lqs = {p.stem: p for p in collect_inputs([str(lq_dir)])}
    hqs = {p.stem: p for p in collect_inputs([str(hq_dir)])}
    if set(lqs) != set(hqs):
        raise InputError(f"unmatched pairs: only in lq/: {sorted(set(lqs) - set(hqs))[:10]}, "
                         f"only in hq/: {sorted(set(hqs) - set(lqs))[:10]}")
    pairs = [(load_image(lqs[s]), load_image(hqs[s])) for s in sorted(lqs)]
    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, device=a.device, dtype=parse_dtype(a.dtype),
                                      text_encoder=a.text_encoder, tokenizer=a.tokenizer)
    from ..presets import PAPER_NEGATIVE_PROMPT, PAPER_PROMPT

    prompt = a.prompt or PAPER_PROMPT
    pos = pipe._encode(prompt)
    neg = pipe._encode(PAPER_NEGATIVE_PROMPT)
    cfg = TrainConfig(steps=a.steps, rank=a.rank, alpha=a.alpha or float(a.rank), learning_rate=a.lr,
                      frames=a.frames, shift=a.shift, resolution=a.resolution, seed=a.seed)
    res = train_lora(pipe, pairs, cfg, a.out, prompt_embeds=pos, negative_prompt_embeds=neg,
                     metadata={"prompt": prompt, "negative_prompt": PAPER_NEGATIVE_PROMPT},
                     callback=lambda s, l: s % max(1, cfg.steps // 20) == 0 and logger.info("step %d loss %.4f", s, l))
    logger.info("wrote %s (%d steps, final loss %.4f)", res.path, len(res.losses), res.losses[-1])
    return 0


