"""Reports and previews for the video nodes: stability before/after, held-out evaluation, comparison strips."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .metrics import sequence_metrics, temporal_stability
from .streaming import stabilize_sequence
from .training import StabilizerClip
from .video import VideoResult

#: Frames listed one by one in a video report (longer videos are summarised after these).
REPORT_FRAMES = 24


def _pct(before: float, after: float) -> str:
    """Relative change ``after`` vs ``before`` as a signed percentage."""
    if before <= 0:
        return "n/a"
    return f"{100.0 * (after - before) / before:+.0f}%"


def video_report(result: VideoResult, inputs: torch.Tensor, stabilizer_name: str = "") -> str:
    """Text summary of :func:`restore_video`: settings, per-frame time and the stability of raw vs stabilized.

    The stability score is :func:`temporal_stability` (mean absolute change between consecutive frames,
    0..1 image units; lower = steadier). The input clip's own score is shown for scale: it includes
    real motion and the degradation's own flicker.
    """
    info = result.info
    n, _, h, w = result.frames.shape
    raw_s = temporal_stability(result.raw)
    stab_s = temporal_stability(result.frames)
    in_s = temporal_stability(inputs)
    change = float((result.frames - result.raw).abs().mean())
    kind = info.get("stabilizer") or "none"
    desc = {"ema": f"EMA, b = {info.get('ema_strength')}", "none": "none"}.get(kind, f"learned ({kind})")
    if stabilizer_name:
        desc += f" [{stabilizer_name}]"
    per_frame_restore = info["restore_seconds"] / n
    per_frame_stab = info["stabilizer_seconds"] / n
    lines = [
        f"frames: {n} ({w}x{h}), seed {info['seed']} for every frame, up to {info['batch_frames']} frames per DiT call "
        f"({info.get('restore_calls', '?')} restore calls)",
        f"stabilizer: {desc}",
        f"time: {info['seconds']:.2f} s total; per frame {per_frame_restore:.3f} s restoring + "
        f"{1000 * per_frame_stab:.1f} ms stabilizing",
        f"stability score (mean |frame t - frame t-1|, lower = steadier): raw {raw_s:.5f} -> stabilized "
        f"{stab_s:.5f} ({_pct(raw_s, stab_s)}); input clip {in_s:.5f}",
        f"mean change made by the stabilizer: {change:.5f} (what stability costs in faithfulness to each raw frame)",
        "per frame: time s | raw change | stabilized change",
    ]
    secs = info.get("frame_seconds") or [per_frame_restore] * n
    for t in range(min(n, REPORT_FRAMES)):
        if t == 0:
            lines.append(f"  {t:4d}: {secs[t]:.3f} |      -  |      -   (first frame passed through)")
        else:
            r = float((result.raw[t] - result.raw[t - 1]).abs().mean())
            s = float((result.frames[t] - result.frames[t - 1]).abs().mean())
            lines.append(f"  {t:4d}: {secs[t]:.3f} | {r:.5f} | {s:.5f}")
    if n > REPORT_FRAMES:
        lines.append(f"  ... {n - REPORT_FRAMES} more frames")
    return "\n".join(lines)


def evaluate_stabilizer(stabilizer: Any, clips: Sequence[StabilizerClip]) -> dict[str, Any]:
    """PSNR (vs the clean targets) and stability of the restorer's frames before and after ``stabilizer``.

    Means over ``clips``; also the clean clips' own stability (real motion) and the stabilized clips.
    """
    use_inputs = bool(getattr(stabilizer, "use_inputs", False))
    before: dict[str, list[float]] = {"psnr": [], "stability": []}
    after: dict[str, list[float]] = {"psnr": [], "stability": []}
    motion: list[float] = []
    stabilized = []
    for c in clips:
        with torch.no_grad():
            out = stabilize_sequence(c.restored, stabilizer, inputs=c.inputs if use_inputs else None).clamp(0, 1)
        stabilized.append(out)
        mb, ma = sequence_metrics(c.restored.clamp(0, 1), c.target), sequence_metrics(out, c.target)
        for d, m in ((before, mb), (after, ma)):
            d["psnr"].append(m["psnr"])
            d["stability"].append(m["stability"])
        motion.append(mb["reference_stability"])
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return dict(psnr_before=mean(before["psnr"]), psnr_after=mean(after["psnr"]),
                stability_before=mean(before["stability"]), stability_after=mean(after["stability"]),
                clean_stability=mean(motion), clips=len(clips), stabilized=stabilized)


def comparison_frames(clip: StabilizerClip, stabilized: torch.Tensor, n: int = 4, min_height: int = 192,
                      gap: int = 4) -> torch.Tensor:
    """``[n, 3, H, 3W + 2 gap]`` rows of raw | stabilized | clean for ``n`` frames spread over the clip."""
    t_len = clip.restored.shape[0]
    idx = sorted({round(i * (t_len - 1) / max(1, n - 1)) for i in range(min(n, t_len))})
    h = clip.restored.shape[-2]
    scale = max(1, -(-min_height // h))
    rows = []
    for t in idx:
        tiles = [clip.restored[t].clamp(0, 1), stabilized[t].clamp(0, 1), clip.target[t].clamp(0, 1)]
        tiles = [F.interpolate(x.unsqueeze(0).float(), scale_factor=scale, mode="nearest")[0] for x in tiles]
        sep = torch.ones(3, tiles[0].shape[1], gap)
        rows.append(torch.cat([tiles[0], sep, tiles[1], sep, tiles[2]], dim=2))
    return torch.stack(rows)


def training_report(result: Any, evaluation: dict[str, Any], source: str, held_out: Optional[str] = None) -> str:
    """Text summary of a TrainStabilizer run: file, settings, loss and the held-out before/after metrics."""
    st = result.stabilizer
    meta = getattr(st, "metadata", {}) or {}
    tr = meta.get("training", {})
    e = evaluation
    lines = [
        f"stabilizer: {result.path}",
        f"kind {st.kind}, {result.info.get('parameters')} parameters, uses LQ inputs: {st.use_inputs}",
        f"trained on {source}: {tr.get('clips', '?')} clips, {result.info.get('steps')} steps, "
        f"{tr.get('clip_frames', '?')}-frame windows, stability weight {meta.get('stability_weight')} "
        f"(oracle bound {meta.get('oracle_bound')}, collapse bound {meta.get('collapse_bound')}), "
        f"{result.info.get('seconds')} s",
        f"loss: {result.losses[0]:.5f} -> {result.losses[-1]:.5f}" if result.losses else "loss: (no steps)",
        f"evaluation on {held_out or 'the training clips'} ({e['clips']} clips):",
        f"  PSNR vs clean: {e['psnr_before']:.2f} dB -> {e['psnr_after']:.2f} dB",
        f"  stability score (lower = steadier): {e['stability_before']:.5f} -> {e['stability_after']:.5f} "
        f"({_pct(e['stability_before'], e['stability_after'])}); clean clip (real motion) {e['clean_stability']:.5f}",
    ]
    return "\n".join(lines)
