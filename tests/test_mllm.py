"""The shared MLLM: special tokens, tokenisation/labels, and gradient flow through both LoRA branches."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ppcr.config import InputError
from ppcr.inputs import Item, collate
from ppcr.losses import ppcr_loss
from ppcr.mllm import ADAPTERS, IGNORE_INDEX, MLLM, PromptTokenizer, check_llava_config, control_tokens
from ppcr.model import PPCRModel
from ppcr.prompts import (
    BOX_TOKEN,
    IMAGE_TOKEN,
    SEG_TOKEN,
    SEM_TOKEN,
    SEMANTIC_ANSWER,
    SPATIAL_ANSWER,
    conversation,
    semantic_question,
)
from ppcr.spatial_stage import SpatialStage
from ppcr.weights import WeightsError

SPECIALS = (IMAGE_TOKEN, SEG_TOKEN, BOX_TOKEN, SEM_TOKEN)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return PPCRModel(cfg.model)


def _item(key, h, w, expr, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    y0, x0 = h // 4 + seed % 3, w // 5
    mask[y0 : y0 + h // 3, x0 : x0 + w // 2] = True
    box = np.array([x0, y0, x0 + w // 2, y0 + h // 3], dtype=np.float64)
    return Item(key, img, expr, mask, box)


@pytest.fixture(scope="module")
def batch(model):
    items = [
        _item("a", 60, 90, "the red circle", 0),
        _item("a", 60, 90, "the blue square on the left", 1),
        _item("b", 80, 50, "the small triangle", 2),
    ]
    return collate(items, model.clip_size, model.sam_size)


def _lora(model, adapter: str, kind: str) -> dict[str, torch.nn.Parameter]:
    out = {n: p for n, p in model.named_parameters() if f".{kind}.{adapter}." in n}
    assert out, f"no {kind} weights for adapter {adapter}"
    return out


def _grad_abs(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


# --- tokenizer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", SPECIALS)
def test_special_token_is_single_id(model, token):
    tok = model.mllm.tokenizer
    tid = tok.convert_tokens_to_ids(token)
    assert tid == model.mllm.ids[token]
    assert tid not in (None, tok.unk_token_id)
    assert tok(token, add_special_tokens=False).input_ids == [tid]
    for sentence in (f"Please segment {token} now.", f"x{token}y", f"It is {token}.", f"{token}{token}"):
        ids = tok(sentence, add_special_tokens=False).input_ids
        assert ids.count(tid) == sentence.count(token), sentence


def test_special_token_ids_distinct(model):
    assert len(set(model.mllm.ids.values())) == 4


def test_image_tokens_in_conversation(model):
    mllm = model.mllm
    prompt, answer = conversation(
        semantic_question("the red circle"), SEMANTIC_ANSWER, "", mllm.num_image_tokens
    )
    ids = mllm.tokenizer(prompt + answer, add_special_tokens=False).input_ids
    v = model.cfg.vision
    assert ids.count(mllm.ids[IMAGE_TOKEN]) == mllm.num_image_tokens == (v.image_size // v.patch_size) ** 2
    assert ids.count(mllm.ids[SEG_TOKEN]) == 1


def test_positions_by_id(model):
    mllm = model.mllm
    seg = mllm.ids[SEG_TOKEN]
    ids = torch.tensor([[5, 6, seg, 7, 0], [seg, 1, 2, 3, 4], [1, 2, 3, 4, seg]])
    assert mllm.positions(ids, SEG_TOKEN).tolist() == [2, 0, 4]


def test_positions_absent_or_repeated_raises(model):
    mllm = model.mllm
    seg = mllm.ids[SEG_TOKEN]
    with pytest.raises(ValueError, match=r"exactly one \[SEG\]"):
        mllm.positions(torch.tensor([[1, 2, 3], [seg, 2, 3]]), SEG_TOKEN)
    with pytest.raises(ValueError, match=r"exactly one \[SEG\]"):
        mllm.positions(torch.tensor([[seg, 2, seg], [seg, 2, 3]]), SEG_TOKEN)


def test_tokenize_labels_answer_and_eos_only(model):
    mllm = model.mllm
    tok = mllm.tokenizer
    prompts = ["USER: short ASSISTANT:", "USER: a much longer question about the red circle ASSISTANT:"]
    answers = [f" {SEMANTIC_ANSWER}", f" {SPATIAL_ANSWER}"]
    tp = mllm.tokenize(prompts, answers)
    assert tp.input_ids.shape == tp.labels.shape == tp.attention_mask.shape
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p_ids = tok(p, add_special_tokens=False).input_ids
        a_ids = tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        n = len(bos) + len(p_ids) + len(a_ids)
        assert tp.input_ids[i, :n].tolist() == bos + p_ids + a_ids
        assert tp.attention_mask[i].tolist() == [1] * n + [0] * (tp.input_ids.shape[1] - n)
        labelled = tp.labels[i] != IGNORE_INDEX
        assert labelled.nonzero().flatten().tolist() == list(range(n - len(a_ids), n))
        assert tp.labels[i, labelled].tolist() == a_ids
        assert (tp.input_ids[i, n:] == tok.pad_token_id).all()
    assert tp.attention_mask[0].sum() < tp.attention_mask[1].sum()


# --- gradient flow ---------------------------------------------------------------------------------------


def test_both_adapters_learn_in_one_ppcr_step(model, batch, cfg):
    """One PPCR step (both stages + SAM, joint loss) must update both LoRA branches.

    lora_B is zero-initialised, so the first step gives lora_A zero gradient; lora_B must get it.
    A second step then reaches lora_A of both branches.
    """
    model.train()
    torch.manual_seed(1)
    lora_a = {a: _lora(model, a, "lora_A") for a in ADAPTERS}
    lora_b = {a: _lora(model, a, "lora_B") for a in ADAPTERS}
    before = {a: {n: p.detach().clone() for n, p in lora_b[a].items()} for a in ADAPTERS}
    params = [p for p in model.parameters() if p.requires_grad]
    ids = {id(p) for p in params}
    for a in ADAPTERS:
        assert all(id(p) in ids for p in lora_b[a].values()), f"{a} adapter not trainable"
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    out = model(batch)
    assert out.box is not None
    loss, logs = ppcr_loss(out, batch, cfg.loss, model.patch_centers())
    assert torch.isfinite(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for a in ADAPTERS:
        assert _grad_abs(lora_b[a].values()) > 0, f"{a} lora_B got no gradient"
    opt.step()
    for a in ADAPTERS:
        changed = [not torch.equal(p, before[a][n]) for n, p in lora_b[a].items()]
        assert all(changed), f"{a}: {changed.count(False)} lora_B tensors unchanged"

    out = model(batch)
    loss, _ = ppcr_loss(out, batch, cfg.loss, model.patch_centers())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for a in ADAPTERS:
        assert _grad_abs(lora_a[a].values()) > 0, f"{a} lora_A got no gradient after lora_B moved"
    opt.zero_grad(set_to_none=True)


def _stages(model, batch, spatial):
    mllm = model.mllm
    feats = mllm.image_features(batch.clip_pixels)[batch.image_index]
    sem = model.semantic(mllm, feats, batch.expressions)
    hidden = sem.hidden
    if not hidden.requires_grad:
        hidden.requires_grad_(True)
    spa = spatial(mllm, feats, batch.expressions, hidden, batch.original_hw[batch.image_index])
    return hidden, spa


def test_box_loss_reaches_semantic_branch(model, batch):
    """spatial_prompt 'semantic': the box depends on the [SEG] state, so L1(box) trains branch A."""
    model.train()
    model.zero_grad(set_to_none=True)
    assert model.spatial.mode == "semantic"
    hidden, spa = _stages(model, batch, model.spatial)
    l1 = F.l1_loss(spa.box, batch.gt_boxes)
    (g,) = torch.autograd.grad(l1, [hidden], retain_graph=True)
    assert g is not None and float(g.abs().sum()) > 0
    l1.backward()
    assert float(model.spatial.semantic_in.weight.grad.abs().sum()) > 0
    assert _grad_abs(_lora(model, "semantic", "lora_B").values()) > 0
    assert _grad_abs(_lora(model, "spatial", "lora_B").values()) > 0
    # The SAM-side projection is not on the box path.
    assert _grad_abs(model.semantic.projection.parameters()) == 0
    model.zero_grad(set_to_none=True)


def test_box_loss_ignores_semantic_branch_in_expression_mode(model, batch):
    """spatial_prompt 'expression' (ablation): the box never sees the semantic stage."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    spatial = SpatialStage(model.mllm, "expression", "mlp")
    assert spatial.semantic_in is None
    hidden, spa = _stages(model, batch, spatial)
    l1 = F.l1_loss(spa.box, batch.gt_boxes)
    (g,) = torch.autograd.grad(l1, [hidden], retain_graph=True, allow_unused=True)
    assert g is None or float(g.abs().sum()) == 0
    l1.backward()
    assert _grad_abs(_lora(model, "semantic", "lora_A").values()) == 0
    assert _grad_abs(_lora(model, "semantic", "lora_B").values()) == 0
    assert _grad_abs(_lora(model, "spatial", "lora_B").values()) > 0
    model.zero_grad(set_to_none=True)


