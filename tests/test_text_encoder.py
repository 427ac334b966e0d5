"""Prompt embeddings: diffusers-identical computation, disk cache, ComfyUI single files (fp16 / scaled fp8).

A tiny random umt5 (transformers ``UMT5EncoderModel``, d_model 64) and a tiny T5 tokenizer (unigram
vocabulary built offline) are saved as a diffusers model root and as ComfyUI-style single files.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vbridge_core.text_encoder as te
from vbridge_core.errors import ModelFileError, WrongModelError

MAX_LEN = 24
WORDS = ("a photo of the cat dog sitting on mat restore image with sharp details high quality clean "
         "photograph blurry noisy low resolution picture quick brown fox jumps over lazy").split()


def _make_tokenizer(folder: Path) -> Path:
    """A T5 tokenizer with a small unigram vocabulary (whole words + single letters), fully offline."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.!"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(str(folder))
    return folder


def _make_encoder(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=80, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False,
                     dropout_rate=0.0)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():  # transformers' init is tiny for the embeddings: spread them so layers matter
        model.shared.weight.normal_(0, 1.0)
    return model


def _direct(model, tok_dir: Path, prompt: str, dtype=torch.float32) -> torch.Tensor:
    """The reference: diffusers' _get_t5_prompt_embeds steps with transformers objects."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    inp = tok([te.clean_prompt(prompt)], padding="max_length", max_length=MAX_LEN, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    n = int(inp.attention_mask.gt(0).sum())
    with torch.no_grad():
        h = model.to(dtype)(inp.input_ids, inp.attention_mask).last_hidden_state.to(dtype)
    out = torch.zeros_like(h)
    out[:, :n] = h[:, :n]
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    model = _make_encoder()
    diff_root = root / "Wan-tiny-Diffusers"
    model.save_pretrained(str(diff_root / "text_encoder"), safe_serialization=True)
    tok_dir = _make_tokenizer(diff_root / "tokenizer")
    # ComfyUI single file: same module names, no tied copy, fp16
    comfy_dir = root / "text_encoders"
    comfy_dir.mkdir()
    sd = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, str(comfy_dir / "umt5_xxl_fp16.safetensors"))
    return dict(model=model, root=diff_root, tok=tok_dir, comfy=comfy_dir / "umt5_xxl_fp16.safetensors", dir=root)


@pytest.fixture(autouse=True)
def _fresh_memo():
    te.clear_memo()
    yield
    te.clear_memo()


@pytest.fixture
def count_loads(monkeypatch):
    calls = []
    real = te.load_text_encoder

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(te, "load_text_encoder", counting)
    return calls


PROMPT = "A  photo of a cat sitting on a mat, high quality &amp; sharp details"


def test_matches_direct_transformers(assets, tmp_path, count_loads):
    ref = _direct(assets["model"], assets["tok"], PROMPT)
    for enc in (assets["root"], assets["root"] / "text_encoder"):  # model root and text_encoder/ folder
        te.clear_memo()
        emb = te.encode_prompt(PROMPT, enc, cache_dir=tmp_path / str(len(count_loads)), dtype=torch.float32,
                               max_length=MAX_LEN)
        assert emb.shape == (1, MAX_LEN, 64) and emb.dtype == torch.float32
        torch.testing.assert_close(emb, ref, atol=0, rtol=0)
    n = int((ref.abs().sum(-1) > 0).sum())
    assert 3 < n < MAX_LEN and emb[0, n:].abs().sum() == 0  # zeros past the real tokens


def test_matches_diffusers_get_t5_prompt_embeds(assets, tmp_path, monkeypatch):
    """Run diffusers' own WanPipeline._get_t5_prompt_embeds on the same tokenizer and encoder."""
    import types

    from diffusers.pipelines.wan import pipeline_wan
    from transformers import AutoTokenizer

    if not hasattr(pipeline_wan, "ftfy"):  # diffusers calls ftfy unconditionally; ours skips it when absent
        monkeypatch.setattr(pipeline_wan, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)
    pipe_like = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(assets["tok"])),
                                 text_encoder=assets["model"].float(), _execution_device=torch.device("cpu"))
    with torch.no_grad():  # as inside WanPipeline.__call__ (autograd on picks another CPU attention kernel)
        ref = pipeline_wan.WanPipeline._get_t5_prompt_embeds(pipe_like, PROMPT, max_sequence_length=MAX_LEN,
                                                             device=torch.device("cpu"), dtype=torch.float32)
    emb = te.encode_prompt(PROMPT, assets["root"], cache_dir=tmp_path, dtype=torch.float32, max_length=MAX_LEN)
    torch.testing.assert_close(emb, ref, atol=0, rtol=0)


