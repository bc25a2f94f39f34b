"""`ppcr convert-glamm` on tiny fakes written in GLaMM's exact layout.

GLaMM's real tokenizer is a slow SentencePiece model; training one here is impractical (and
SentencePiece is not installed), so both fakes carry a fast WordLevel tokenizer with Vicuna's layout:
32000 base ids (<unk> 0, <s> 1, </s> 2), then GLaMM's 7 added tokens at 32000-32006 (with an
added_tokens.json, as GLaMM's slow tokenizer writes it), and llava-hf's <image> 32000, <pad> 32001.
Weights use GLaMM's real key names and `.bin` shards + index, at the tiny preset's sizes.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from ppcr.checkpoint import load_checkpoint, load_init_weights
from ppcr.config import ConfigError, load_config
from ppcr.glamm import (
    EMBED,
    GLAMM_ADDED_TOKENS,
    LLM,
    LM_HEAD,
    convert_glamm,
    glamm_key,
    lora_factors,
    map_key,
)
from ppcr.mllm import build_llava
from ppcr.model import PPCRModel
from ppcr.segmentation_stage import build_sam
from ppcr.weights import WeightsError

VOCAB = 32000
RANK = 4  # true rank of each fake GLaMM delta (GranD and RefSeg): A's total is 8 = lora.r
MODEL = {
    "box_head": "mlp",
    "image_position": "before",
    "semantic_grounding": False,
    "train_base": False,
    "language": {"vocab_size": 32064},  # llava-hf pads its embeddings to 32064 rows
}


def _word_tokenizer(added: list[str], pad: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(added, special_tokens=True)
    tok.pad_token = pad
    return tok


def _write_shards(folder, state: dict[str, torch.Tensor], shards: int = 3) -> None:
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k].contiguous() for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def _low_rank(out: int, inp: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    return 0.05 * torch.randn(out, rank, generator=gen) @ torch.randn(rank, inp, generator=gen)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """(root, model config path, llava state, GLaMM RefSeg state, GranD state)."""
    root = tmp_path_factory.mktemp("glamm")
    cfg_path = root / "tiny_glammable.yaml"
    cfg_path.write_text(yaml.safe_dump({"base": "tiny", "model": MODEL}))
    cfg = load_config(cfg_path).model
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # llava-hf: config.json, safetensors, tokenizer with <image> 32000, <pad> 32001.
    llava_tok = _word_tokenizer(["<image>", "<pad>"], "<pad>")
    llava = build_llava(cfg, llava_tok)
    (root / "llava").mkdir()
    llava.save_pretrained(root / "llava")
    llava_tok.save_pretrained(root / "llava")
    base = {k: v.clone() for k, v in llava.state_dict().items()}
    lm = "model.language_model."
    h = cfg.language.hidden_size
    # GLaMM: Llama names, merged q/v, 32007 vocabulary rows, text_hidden_fcs, grounding_encoder, region_encoder.
    glamm, grand = {}, {}
    for k, v in base.items():
        if k.startswith(lm):
            name = "model." + k[len(lm) :]
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                grand[name] = v + _low_rank(*v.shape, RANK, gen)
                glamm[name] = grand[name] + _low_rank(*v.shape, RANK, gen)
            elif name != "model.embed_tokens.weight":
                glamm[name] = v.clone()
        elif k.startswith("model.multi_modal_projector."):
            name = k.replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
            glamm[name.replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")] = v.clone()
    # GLaMM trained the whole embedding / LM head: every row differs from the base.
    glamm["model.embed_tokens.weight"] = torch.randn(VOCAB + 7, h, generator=gen)
    glamm["lm_head.weight"] = torch.randn(VOCAB + 7, h, generator=gen)
    for i in range(cfg.language.num_layers):  # older transformers saved this buffer
        glamm[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(
            h // cfg.language.num_heads // 2
        )
    glamm["model.layers.1.post_attention_layernorm.weight"] += 0.25  # a base weight GLaMM changed
    for j, (o, i) in {"0": (h, h), "2": (cfg.prompt_dim, h)}.items():
        glamm[f"model.text_hidden_fcs.0.{j}.weight"] = torch.randn(o, i, generator=gen)
        glamm[f"model.text_hidden_fcs.0.{j}.bias"] = torch.randn(o, generator=gen)
    sam = build_sam(cfg.sam, cfg.prompt_dim)
    for k, v in sam.state_dict().items():
        glamm[f"model.grounding_encoder.{k}"] = v + (0.1 if k.startswith("mask_decoder.") else 0.0)
    glamm["model.region_encoder.mlph.0.weight"] = torch.randn(8, 8, generator=gen)
    glamm["model.region_encoder.roi_align.scale"] = torch.ones(1)
    grand_state = {**glamm, **grand}
    glamm_tok = _word_tokenizer(list(GLAMM_ADDED_TOKENS), "<unk>")
    for name, state in (("refseg", glamm), ("grand", grand_state)):
        folder = root / name
        folder.mkdir()
        _write_shards(folder, state)
        glamm_tok.save_pretrained(folder)
        (folder / "added_tokens.json").write_text(
            json.dumps({t: VOCAB + i for i, t in enumerate(GLAMM_ADDED_TOKENS)})
        )
        flat = {
            "model_type": "llava",
            "architectures": ["GLaMMForCausalLM"],
            "hidden_size": h,
            "vocab_size": 32007,
        }
        (folder / "config.json").write_text(json.dumps(flat))
    return root, cfg_path, base, glamm, grand_state


@pytest.fixture(scope="module")
def converted(fakes):
    root, cfg_path, *_ = fakes
    report = convert_glamm(
        root / "refseg", root / "llava", root / "ppcr", load_config(cfg_path).model, grand=root / "grand"
    )
    return root / "ppcr", report


def test_every_ppcr_tensor_glamm_provides_maps_back_to_itself():
    model = PPCRModel(load_config("tiny", {"model": MODEL}).model)
    names = [n for n in model.state_dict() if glamm_key(n) is not None]
    assert EMBED in names and LM_HEAD in names and any(n.startswith("segmentation.sam.") for n in names)
    for n in names:
        assert map_key(glamm_key(n))[1] == n
    assert map_key("model.region_encoder.x.weight") == ("drop", None)
    assert map_key("model.vision_tower.vision_tower.vision_model.x") is None  # GLaMM ships none: an error


def test_converted_checkpoint_holds_glamm_tensors(fakes, converted):
    _, _, base, glamm, grand = fakes
    out, report = converted
    model = load_checkpoint(out)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for j in ("0", "2"):
        for leaf in ("weight", "bias"):
            assert torch.equal(
                sd[f"semantic.projection.{j}.{leaf}"], glamm[f"model.text_hidden_fcs.0.{j}.{leaf}"]
            )
    decoder = [k for k in glamm if k.startswith("model.grounding_encoder.mask_decoder.")]
    assert decoder
    for k in decoder + ["model.grounding_encoder.image_encoder.pos_embed"]:
        assert torch.equal(sd["segmentation.sam." + k[len("model.grounding_encoder.") :]], glamm[k])
    # Vocabulary rows: Vicuna rows copied, [SEG] 32004 -> ppcr's [SEG], <bbox> 32002 -> [BOX].
    tok = model.mllm.tokenizer
    seg, box, image = (tok.convert_tokens_to_ids(t) for t in ("[SEG]", "[BOX]", "<image>"))
    assert (seg, box, image) == (32002, 32003, 32000)  # ppcr's ids on the llava-hf tokenizer
    for name, key in ((EMBED, "model.embed_tokens.weight"), (LM_HEAD, "lm_head.weight")):
        assert torch.equal(sd[name][:VOCAB], glamm[key][:VOCAB])
        assert torch.equal(sd[name][seg], glamm[key][32004])
        assert torch.equal(sd[name][box], glamm[key][32002])
    assert torch.equal(sd[EMBED][image], base["model.language_model.embed_tokens.weight"][image])
    # The one base tensor GLaMM changed travels in the checkpoint; the others come from llava-hf.
    changed = LLM + "layers.1.post_attention_layernorm.weight"
    assert list(report.base_overrides) == [changed] and model.cfg.base_overrides == [changed]
    assert torch.equal(sd[changed], glamm["model.layers.1.post_attention_layernorm.weight"])
    layers = model.cfg.language.num_layers
    assert report.dropped == {"model.layers.N.self_attn.rotary_emb": layers, "model.region_encoder": 2}
    # LoRA: base + scale·B·A reproduces GLaMM's merged q/v (true rank 8 = r for A, 4 for B).
    scale = model.cfg.lora.alpha / model.cfg.lora.r
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            p = f"{LLM}layers.{layer}.self_attn.{proj}."
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            for adapter, want in (("semantic", glamm[key]), ("spatial", grand[key])):
                eff = (
                    sd[p + "base_layer.weight"]
                    + scale * sd[f"{p}lora_B.{adapter}.weight"] @ sd[f"{p}lora_A.{adapter}.weight"]
                )
                torch.testing.assert_close(eff, want, rtol=0, atol=2e-5)
    assert report.lora["semantic"]["max"] < 1e-5 and report.lora["spatial"]["max"] < 1e-5
    meta = json.loads((out / "meta.json").read_text())
    assert meta["lora_errors"]["semantic"]["model.layers.0.self_attn.q_proj.weight"] < 1e-5


def test_segmenter_loads_the_converted_checkpoint(converted):
    from ppcr.predictor import Segmenter

    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    answers = []
    for seed in (0, 1):  # every weight comes from the checkpoint: a different init seed changes nothing
        torch.manual_seed(seed)
        answers.append(Segmenter.from_checkpoint(converted[0]).segment(rgb, "w5 w7"))
    out = answers[0]
    assert out.mask.dtype == bool and out.mask.shape == (40, 60)  # the original frame
    x1, y1, x2, y2 = out.box
    assert 0 <= x1 <= x2 <= 60 and 0 <= y1 <= y2 <= 40
    assert np.isfinite(out.score)
    np.testing.assert_array_equal(answers[1].mask, out.mask)
    np.testing.assert_array_equal(answers[1].box, out.box)
    assert answers[1].score == out.score


def test_lora_error_beyond_rank_r_is_the_svd_tail():
    """Rank 12 > r = 8: the best rank-8 error (Eckart–Young) is the norm of the 4 dropped singular values."""
    gen = torch.Generator().manual_seed(1)
    delta = _low_rank(64, 48, 12, gen)
    a, b = lora_factors(delta, 8, scale=2.0)
    err = float((delta - 2.0 * b @ a).norm() / delta.norm())
    s = torch.linalg.svdvals(delta)
    assert err == pytest.approx(float(s[8:].norm() / s.norm()), rel=1e-4)
    assert err > 0.01


def _broken_copy(fakes, tmp_path):
    root = fakes[0]
    folder = tmp_path / "refseg"
    shutil.copytree(root / "refseg", folder)
    return root, folder, json.loads((folder / "pytorch_model.bin.index.json").read_text())


def _convert(fakes, folder, tmp_path):
    root, cfg_path = fakes[0], fakes[1]
    return convert_glamm(folder, root / "llava", tmp_path / "out", load_config(cfg_path).model)


def test_corrupted_shard_names_the_file(fakes, tmp_path):
    _, folder, index = _broken_copy(fakes, tmp_path)
    shard = folder / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=r"pytorch_model-00002-of-00003.bin: cannot be read"):
        _convert(fakes, folder, tmp_path)


def test_missing_key_names_the_index_and_key(fakes, tmp_path):
    _, folder, index = _broken_copy(fakes, tmp_path)
    key = "model.text_hidden_fcs.0.2.bias"
    shard = index["weight_map"].pop(key)
    state = torch.load(folder / shard, weights_only=True)
    del state[key]
    torch.save(state, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=rf"pytorch_model.bin.index.json: .*missing tensors: {key}"):
        _convert(fakes, folder, tmp_path)


def test_wrong_shape_names_the_shard_and_key(fakes, tmp_path):
    _, folder, index = _broken_copy(fakes, tmp_path)
    key = "model.grounding_encoder.mask_decoder.iou_token.weight"
    shard = index["weight_map"][key]
    state = torch.load(folder / shard, weights_only=True)
    state[key] = torch.zeros(1, 3)
    torch.save(state, folder / shard)
    with pytest.raises(WeightsError, match=rf"{shard}: .*mis-shaped tensors: {key} \(1, 3\)"):
        _convert(fakes, folder, tmp_path)


def test_unknown_key_is_refused(fakes, tmp_path):
    _, folder, index = _broken_copy(fakes, tmp_path)
    index["weight_map"]["model.vision_tower.weight"] = index["weight_map"]["lm_head.weight"]
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"tensors not in this model: model.vision_tower.weight"):
        _convert(fakes, folder, tmp_path)


# ---- warm start ---------------------------------------------------------------------------------


def _run_config(fakes, **model):
    root, cfg_path = fakes[0], fakes[1]
    return load_config(cfg_path, {"model": {"mllm_path": str(root / "llava"), **model}})


def test_init_weights_loads_the_converted_checkpoint_strictly(fakes, converted):
    out, report = converted
    cfg = _run_config(fakes, init_weights=str(out))
    model = PPCRModel(cfg.model)
    keys = load_init_weights(model, out)
    ref = load_checkpoint(out).state_dict()
    got = model.state_dict()
    for k in keys:
        assert torch.equal(got[k], ref[k]), k
    # The changed base tensor is adopted, so this run's own checkpoints carry it.
    assert model.cfg.base_overrides == list(report.base_overrides)
    other = PPCRModel(_run_config(fakes, lora={"alpha": 32}).model)
    with pytest.raises(WeightsError, match=r"config.yaml: model.lora .* != this run's"):
        load_init_weights(other, out)


def test_local_training_warm_starts_before_the_optimizer(fakes, converted, monkeypatch):
    import ppcr.train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "shard_dir", lambda *a: "x")
    monkeypatch.setattr(train_mod, "load_training_samples", lambda *a: [])
    monkeypatch.setattr(train_mod, "load_init_weights", lambda m, p: calls.append(("init", str(p))))

    def stop(model, tcfg):
        calls.append(("optimizer", None))
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_mod, "build_optimizer", stop)
    cfg = _run_config(fakes, init_weights=str(converted[0]))
    with pytest.raises(RuntimeError, match="stop here"):
        train_mod.train(cfg, out_dir=fakes[0] / "run", progress=False)
    assert calls == [("init", str(converted[0])), ("optimizer", None)]


def test_shipped_7b_recipe_documents_init_weights():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "configs/train/ppcr_llava7b.yaml").read_text()
    assert "init_weights" in text and "convert-glamm" in text


# ---- fidelity switches ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return PPCRModel(load_config("tiny").model).eval()


def test_semantic_state_reads_at_or_before_seg(tiny):
    from ppcr.prompts import SEG_TOKEN, SEMANTIC_ANSWER, semantic_question

    m = tiny.mllm
    feats = torch.randn(1, m.num_image_tokens, m.hidden_size)
    with torch.no_grad():
        at = tiny.semantic(m, feats, ["red circle"]).hidden
        tiny.cfg.semantic_state = "predicting"
        try:
            pred = tiny.semantic(m, feats, ["red circle"]).hidden
        finally:
            tiny.cfg.semantic_state = "at"
        st = m.run_stage("semantic", [semantic_question("red circle")], SEMANTIC_ANSWER, SEG_TOKEN, feats)
        st_before = m.run_stage(
            "semantic", [semantic_question("red circle")], SEMANTIC_ANSWER, SEG_TOKEN, feats, offset=-1
        )
    assert torch.equal(at, st.token) and torch.equal(pred, st_before.token)
    assert not torch.allclose(at, pred)


def test_glamm_prompt_format_wraps_the_image():
    from ppcr.prompts import conversation

    p, a = conversation("Can you segment the cat?", "It is [SEG].", "SYS", 2, True, "glamm")
    assert p == (
        "SYS USER: The <im_start><image><image><im_end> provides an overview of the picture.\n"
        "Can you segment the cat? ASSISTANT:"
    )
    ppcr_cfg = load_config("tiny", {"model": MODEL}).model
    glamm_cfg = load_config("tiny", {"model": {**MODEL, "prompt_format": "glamm"}}).model
    from ppcr.mllm import build_tokenizer

    t1, t2 = build_tokenizer(ppcr_cfg), build_tokenizer(glamm_cfg)
    assert t2.convert_tokens_to_ids("[SEG]") == t1.convert_tokens_to_ids("[SEG]")  # ids never move
    assert len(t2) == len(t1) + 2 and "<im_start>" not in t1.get_vocab()
    with pytest.raises(ConfigError, match="prompt_format glamm puts the image first"):
        load_config("tiny", {"model": {"prompt_format": "glamm"}})  # tiny puts the image after


def test_clip_crop_keeps_the_centre_and_pad_keeps_everything():
    from ppcr.geometry import clip_preprocess
    from ppcr.inputs import Item, collate

    img = np.zeros((40, 120, 3), dtype=np.uint8)
    img[:, :40] = (255, 0, 0)  # red left third, white centre, blue right third
    img[:, 40:80] = 255
    img[:, 80:] = (0, 0, 255)
    pad, crop = clip_preprocess(img, 30, "pad"), clip_preprocess(img, 30, "crop")
    assert pad.abs()[:, 0].max() < 0.02  # padding rows: the CLIP mean colour
    assert crop[:, 0].min() > 1.5  # no padding: the white centre fills the square
    assert pad[0, 15, 2] > 1.5 and pad[2, 15, -3] > 1.5  # red and blue both still visible when padded
    batch = collate([Item(0, img, "x")], 30, 64, "crop")
    assert torch.equal(batch.clip_pixels[0], crop)
    with pytest.raises(ConfigError, match="clip_preprocess crop needs box_head mlp"):
        load_config("tiny", {"model": {"clip_preprocess": "crop"}})


def test_cli_convert_glamm_with_glamm_fidelity(fakes, tmp_path, capsys):
    from ppcr.cli import main

    root, cfg_path = fakes[0], fakes[1]
    rc = main(
        ["convert-glamm", "--glamm", str(root / "refseg"), "--llava", str(root / "llava")]
        + ["--out", str(tmp_path / "c"), "--config", str(cfg_path), "--fidelity", "glamm"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.split("\nppcr checkpoint:")[0])
    assert summary["token_rows"]["<im_start> (32005)"] == "<im_start> (32000)"
    assert "no --grand" in summary["fresh"][0]
    cfg = load_checkpoint(tmp_path / "c").cfg
    assert (cfg.semantic_state, cfg.prompt_format, cfg.clip_preprocess) == ("predicting", "glamm", "crop")
    rc = main(
        [
            "convert-glamm",
            "--glamm",
            str(tmp_path),
            "--llava",
            str(root / "llava"),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    assert rc == 2 and "pytorch_model.bin.index.json" in capsys.readouterr().err
