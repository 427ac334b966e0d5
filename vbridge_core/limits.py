"""The largest inputs the Wan2.2-TI2V-5B DiT can take, checked before anything is allocated.

The DiT's rotary position table covers ``rope_max_seq_len`` = 1024 positions per axis
(``WanRotaryPosEmbed``). One position is one latent frame in time (4 video frames, the VAE's temporal
stride) and one 2x2 patch of the 16x-compressed latent in space (32 pixels). Larger inputs would fail
deep inside the model after allocating tens of GB, so they are refused up front with the limit.
"""
from __future__ import annotations

from .errors import InputError

#: Positions per axis in the DiT's rotary table (``rope_max_seq_len`` of the released config).
ROPE_POSITIONS = 1024
#: Pixels per position along a side: 16x VAE compression times the 2-pixel patch.
PIXELS_PER_POSITION = 32
#: Largest image side in pixels (after padding to a multiple of 32).
MAX_SIDE = ROPE_POSITIONS * PIXELS_PER_POSITION
#: Largest pseudo-video length: 1024 latent frames of 4 frames, plus the first frame.
MAX_FRAMES = 4 * (ROPE_POSITIONS - 1) + 1


def check_side(side: int, what: str, hint: str = "Downscale it or restore it in tiles") -> int:
    """Refuse a side (pixels, padded to a multiple of 32) above :data:`MAX_SIDE`."""
    padded = -(-int(side) // PIXELS_PER_POSITION) * PIXELS_PER_POSITION
    if padded > MAX_SIDE:
        raise InputError(f"{what} is {side} px; the Wan2.2 DiT takes at most {MAX_SIDE} px per side (its position "
                         f"table covers {ROPE_POSITIONS} patches of {PIXELS_PER_POSITION} px). {hint}")
    return int(side)


def check_image_size(height: int, width: int, what: str = "the image") -> None:
    """Refuse an image whose padded height or width exceeds :data:`MAX_SIDE`."""
    check_side(height, f"{what}'s height")
    check_side(width, f"{what}'s width")


def check_frame_limit(frames: int) -> int:
    """Refuse a pseudo-video longer than :data:`MAX_FRAMES`."""
    if frames > MAX_FRAMES:
        raise InputError(f"frames = {frames} is more than the Wan2.2 DiT can take: at most {MAX_FRAMES} "
                         f"({ROPE_POSITIONS} latent frames of 4); V-Bridge uses 5 to 21")
    return frames