def test_adapter_rejects_unknown_name(model):
    with pytest.raises(ValueError, match="adapter must be one of"):
        with model.mllm.adapter("bogus"):
            pass


def test_adapters_route_through_their_own_weights(model, batch):
    """Perturbing branch B's LoRA changes the spatial-branch states and leaves the semantic branch's alone."""
    model.eval()
    mllm = model.mllm
    n = len(batch)
    t = mllm.num_image_tokens
    with torch.no_grad():
        feats = mllm.image_features(batch.clip_pixels)[batch.image_index]
        tp = mllm.tokenize(["USER: hi ASSISTANT:"] * n, [" ok"] * n)
        tp.input_ids = torch.cat(
            [tp.input_ids[:, :1], torch.full((n, t), mllm.ids[IMAGE_TOKEN]), tp.input_ids[:, 1:]], 1
        )
        tp.attention_mask = torch.ones_like(tp.input_ids)
        tp.labels = torch.cat([torch.full((n, t), IGNORE_INDEX), tp.labels], 1)

        def run(adapter):
            with mllm.adapter(adapter):
                return mllm.language(tp, feats)[0]

        sem0, spa0 = run("semantic"), run("spatial")
        lora_b = _lora(model, "spatial", "lora_B")
        saved = {k: p.clone() for k, p in lora_b.items()}
        gen = torch.Generator().manual_seed(3)
        try:
            for p in lora_b.values():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            sem1, spa1 = run("semantic"), run("spatial")
        finally:
            for k, p in lora_b.items():
                p.copy_(saved[k])
    torch.testing.assert_close(sem1, sem0)
    assert not torch.allclose(spa1, spa0, atol=1e-4)