def test_bf16_default_matches(assets, tmp_path):
    emb = te.encode_prompt(PROMPT, assets["root"], cache_dir=tmp_path, max_length=MAX_LEN)
    assert emb.dtype == torch.bfloat16
    ref = _direct(_make_encoder(), assets["tok"], PROMPT, dtype=torch.bfloat16)
    torch.testing.assert_close(emb, ref, atol=0, rtol=0)


def test_second_call_hits_cache_without_loading(assets, tmp_path, count_loads):
    first = te.encode_prompt(PROMPT, assets["root"], cache_dir=tmp_path, dtype=torch.float32, max_length=MAX_LEN)
    assert len(count_loads) == 1
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file
    again = te.encode_prompt(PROMPT, assets["root"], cache_dir=tmp_path, dtype=torch.float32, max_length=MAX_LEN)
    assert len(count_loads) == 1  # in-process memo
    te.clear_memo()
    # disk cache: neither the tokenizer nor the encoder may be touched now
    def refuse(*a, **k):
        raise AssertionError("loaded on a cache hit")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(te, "_load_tokenizer", refuse)
        mp.setattr(te, "load_text_encoder", refuse)
        disk = te.encode_prompt(PROMPT, assets["root"], cache_dir=tmp_path, dtype=torch.float32, max_length=MAX_LEN)
    assert len(count_loads) == 1
    torch.testing.assert_close(disk, first, atol=0, rtol=0)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    # another prompt, another dtype or changed weights miss the cache
    te.encode_prompt("a dog", assets["root"], cache_dir=tmp_path, dtype=torch.float32, max_length=MAX_LEN)
    te.encode_prompt(PROMPT, assets["root"], cache_dir=tmp_path, dtype=torch.bfloat16, max_length=MAX_LEN)
    assert len(count_loads) == 3


