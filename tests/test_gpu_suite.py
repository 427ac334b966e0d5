"""bench/gpu_suite.py, bench/memory_plan.py and bench/real_arch_cpu.py on the CPU: the plan prints
without a GPU, tiny cases run through the suite's own code, a failing case becomes a row, the
memory plan's arithmetic, and the real-arch script's streamed original-layout files load back exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_plan_lists_every_case_without_a_gpu():
    import gpu_suite

    proc = _run(str(BENCH / "gpu_suite.py"), "--plan")
    assert proc.returncode == 0, proc.stderr
    for case in gpu_suite.cases():
        assert f"| {case.name} |" in proc.stdout
    assert "3840x2176" in proc.stdout and "<= 0.6 s" in proc.stdout and "anchor 3.75 s" in proc.stdout


def test_tiny_cases_run_through_the_suite(tmp_path):
    out = tmp_path / "suite.json"
    cases = "diffusers_default,fast,turbo,fast_cached,fast_compiled,full_ft_512_bf16"
    proc = _run(str(BENCH / "gpu_suite.py"), "--tiny", "-q", "--only", cases, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    rows = {r["case"]: r for r in report["rows"]}
    assert list(rows) == cases.split(",")
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["status"] for k, r in rows.items()}
    steps = report["config"]["steps"]
    # the hook counts one noise prediction per step and image at guidance 1, for diffusers and for ours
    assert rows["diffusers_default"]["dit_calls_per_image"] == steps
    assert rows["fast"]["dit_calls_per_image"] == steps
    # same noise, same DiT and VAE: ours equals the diffusers reference; compiling changes nothing
    assert rows["fast"]["diff_to"] == "diffusers_default" and rows["fast"]["max_diff"] <= 1e-4
    assert rows["fast_compiled"]["max_diff"] <= 1e-5
    # turbo: at most 4 calls, and the pipeline's own count agrees with the hook's
    turbo = rows["turbo"]
    assert 1 <= turbo["dit_calls_per_image"] <= 4
    assert turbo["extra"]["info_dit_calls_per_image"] == turbo["dit_calls_per_image"]
    cached = rows["fast_cached"]
    assert cached["diff_to"] == "fast" and cached["max_diff"] is not None and "cache" in cached["extra"]
    assert all(r["seconds"] > 0 for r in rows.values())
    ft = rows["full_ft_512_bf16"]
    assert ft["extra"]["plan_one_gpu_gb"] > 0 and ft["extra"]["tokens"] == 2 * 2 * 2
    assert "| fast |" in proc.stdout and "memory_plan predicts" in proc.stdout


def test_a_failing_case_is_a_row_and_the_suite_goes_on():
    import gpu_suite

    suite = gpu_suite.Suite(gpu_suite.parse_args(["--tiny"]))
    suite.build()

    def boom(s, c):
        raise ZeroDivisionError("division by zero")

    def missing(s, c):
        raise gpu_suite.NotAvailable("no such preset")

    row = gpu_suite.run_case(suite, gpu_suite.Case("boom", "raises", boom))
    assert row.status == "failed: ZeroDivisionError: division by zero" and row.seconds is None
    row = gpu_suite.run_case(suite, gpu_suite.Case("missing", "not there", missing))
    assert row.status == "not available: no such preset"
    suite.release()  # as the full fine-tuning cases do: later inference cases must fail cleanly
    row = gpu_suite.run_case(suite, next(c for c in gpu_suite.cases() if c.name == "fast"))
    assert row.status.startswith("failed: RuntimeError") and "released" in row.status
    table = gpu_suite.table([row], "GB")
    assert "| fast |" in table and "failed" in table
    with pytest.raises(SystemExit, match="unknown case"):
        gpu_suite.select(gpu_suite.cases(), "fast,nonsense", None)


def test_memory_plan_arithmetic_from_real_counts():
    import memory_plan as mp

    counts = mp.count_params()  # the shipped 5B config on the meta device
    assert counts.layers == 30 and counts.dim == 3072 and abs(counts.total - 4_999_787_712) < 1e6
    assert counts.total == counts.root + 30 * counts.per_block
    assert mp.tokens_for(512, 512, 5) == 512 and mp.tokens_for(960, 960, 5) == 1800
    act = mp.ActivationModel(block_const=1e6, block_per_token=300e3, root_const=0.0, root_per_token=1e3,
                             measured_at_tokens=(32, 128), width=3072)
    one = mp.estimate(counts, act, 512, 5, 1)
    eight = mp.estimate(counts, act, 512, 5, 8)
    gib = 2**30
    assert one.adamw == pytest.approx(8 * counts.total / gib) and eight.adamw == pytest.approx(one.adamw / 8)
    assert one.adamw8bit < one.adamw / 3.9
    assert one.act_full == pytest.approx((30 * (1e6 + 300e3 * 512) + 1e3 * 512) / gib)
    assert one.act_ckpt == pytest.approx((30 * 512 * 3072 * 2 + 1e6 + 300e3 * 512 + 1e3 * 512) / gib)
    assert eight.act_full == one.act_full  # activations do not shard
    assert one.total("adamw", True) > one.total("adamw8bit", True) > one.total("adamw", True, offload_optimizer=True)
    text = mp.markdown(mp.plan(counts, act), counts, act)
    assert text.count("\n| 512 |") == 4 and text.count("\n| 960 |") == 4 and "4.9998 B" in text


def test_activation_calibration_counts_saved_tensors_once():
    import memory_plan as mp
    from vbridge_core.tiny import TINY_TRANSFORMER_CONFIG

    act = mp.calibrate_activations(dict(TINY_TRANSFORMER_CONFIG), latent_sides=(4, 8), text_len=16)
    # per token and block at least the block input, the FFN hidden state and the attention output (bf16)
    dim, ffn = 256, TINY_TRANSFORMER_CONFIG["ffn_dim"]
    assert act.block_per_token >= 2 * (2 * dim + ffn)
    assert act.block_per_token < 2 * 100 * (dim + ffn)
    assert act.block_const >= 0


@pytest.mark.parametrize("storage,prefix", [("fp16", ""), ("fp8_scaled", "model.diffusion_model.")])
def test_real_arch_streamed_original_file_loads_back_exactly(tmp_path, storage, prefix):
    import real_arch_cpu as ra
    from safetensors import safe_open

    from vbridge_core.models import load_transformer
    from vbridge_core.tiny import TINY_TRANSFORMER_CONFIG

    shapes = ra.dit_original_shapes(dict(TINY_TRANSFORMER_CONFIG))
    assert "head.modulation" in shapes and "blocks.1.norm3.weight" in shapes and "blocks.0.ffn.0.weight" in shapes
    path = ra.write_model_file(tmp_path / "dit.safetensors", shapes, storage, seed=3, prefix=prefix)
    assert not list(tmp_path.glob("*.partial"))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        w = f.get_tensor(prefix + "blocks.0.self_attn.q.weight")
    assert (prefix + "blocks.0.self_attn.q.weight") in keys
    assert ((prefix + "scaled_fp8") in keys) == (storage == "fp8_scaled")
    assert w.dtype == (torch.float8_e4m3fn if storage == "fp8_scaled" else torch.float16)
    model = load_transformer(path, dtype=torch.bfloat16)
    checked, worst = ra.check_loaded(model, shapes, storage, seed=3)
    assert checked == len([k for k in shapes if not k.startswith("blocks.") or k.startswith("blocks.0.")])
    assert worst == 0.0


def test_real_arch_key_mapping_at_the_real_size():
    import real_arch_cpu as ra
    from vbridge_core.checkpoints import KIND_WAN22_TI2V_DIT, identify

    shapes = ra.dit_original_shapes(ra.dit_config(None))  # meta device: no memory
    info = identify({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert info.kind == KIND_WAN22_TI2V_DIT and info.is_ti2v_5b_size and info.layout == "original"
    vae_shapes, _ = ra.vae_original_shapes(tiny=False)
    assert vae_shapes["conv2.weight"][0] == 48 and "decoder.middle.0.residual.0.gamma" in vae_shapes