def test_eval_forward_keeps_both_adapters_trainable(model, batch):
    model.eval()
    with torch.no_grad():
        model(batch)
    for a in ADAPTERS:
        assert all(p.requires_grad for p in _lora(model, a, "lora_B").values()), f"{a} frozen by eval"


# --- the text rules where the prompt is built (PromptTokenizer) -------------------------------------


def _check(prompts, text):
    with pytest.raises(InputError) as err:
        prompts.check_expression(text)
    return str(err.value)


def test_every_control_token_of_the_tokenizer_is_refused(model):
    """Not only ppcr's tokens: the tokenizer's own </s>, <s>, <unk>, <pad> too."""
    prompts = model.mllm.prompts
    control = control_tokens(model.mllm.tokenizer)
    assert {"</s>", "<s>", "<unk>", "<pad>", *SPECIALS} <= set(control)
    for token in control:
        message = _check(prompts, f"the cup {token} on the left")
        assert repr(token) in message and ("control token" in message or "reserved token" in message)


def test_user_text_never_becomes_a_control_id_in_the_stage(model, batch):
    """The last line of defence: a prompt whose text holds </s> is refused where it is tokenized,
    so even a caller that skips the entry checks cannot put a control id into the user's turn."""
    mllm = model.mllm
    question = semantic_question("the cup </s> on the left")  # clean_expression alone lets it through
    with pytest.raises(InputError, match=r"prompt 0: .*control token\(s\) \['</s>'\] outside its template"):
        mllm.prompts.encode([question], SEMANTIC_ANSWER)
    with torch.no_grad(), pytest.raises(InputError, match="</s>"):
        model.reason(
            batch.clip_pixels, batch.image_index, ["the red circle", "a </s> b", "x"], batch.original_hw
        )