def test_cache_dir_from_env_and_key_tracks_weights(assets, tmp_path, monkeypatch, count_loads):
    monkeypatch.setenv("VBRIDGE_CACHE_DIR", str(tmp_path / "vb"))
    assert te.default_cache_dir() == tmp_path / "vb" / "prompt_embeds"
    enc = tmp_path / "enc.safetensors"
    shutil.copy(assets["comfy"], enc)
    te.encode_prompt(PROMPT, enc, tokenizer=assets["tok"], dtype=torch.float32, max_length=MAX_LEN)
    assert len(list((tmp_path / "vb" / "prompt_embeds").glob("*.safetensors"))) == 1
    te.clear_memo()
    te.encode_prompt(PROMPT, enc, tokenizer=assets["tok"], dtype=torch.float32, max_length=MAX_LEN)
    assert len(count_loads) == 1
    import os
    st = enc.stat()
    os.utime(enc, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "replaced" weights
    te.clear_memo()
    te.encode_prompt(PROMPT, enc, tokenizer=assets["tok"], dtype=torch.float32, max_length=MAX_LEN)
    assert len(count_loads) == 2


def test_batch_loads_encoder_once(assets, tmp_path, count_loads):
    a, b, a2 = te.encode_prompts([PROMPT, "blurry noisy picture", PROMPT], assets["root"], cache_dir=tmp_path,
                                 dtype=torch.float32, max_length=MAX_LEN)
    assert len(count_loads) == 1
    torch.testing.assert_close(a, a2, atol=0, rtol=0)
    torch.testing.assert_close(b, _direct(assets["model"], assets["tok"], "blurry noisy picture"), atol=1e-6, rtol=1e-5)


def test_comfy_single_file_fp16(assets, tmp_path):
    # the tokenizer/ folder beside the file is found automatically
    single = tmp_path / "text_encoders"
    single.mkdir()
    shutil.copy(assets["comfy"], single / "umt5_xxl_fp16.safetensors")
    shutil.copytree(assets["tok"], single / "tokenizer")
    emb = te.encode_prompt(PROMPT, single / "umt5_xxl_fp16.safetensors", cache_dir=tmp_path / "c",
                           dtype=torch.float32, max_length=MAX_LEN)
    ref_model = _make_encoder()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(p.half().float())
    torch.testing.assert_close(emb, _direct(ref_model, assets["tok"], PROMPT), atol=1e-5, rtol=1e-5)


def _scaled_fp8_file(model, path: Path, prefix: str = "") -> None:
    """ComfyUI's scaled-fp8 convention: fp8 linear weights, a per-layer ``scale_weight``, a
    ``scaled_fp8`` marker; embeddings and norms stay in 16-bit."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue
        if re.search(r"\.(DenseReluDense\.(wi_0|wi_1|wo)|SelfAttention\.[qkvo])\.weight$", k):
            scale = v.abs().max().float() / 448.0
            sd[prefix + k] = (v.float() / scale).to(torch.float8_e4m3fn)
            sd[prefix + k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
            sd[prefix + k[: -len(".weight")] + ".scale_input"] = torch.ones(1)
        else:
            sd[prefix + k] = v.to(torch.float16).contiguous()
    sd[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(path))


def test_comfy_scaled_fp8_single_file(assets, tmp_path):
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    _scaled_fp8_file(assets["model"], path, prefix="umt5xxl.transformer.")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert sum(f.get_slice(k).get_dtype() == "F8_E4M3" for k in f.keys()) == 2 * 7 + 1  # 7 linears/block + marker
    sd, cfg = te.read_umt5_single_file(path, torch.float32)
    assert cfg["d_model"] == 64 and cfg["num_layers"] == 2 and cfg["num_heads"] == 4 and cfg["d_kv"] == 16
    w = assets["model"].state_dict()["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"]
    torch.testing.assert_close(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"], w, atol=0.07 * w.abs().max().item(), rtol=0.07)
    emb = te.encode_prompt(PROMPT, path, tokenizer=assets["tok"], cache_dir=tmp_path / "c", dtype=torch.float32,
                           max_length=MAX_LEN)
    ref = _direct(assets["model"], assets["tok"], PROMPT)
    n = int((ref.abs().sum(-1) > 0).sum())
    cos = torch.nn.functional.cosine_similarity(emb[0, :n], ref[0, :n], dim=-1)
    assert cos.min() > 0.97, cos  # fp8 weights: close, not equal
    assert emb[0, n:].abs().sum() == 0


def test_missing_tokenizer_is_a_clear_error(assets, tmp_path):
    lone = tmp_path / "text_encoders" / "umt5_xxl_fp16.safetensors"
    lone.parent.mkdir()
    shutil.copy(assets["comfy"], lone)
    with pytest.raises(ModelFileError) as e:
        te.encode_prompt(PROMPT, lone, cache_dir=tmp_path / "c", max_length=MAX_LEN)
    msg = str(e.value)
    assert str(lone.parent / "tokenizer") in msg and "Wan-AI/Wan2.2-TI2V-5B-Diffusers" in msg and "tokenizer/" in msg
    with pytest.raises(ModelFileError, match="does not exist"):
        te.encode_prompt(PROMPT, tmp_path / "nope.safetensors", cache_dir=tmp_path / "c")


def test_embedded_sentencepiece_tokenizer(assets, tmp_path):
    """ComfyUI may ship the sentencepiece model inside the encoder file (``spiece_model``)."""
    spm = pytest.importorskip("sentencepiece")
    import io

    sents = [" ".join(WORDS[i:i + 6]) for i in range(0, len(WORDS), 3)] * 3
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    model = _make_encoder(3)
    path = tmp_path / "umt5_with_spiece.safetensors"
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["spiece_model"] = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    save_file(sd, str(path))
    emb = te.encode_prompt("a photo of a dog", path, cache_dir=tmp_path / "c", dtype=torch.float32, max_length=MAX_LEN)
    proc = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    ids = proc.encode("a photo of a dog") + [1]
    with torch.no_grad():
        ref = model(torch.tensor([ids + [0] * (MAX_LEN - len(ids))]),
                    torch.tensor([[1] * len(ids) + [0] * (MAX_LEN - len(ids))])).last_hidden_state
    torch.testing.assert_close(emb[0, : len(ids)], ref[0, : len(ids)], atol=1e-6, rtol=1e-5)
    assert emb[0, len(ids):].abs().sum() == 0


def test_wrong_files_are_refused(assets, tmp_path):
    t5 = tmp_path / "t5xxl.safetensors"  # plain T5: relative bias only in block 0
    sd = {k: v for k, v in assets["model"].state_dict().items()
          if k != "encoder.embed_tokens.weight" and not k.startswith("encoder.block.1.layer.0.SelfAttention.relative")}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(t5))
    with pytest.raises(WrongModelError, match="umt5"):
        te.read_umt5_single_file(t5)
    other = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(WrongModelError):
        te.read_umt5_single_file(other)


def test_clean_prompt_matches_diffusers_rules():
    assert te.clean_prompt("  a&amp;amp;b \n\t c  ") == "a&b c"


def test_release_prompt_pair_encodes_once_and_caches(assets, tmp_path, count_loads):
    from vbridge_core.presets import PAPER_NEGATIVE_PROMPT, PAPER_PROMPT, release_prompt_embeds

    pos, neg = release_prompt_embeds(assets["root"], cache_dir=tmp_path, dtype=torch.float32)
    assert len(count_loads) == 1 and pos.shape[1] == neg.shape[1] == 512
    assert torch.equal(pos, te.encode_prompt(PAPER_PROMPT, assets["root"], cache_dir=tmp_path, dtype=torch.float32))
    assert torch.equal(neg, te.encode_prompt(PAPER_NEGATIVE_PROMPT, assets["root"], cache_dir=tmp_path,
                                             dtype=torch.float32))
    te.clear_memo()  # from the disk cache now
    release_prompt_embeds(assets["root"], cache_dir=tmp_path, dtype=torch.float32)
    assert len(count_loads) == 1  # the second call is served from the cache