def test_context_limit_is_checked_exactly(model, batch):
    """The longest expression that fits makes a row of at most max_position_embeddings tokens; one
    more word is refused, by the entry check and by the stage itself, naming the numbers."""
    prompts = model.mllm.prompts
    assert prompts.max_positions == model.cfg.language.max_position_embeddings == 512

    def fits(n: int) -> bool:
        try:
            prompts.check_expression("cat " * n)
            return True
        except InputError:
            return False

    lo, hi = 1, 600  # fits(lo), not fits(hi)
    assert fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    longest = max(
        prompts.encode([q], a).input_ids.shape[1] for q, a in prompts.inference_prompts(("cat " * lo).strip())
    )
    over = max(
        len(prompts._ids(*prompts.render(q, a))[0])
        for q, a in prompts.inference_prompts(("cat " * hi).strip())
    )
    assert longest <= 512 < over
    message = _check(prompts, "cat " * hi)
    assert f"its prompt is {over} tokens" in message and "holds 512" in message
    # The case: 3,050 characters ran silently through the model before.
    with torch.no_grad(), pytest.raises(InputError, match="context holds 512"):
        model.reason(batch.clip_pixels, batch.image_index[:1], ["a " * 1525], batch.original_hw)


def test_checker_without_the_model_agrees_with_the_models(model):
    """What the ingress and the batch job's decode tasks build from the config alone."""
    alone, own = PromptTokenizer.from_config(model.cfg), model.mllm.prompts
    assert (alone.num_image_tokens, alone.max_positions) == (own.num_image_tokens, own.max_positions)
    assert alone.forbidden_ids == own.forbidden_ids
    for q, a in own.inference_prompts("the red circle on the left"):
        assert torch.equal(alone.encode([q], a).input_ids, own.encode([q], a).input_ids)


def _word_level(normalizer=None):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", "the", "cup", "[mask]"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if normalizer is not None:
        raw.normalizer = normalizer
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.add_tokens([AddedToken("[mask]", normalized=True, special=True)])
    return tok


def test_characters_the_tokenizer_cannot_encode_are_refused(model):
    """A tokenizer without byte fallback maps unknown characters to <unk>: refused, not guessed."""
    prompts = PromptTokenizer(_word_level(), model.cfg, 4, 512)
    assert prompts.check_text("the cup") == "the cup"
    with pytest.raises(InputError, match="cannot encode.*'<unk>'"):
        prompts.check_text("the ☃ cup")


def test_a_control_token_matched_after_normalisation_is_refused(model):
    """`[MASK]` is not the text `[mask]`, but a lower-casing tokenizer matches it as that token."""
    from tokenizers import normalizers

    prompts = PromptTokenizer(_word_level(normalizers.Lowercase()), model.cfg, 4, 512)
    with pytest.raises(InputError, match=r"becomes the tokenizer's control token\(s\) \['\[mask\]'\]"):
        prompts.check_text("the [MASK] cup")


def test_base_llava_folder_must_have_the_presets_context(model):
    config = copy.deepcopy(model.mllm.llava.config)
    check_llava_config(config, model.cfg, "folder")
    config.text_config.max_position_embeddings = 4096
    with pytest.raises(WeightsError, match=r"text_config.max_position_embeddings 4096 \(preset 512\)"):
        check_llava_config(config, model.cfg, "folder")


def test_initializer_range_sets_the_language_model_and_projector_init_only(cfg):
    """`model.language.initializer_range` is the std of a random language model's (and projector's)
    linear and embedding weights; the CLIP tower keeps its own width-scaled init."""
    stds = {}
    for r in (0.02, 0.1):
        language = dataclasses.replace(cfg.model.language, initializer_range=r)
        torch.manual_seed(0)
        llava = MLLM(dataclasses.replace(cfg.model, language=language)).llava
        lm = llava.model.language_model
        stds[r] = {
            "q_proj": float(lm.layers[0].self_attn.q_proj.base_layer.weight.std()),
            "down_proj": float(lm.layers[-1].mlp.down_proj.weight.std()),
            "embed": float(lm.embed_tokens.weight[:100].std()),
            "projector": float(llava.model.multi_modal_projector.linear_1.weight.std()),
            "clip": float(llava.model.vision_tower.encoder.layers[0].mlp.fc1.weight.std()),
        }
    for name in ("q_proj", "down_proj", "embed", "projector"):
        assert stds[0.02][name] == pytest.approx(0.02, rel=0.1), name
        assert stds[0.1][name] == pytest.approx(0.1, rel=0.1), name
    assert stds[0.02]["clip"] == pytest.approx(stds[0.1]["clip"])
