"""The multimodal LLM shared by the semantic and spatial stages: LLaVA-1.5 with two LoRA branches.

One `transformers.LlavaForConditionalGeneration` carries two `peft` LoRA adapters on the language
model's attention projections: `semantic` (branch A) and `spatial` (branch B). A PPCR step runs the
language model twice (once per adapter) over vision features computed once per image.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Cache,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import DynamicLayer

from .config import InputError, ModelConfig
from .precision import torch_dtype
from .prompts import (
    GLAMM_TOKENS,
    IMAGE_TOKEN,
    SEM_TOKEN,
    SEMANTIC_ANSWER,
    SEMANTIC_TEMPLATES,
    SPATIAL_ANSWER,
    SPATIAL_TEMPLATE_EXPRESSION,
    SPATIAL_TEMPLATE_EXPRESSION_SEMANTIC,
    SPATIAL_TEMPLATES,
    SPECIAL_TOKENS,
    clean_expression,
    conversation,
    semantic_question,
    spatial_question,
)
from .weights import SHOWN, WeightsError, check_keys

ADAPTERS = ("semantic", "spatial")
IGNORE_INDEX = -100

# Words the offline tokenizer learns merges for; anything else still encodes (byte-level BPE).
_TINY_CORPUS_WORDS = (
    "the a an of in on at to left right above below top bottom middle center leftmost rightmost topmost "
    "bottommost small big large tiny huge red green blue yellow purple orange black white gray circle "
    "square triangle star one object thing shape man woman person guy girl boy dog cat car bottle water "
    "short shirt yellow near next behind front between closest farthest second first last other"
)


def special_tokens(cfg: ModelConfig) -> tuple[str, ...]:
    """The tokens ppcr adds, in order: ours, then GLaMM's image wrappers under prompt_format glamm
    (appended after ours, so switching the format never moves the ids of [SEG] / [BOX] / <sem>)."""
    return SPECIAL_TOKENS + (GLAMM_TOKENS if cfg.prompt_format == "glamm" else ())


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with our special tokens, each a single id (asserted).

    Production: loaded from `tokenizer_path` (or `mllm_path`) on local disk. Tiny: a byte-level BPE
    trained in code on the templates, so nothing is downloaded.
    """
    path = cfg.tokenizer_path or cfg.mllm_path
    if path is not None:
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"tokenizer folder not found: {path} (model.tokenizer_path / model.mllm_path)"
            )
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
        tok.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token
    else:
        tok = _build_offline_bpe()
    extra = special_tokens(cfg)[len(SPECIAL_TOKENS) :]
    if extra:
        tok.add_tokens(list(extra), special_tokens=True)
    for token in special_tokens(cfg):
        ids = tok(f"x {token}.", add_special_tokens=False).input_ids
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or tid == tok.unk_token_id or ids.count(tid) != 1:
            raise ValueError(f"special token {token!r} does not encode to a single id (got {ids})")
    return tok


def _build_offline_bpe(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = list(SEMANTIC_TEMPLATES) + list(SPATIAL_TEMPLATES)
    corpus += [SPATIAL_TEMPLATE_EXPRESSION, SPATIAL_TEMPLATE_EXPRESSION_SEMANTIC, "USER: ASSISTANT: It is."]
    corpus += [_TINY_CORPUS_WORDS] * 4
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    return tok


LLAVA_HF_HINT = (
    "model.mllm_path must be a llava-hf folder (e.g. llava-hf/llava-1.5-7b-hf: config.json with "
    "model_type llava and vision_config/text_config, safetensors under language_model.*, vision_tower.*, "
    "multi_modal_projector.*); original-LLaVA and GLaMM folders use other key names"
)


def check_llava_config(config: LlavaConfig, cfg: ModelConfig, folder: str | Path) -> None:
    """Raise WeightsError if the base folder's sizes differ from the preset's (`model.vision` /
    `model.language`), before any weight is read."""
    v, t = config.vision_config, config.text_config
    expected = {
        "vision_config.hidden_size": (v.hidden_size, cfg.vision.hidden_size),
        "vision_config.intermediate_size": (v.intermediate_size, cfg.vision.intermediate_size),
        "vision_config.num_hidden_layers": (v.num_hidden_layers, cfg.vision.num_layers),
        "vision_config.num_attention_heads": (v.num_attention_heads, cfg.vision.num_heads),
        "vision_config.image_size": (v.image_size, cfg.vision.image_size),
        "vision_config.patch_size": (v.patch_size, cfg.vision.patch_size),
        "vision_feature_layer": (config.vision_feature_layer, cfg.vision.feature_layer),
        "text_config.hidden_size": (t.hidden_size, cfg.language.hidden_size),
        "text_config.intermediate_size": (t.intermediate_size, cfg.language.intermediate_size),
        "text_config.num_hidden_layers": (t.num_hidden_layers, cfg.language.num_layers),
        "text_config.num_attention_heads": (t.num_attention_heads, cfg.language.num_heads),
        # The context PromptTokenizer checks prompts against, also where no model is built (the ingress).
        "text_config.max_position_embeddings": (
            t.max_position_embeddings,
            cfg.language.max_position_embeddings,
        ),
    }
    wrong = [f"{k} {got} (preset {want})" for k, (got, want) in expected.items() if got != want]
    if wrong:
        raise WeightsError(
            f"{folder}/config.json: sizes differ from model preset {cfg.preset!r}: {'; '.join(wrong)}"
        )


def load_llava(cfg: ModelConfig) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 from the local llava-hf folder `cfg.mllm_path`, strictly: the config's sizes must be the
    preset's and every weight must be on disk under the expected name and shape (WeightsError lists
    the keys otherwise). Accepts the names llava-hf ships (transformers <= 4.51: language_model.model.*,
    language_model.lm_head.*, vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*) and
    the 5.x names; transformers maps the former at load."""
    folder = Path(cfg.mllm_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no LLaVA checkpoint (config.json) in model.mllm_path={folder}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not isinstance(config, LlavaConfig):
        raise WeightsError(
            f"{folder}/config.json: model_type {config.model_type!r}, not llava. {LLAVA_HF_HINT}"
        )
    check_llava_config(config, cfg, folder)
    # ignore_mismatched_sizes: transformers then reports mis-shaped keys instead of raising its own
    # error, so all three kinds are listed together below (and raised: nothing is re-initialised).
    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder,
        dtype=torch_dtype(cfg.dtype),
        local_files_only=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    check_keys(
        folder,
        "a llava-hf LLaVA folder",
        missing=info["missing_keys"],
        unexpected=info["unexpected_keys"],
        mismatched=info["mismatched_keys"],
        hint=LLAVA_HF_HINT,
    )
    if info.get("error_msgs"):
        raise WeightsError(f"{folder}: loading errors: {'; '.join(map(str, info['error_msgs'][:SHOWN]))}")
    return model


def llava_config(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, vocab_rows: int | None = None
) -> LlavaConfig:
    """The LlavaConfig of the preset's sizes (`model.vision`, `model.language`), the tokenizer's ids.
    vocab_rows: rows of the embedding and LM-head matrices (None: `language.vocab_size`, at least the
    tokenizer's length)."""
    v, lang = cfg.vision, cfg.language
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    text = LlamaConfig(
        # Rows past the tokenizer are never indexed; llava-hf pads its 32002 tokens to 32064 the same way.
        vocab_size=vocab_rows or max(len(tokenizer), lang.vocab_size or 0),
        hidden_size=lang.hidden_size,
        intermediate_size=lang.intermediate_size,
        num_hidden_layers=lang.num_layers,
        num_attention_heads=lang.num_heads,
        num_key_value_heads=lang.num_heads,
        max_position_embeddings=lang.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=lang.initializer_range,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=v.feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(v.image_size // v.patch_size) ** 2,
    )


def build_llava(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 from `mllm_path` (llava-hf folder, local only, strict) or random init from sizes."""
    if cfg.mllm_path is not None:
        model = load_llava(cfg)
        model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    else:
        # Built in model.dtype from the start (transformers sets it as the default dtype while the
        # modules are made and initialised): a float32 build cast afterwards needs 4 bytes per
        # parameter at once, ~30 GB at 7B. For float32 (tiny) this is the plain constructor's model.
        model = LlavaForConditionalGeneration._from_config(
            llava_config(cfg, tokenizer), dtype=torch_dtype(cfg.dtype)
        )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model


@dataclass
class TokenizedPrompts:
    """A right-padded batch. `labels` are IGNORE_INDEX except on the answer tokens."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Every token the tokenizer matches as a whole before its BPE runs, by text: its special tokens
    (`<s>`, `</s>`, `<unk>`, `<pad>`, ...) and every added token (ppcr's `[SEG]`, `<image>`, ... included)."""
    out = {added.content: tid for tid, added in tokenizer.added_tokens_decoder.items()}
    for token in tokenizer.all_special_tokens:
        out.setdefault(token, tokenizer.convert_tokens_to_ids(token))
    return out


class PromptTokenizer:
    """The one place where text becomes the language model's input ids (stages 1 and 2).

    `encode` renders each question as a LLaVA-1.5 conversation (`prompts.conversation`) and tokenizes
    it; `tokenize` refuses (InputError) any prompt longer than the language model's context
    (`max_positions`, the model's `max_position_embeddings`) and any prompt in which user text became a
    control id: only the template's own `<image>`, `<sem>` (and GLaMM's image wrappers) may appear.
    `check_expression` applies the same rules to one expression before any model work: every entry
    point calls it (`Segmenter`, the serving ingress and MLLM replicas, the batch job's decode tasks,
    `ppcr evaluate`). User text is never encoded into control ids: an expression holding one of the
    tokenizer's control tokens (`control_tokens`) is refused, not escaped (docs/inputs.md).

    Built by `MLLM` from its tokenizer and model, and by `from_config` where no model is built.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        cfg: ModelConfig,
        num_image_tokens: int,
        max_positions: int,
    ):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.num_image_tokens = num_image_tokens
        self.max_positions = max_positions
        self.control = control_tokens(tokenizer)
        # Ids no prompt may hold: every control token but the template's own (which MLLM.language and
        # MLLM.positions count, and whose text clean_expression refuses) and <unk> (a word the
        # tokenizer lacks, not a control: check_text refuses it in user text).
        template = {IMAGE_TOKEN, SEM_TOKEN, *(GLAMM_TOKENS if cfg.prompt_format == "glamm" else ())}
        self.forbidden_ids = frozenset(
            tid for t, tid in self.control.items() if t not in template and tid != tokenizer.unk_token_id
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> PromptTokenizer:
        """From a model config alone (its tokenizer folder, or the tiny preset's offline BPE): what the
        serving ingress and the batch job's decode tasks check texts with, without building the model.
        Image tokens: (image_size / patch_size)², LLaVA-1.5's "default" feature selection."""
        v = cfg.vision
        return cls(
            build_tokenizer(cfg),
            cfg,
            (v.image_size // v.patch_size) ** 2,
            cfg.language.max_position_embeddings,
        )

    def check_text(self, expression: str, max_chars: int | None = None) -> str:
        """`clean_expression`, then refuse text holding one of the tokenizer's control tokens or
        characters the tokenizer can only encode as `<unk>`. Returns the cleaned text; InputError."""
        text = clean_expression(expression, max_chars)
        for token in self.control:
            if token and token in text:
                raise InputError(
                    f"expression holds {token!r}, a control token of the language model's tokenizer; "
                    "it cannot be sent as text"
                )
        # Tokens the tokenizer matches after normalisation, and <unk> for what it cannot encode.
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            raise InputError(
                f"expression holds characters the tokenizer cannot encode (they become {self.tokenizer.unk_token!r})"
            )
        bad = [t for t in ids if t in self.forbidden_ids]
        if bad:
            names = sorted(set(self.tokenizer.convert_ids_to_tokens(bad)))
            raise InputError(f"expression becomes the tokenizer's control token(s) {names}")
        return text

    def inference_prompts(self, text: str) -> list[tuple[str, str]]:
        """(question, answer) of each language-model pass `PPCRModel.reason` runs for a cleaned
        expression at inference (fixed templates): the semantic stage's, then the spatial stage's."""
        out = [(semantic_question(text), SEMANTIC_ANSWER)]
        if self.cfg.spatial_prompt != "none":
            out.append((spatial_question(text, self.cfg.spatial_prompt), SPATIAL_ANSWER))
        return out

    def check_expression(self, expression: str, max_chars: int | None = None) -> str:
        """The text rules of every entry point: `check_text`, and every prompt inference builds from
        the expression fits the language model's context. Returns the cleaned text; InputError."""
        text = self.check_text(expression, max_chars)
        for question, answer in self.inference_prompts(text):
            prompt, answer = self.render(question, answer)
            n = len(self._ids(prompt, answer)[0])
            if n > self.max_positions:
                raise InputError(f"expression is too long for the language model: {self._overflow(n)}")
        return text

    def check_expressions(self, expressions: Sequence[str], max_chars: int | None = None) -> list[str]:
        """`check_expression` of each; the InputError names the expression's index."""
        out = []
        for i, e in enumerate(expressions):
            try:
                out.append(self.check_expression(e, max_chars))
            except InputError as exc:
                raise InputError(f"expression {i}: {exc}") from None
        return out

    def render(self, question: str, answer: str) -> tuple[str, str]:
        """The (prompt, answer) text of one pass: `prompts.conversation` with the model's settings."""
        return conversation(
            question,
            answer,
            self.cfg.system_prompt,
            self.num_image_tokens,
            self.cfg.image_position == "before",
            self.cfg.prompt_format,
        )

    def shared_prefix(self) -> list[int] | None:
        """The ids every prompt of this model opens with, whatever its question and answer: BOS, the system
        prompt, `USER:` and the image tokens (GLaMM's opening words included), up to the last `<image>`.
        Under causal attention their keys and values do not depend on the expression, so the expressions
        of one image can share them (`MLLM.prefix`). None when the question precedes the image
        (`image_position: after`): no expression-free prefix holds the image."""
        if not (self.cfg.image_position == "before" or self.cfg.prompt_format == "glamm"):
            return None
        row, _ = self._ids(*self.render("x", SEMANTIC_ANSWER))
        image_id = self.control[IMAGE_TOKEN]
        last = max(i for i, t in enumerate(row) if t == image_id)
        return row[: last + 1]

    def encode(self, questions: Sequence[str], answer: str) -> TokenizedPrompts:
        """Each question with the fixed `answer`, rendered and tokenized (checked: `tokenize`)."""
        rendered = [self.render(q, answer) for q in questions]
        return self.tokenize([p for p, _ in rendered], [a for _, a in rendered])

    def _overflow(self, n: int) -> str:
        return (
            f"its prompt is {n} tokens and the language model's context holds {self.max_positions} "
            f"(model.language.max_position_embeddings): {n - self.max_positions} tokens too many"
        )

    def _ids(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(full row: BOS + prompt + answer + EOS, labels: IGNORE_INDEX except on answer and EOS)."""
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        if not self.forbidden_ids.isdisjoint(p):
            bad = sorted(set(tok.convert_ids_to_tokens([t for t in p if t in self.forbidden_ids])))
            raise InputError(f"the prompt holds the tokenizer's control token(s) {bad} outside its template")
        return bos + p + a, [IGNORE_INDEX] * (len(bos) + len(p)) + a

    def tokenize(self, prompts: Sequence[str], answers: Sequence[str]) -> TokenizedPrompts:
        """Tokenize prompt+answer pairs (right padded); labels cover the answer and the EOS token.

        Raises InputError naming the row when a prompt holds a control token outside its template
        (user text never becomes a control id) or a row exceeds the context (`max_positions`).
        """
        rows, labels = [], []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            try:
                row, lab = self._ids(prompt, answer)
            except InputError as exc:
                raise InputError(f"prompt {i}: {exc}") from None
            if len(row) > self.max_positions:
                raise InputError(f"prompt {i}: {self._overflow(len(row))}")
            rows.append(row)
            labels.append(lab)
        tok = self.tokenizer
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(lb)] = torch.tensor(lb)
            mask[i, : len(r)] = 1
        return TokenizedPrompts(ids, mask, lab)


@dataclass
class Prefix:
    """The language model's state after the shared prompt prefix (`PromptTokenizer.shared_prefix`) of N
    images under one LoRA branch: what every expression of those images continues from (`MLLM.prefix`).

    keys / values: per decoder layer, (N, kv_heads, P, head_dim) in the model's dtype; image_states:
    (N, T, hidden) last-layer states at the `<image>` positions; index: (B,) the image row each
    expression of a batch reads (`rows`), or None. One image's prefix holds 2 × layers × P × hidden
    values (LLaVA-1.5-7B, bf16, P ≈ 600: ~0.3 GB per branch).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    image_states: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """P, the prefix's length in tokens."""
        return self.keys[0].shape[-2]

    @property
    def num_images(self) -> int:
        return self.image_states.shape[0]

    def rows(self, index: torch.Tensor) -> Prefix:
        """This prefix read by a batch whose expression b belongs to image `index[b]` (B,)."""
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < self.num_images:
            raise ValueError(f"image index {index.tolist()} outside the prefix's {self.num_images} images")
        return replace(self, index=index.to(self.image_states.device))

    def select(self, images: Sequence[int]) -> Prefix:
        """The prefixes of images `images` (their rows, in that order), without an index."""
        i = torch.as_tensor(list(images), dtype=torch.long, device=self.image_states.device)
        return Prefix(tuple(k[i] for k in self.keys), tuple(v[i] for v in self.values), self.image_states[i])

    @staticmethod
    def cat(prefixes: Sequence[Prefix]) -> Prefix:
        """Prefixes of several images (each without an index) as one, images in order."""
        if len(prefixes) == 1:
            return replace(prefixes[0], index=None)
        layers = range(len(prefixes[0].keys))
        return Prefix(
            tuple(torch.cat([p.keys[n] for p in prefixes]) for n in layers),
            tuple(torch.cat([p.values[n] for p in prefixes]) for n in layers),
            torch.cat([p.image_states for p in prefixes]),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys, values and image states."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.image_states))


class PrefixCache:
    """Prefixes kept across calls (the Serve MLLM replica's), LRU by image: `capacity` images, each with
    a `Prefix` per LoRA branch, keyed by the image's content hash (`inputs.image_key`). An entry of
    LLaVA-1.5-7B in bf16 holds both branches' ~600-token prefixes: ~0.6 GB (`Prefix`).

    `lookup` and `put` are what `PPCRModel.reason` calls; `hits` / `misses` count lookups of one image
    under one branch."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"prefix cache capacity must be >= 1 image; got {capacity}")
        self.capacity = capacity
        self.entries: OrderedDict[Hashable, dict[str, Prefix]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def holds(self, key: Hashable, adapters: Sequence[str]) -> bool:
        """Whether image `key` has a prefix for every branch of `adapters` (counts nothing)."""
        return key in self.entries and all(a in self.entries[key] for a in adapters)

    def lookup(self, keys: Sequence[Hashable], adapter: str) -> list[Prefix | None]:
        """Branch `adapter`'s prefix of each image (one image each), or None where absent."""
        out = []
        for key in keys:
            got = self.entries.get(key, {}).get(adapter)
            if got is None:
                self.misses += 1
            else:
                self.hits += 1
                self.entries.move_to_end(key)
            out.append(got)
        return out

    def put(self, key: Hashable, adapter: str, prefix: Prefix) -> None:
        """Keep `prefix` (one image's, branch `adapter`); the least recently used images go past capacity."""
        if prefix.num_images != 1:
            raise ValueError(f"a cache entry is one image's prefix; got {prefix.num_images} images")
        self.entries.setdefault(key, {})[adapter] = prefix
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def stats(self) -> dict:
        """{"entries", "capacity", "hits", "misses", "bytes"} (bytes: the tensors held)."""
        held = sum(p.nbytes for entry in self.entries.values() for p in entry.values())
        return {
            "entries": len(self.entries),
            "capacity": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
            "bytes": held,
        }


class _PrefixLayer(DynamicLayer):
    """One decoder layer's cache for a batch that continues shared prefixes: row b attends to the keys and
    values of prefix `index[b]`, then to its own. `update` returns their concatenation and stores
    nothing (each forward starts from the same prefix); masks and positions see a cache of P tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.index = keys, values, index
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return (
            torch.cat([self.keys[self.index], key_states], dim=-2),
            torch.cat([self.values[self.index], value_states], dim=-2),
        )


@dataclass
class StageStates:
    """What a stage reads from one language-model pass."""

    token: torch.Tensor  # (B, hidden) last-layer state at the stage's answer token ([SEG] / [BOX])
    image: torch.Tensor  # (B, T, hidden) last-layer states at the <image> positions
    ce: torch.Tensor  # scalar CE over the answer tokens


class MLLM(nn.Module):
    """LLaVA + two LoRA adapters; the stages call `image_features` once and `language` per adapter."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg)
        llava = build_llava(cfg, self.tokenizer)
        lora = PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            # Only the language model's projections (LISA/GLaMM): the vision tower's q/v stay untouched.
            target_modules=rf".*language_model.*\.({'|'.join(cfg.lora.target_modules)})",
        )
        peft_model = get_peft_model(llava, lora, adapter_name=ADAPTERS[0])
        peft_model.add_adapter(ADAPTERS[1], lora)
        self.peft: PeftModel = peft_model
        self.ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in special_tokens(cfg)}
        self.num_image_tokens = self._count_image_tokens()
        self.prompts = PromptTokenizer(
            self.tokenizer, cfg, self.num_image_tokens, self.llava.config.text_config.max_position_embeddings
        )
        prefix = self.prompts.shared_prefix()
        self.prefix_ids = None if prefix is None else torch.tensor(prefix, dtype=torch.long)
        # transformers 5.x renames the language model's `past_key_values` argument `cache` (the old
        # name is deprecated): pass whichever this version's forward takes.
        params = inspect.signature(self.llava.model.language_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._set_trainable()
        if cfg.gradient_checkpointing:
            self.llava.gradient_checkpointing_enable()

    def _count_image_tokens(self) -> int:
        vc = self.llava.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.llava.config.vision_feature_select_strategy == "default" else n + 1

    def _set_trainable(self) -> None:
        for p in self.llava.parameters():
            p.requires_grad_(self.cfg.train_base)
        # New token rows live in these matrices; the paper's recipe trains them whole (LISA/GLaMM too).
        self.llava.get_input_embeddings().weight.requires_grad_(True)
        self.llava.get_output_embeddings().weight.requires_grad_(True)
        self.peft.set_requires_grad(list(ADAPTERS), requires_grad=True)

    @property
    def llava(self) -> LlavaForConditionalGeneration:
        """The LLaVA model inside the peft wrapper (a property, so its weights have one name only)."""
        return self.peft.base_model.model

    @property
    def hidden_size(self) -> int:
        return self.llava.config.text_config.hidden_size

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Route the language model through LoRA branch `name`.

        peft's `set_adapter` freezes every other adapter; both branches must learn in the same PPCR
        step (and an evaluation pass must not leave one frozen), so both are made trainable again
        right after the switch (see tests/test_mllm.py).
        """
        if name not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}; got {name!r}")
        self.peft.set_adapter(name)
        self.peft.set_requires_grad(list(ADAPTERS), requires_grad=True)
        yield

    def image_features(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) CLIP-normalised pixels -> (N, num_image_tokens, hidden) projected features."""
        out = self.llava.model.get_image_features(
            pixel_values=clip_pixels.to(self.llava.dtype),
            vision_feature_layer=self.llava.config.vision_feature_layer,
            vision_feature_select_strategy=self.llava.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return torch.stack(list(out.pooler_output), dim=0)

    def tokenize(self, prompts: Sequence[str], answers: Sequence[str]) -> TokenizedPrompts:
        """`PromptTokenizer.tokenize` with this model's tokenizer and context (checked)."""
        return self.prompts.tokenize(prompts, answers)

    def positions(self, input_ids: torch.Tensor, token: str) -> torch.Tensor:
        """(B,) index of the single occurrence of `token` in each row; error if absent or repeated."""
        hits = input_ids == self.ids[token]
        counts = hits.sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(f"expected exactly one {token} per sequence; counts {counts.tolist()}")
        return hits.float().argmax(dim=1)

    def _embed(
        self, ids: torch.Tensor, image_features: torch.Tensor | None, inserted: torch.Tensor | None
    ) -> torch.Tensor:
        """Input embeddings of `ids` (B, L): image features (B, T, hidden) scattered onto its `<image>`
        positions (None: it must hold none), `inserted` (B, hidden) written at its `<sem>` position."""
        embeds = self.llava.get_input_embeddings()(ids)
        image_mask = (ids == self.ids[IMAGE_TOKEN]).unsqueeze(-1)
        n = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if int(image_mask.sum()) != n:
            shape = None if image_features is None else tuple(image_features.shape[:2])
            raise ValueError(f"{int(image_mask.sum())} <image> tokens for {shape} image features")
        if image_features is not None:
            embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
        if inserted is not None:
            pos = self.positions(ids, SEM_TOKEN)
            sem_mask = torch.zeros_like(ids, dtype=torch.bool)
            sem_mask[torch.arange(ids.shape[0]), pos] = True
            embeds = torch.where(sem_mask.unsqueeze(-1), inserted.to(embeds.dtype).unsqueeze(1), embeds)
        return embeds

    def _answer_ce(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced CE of `labels` (B, L) given the last-layer states (B, L, hidden): only the
        answer positions get logits (the vocab projection dominates otherwise)."""
        targets = labels.to(hidden.device)[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.llava.lm_head(hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits.float(), targets[keep])

    def language(
        self,
        batch: TokenizedPrompts,
        image_features: torch.Tensor | None,
        inserted: torch.Tensor | None = None,
        prefix: Prefix | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the language model under the active adapter.

        image_features: (B, num_image_tokens, hidden), one row per sequence, scattered onto the
        `<image>` positions; inserted: optional (B, hidden) written at the `<sem>` position.
        Returns (last-layer hidden states (B, L, hidden), CE loss over the answer tokens).

        prefix: the batch's shared prefixes (`prefix`, with `Prefix.rows` set; image_features None):
        only the tokens after them run, against their keys and values (transformers' `Cache`), at
        positions P..L-1 with the same padding mask; the states returned are then the suffix's
        (B, L - P, hidden). ValueError when a row does not open with `shared_prefix`.
        """
        ids = batch.input_ids.to(self.llava.device)
        if prefix is None:
            embeds = self._embed(ids, image_features, inserted)
            # use_cache=False: one teacher-forced pass reads no past keys and values, so a KV cache (32
            # layers x 2 x T x hidden per sequence at 7B, ~0.34 GB for 650 tokens) would only be built
            # and dropped. (A shared prefix builds one on purpose: `prefix`.)
            out = self.llava.model.language_model(
                inputs_embeds=embeds, attention_mask=batch.attention_mask.to(ids.device), use_cache=False
            )
            return out.last_hidden_state, self._answer_ce(out.last_hidden_state, batch.labels)
        if image_features is not None or prefix.index is None or len(prefix.index) != len(ids):
            raise ValueError("a prefixed pass takes no image features and a prefix indexed by row")
        p = prefix.length
        if self.prefix_ids is None or len(self.prefix_ids) != p:
            raise ValueError(f"a prefix of {p} tokens does not fit this model's prompts")
        if not bool((ids[:, :p] == self.prefix_ids.to(ids.device)).all()):
            raise ValueError("prompts do not open with the shared prefix (PromptTokenizer.shared_prefix)")
        labels = batch.labels[:, p:]
        # The first suffix token is predicted from the prefix's last state, which a suffix pass lacks:
        # it must be a prompt token (the answer always follows the question).
        if bool((labels[:, 0] != IGNORE_INDEX).any()):
            raise ValueError("an answer token right after the shared prefix")
        suffix = ids[:, p:]
        b, s = suffix.shape
        embeds = self._embed(suffix, None, inserted)
        cache = Cache(layers=[_PrefixLayer(k, v, prefix.index) for k, v in zip(prefix.keys, prefix.values)])
        mask = batch.attention_mask.to(ids.device)  # (B, P + S): the prefix is never padding
        positions = torch.arange(p, p + s, device=ids.device).unsqueeze(0).expand(b, s)
        out = self.llava.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return out.last_hidden_state, self._answer_ce(out.last_hidden_state, labels)

    @property
    def can_share_prefix(self) -> bool:
        """Whether this model's prompts open with an expression-free prefix that holds the image."""
        return self.prefix_ids is not None

    def prefix(self, adapter: str, image_features: torch.Tensor) -> Prefix:
        """Run the shared prefix (`PromptTokenizer.shared_prefix`) of N images once under LoRA branch
        `adapter`: image_features (N, num_image_tokens, hidden) -> their `Prefix` (keys and values of
        every layer, last-layer image states). ValueError for a model without one (`can_share_prefix`)."""
        if self.prefix_ids is None:
            raise ValueError("this model's prompts put the question before the image: no shared prefix")
        n = image_features.shape[0]
        ids = self.prefix_ids.to(self.llava.device).unsqueeze(0).expand(n, -1)
        with self.adapter(adapter):
            embeds = self._embed(ids, image_features, None)
            out = self.llava.model.language_model(inputs_embeds=embeds, use_cache=True)
        cache = getattr(out, self._cache_arg)
        hidden = out.last_hidden_state
        image_states = hidden[ids == self.ids[IMAGE_TOKEN]].view(n, -1, hidden.shape[-1])
        return Prefix(
            tuple(layer.keys for layer in cache.layers),
            tuple(layer.values for layer in cache.layers),
            image_states,
        )

    def run_stage(
        self,
        adapter: str,
        questions: Sequence[str],
        answer: str,
        token: str,
        image_features: torch.Tensor | None,
        inserted: torch.Tensor | None = None,
        offset: int = 0,
        prefix: Prefix | None = None,
    ) -> StageStates:
        """One teacher-forced pass of a PPCR stage: each question with the fixed `answer`, under LoRA
        branch `adapter`; returns the states at `token` (found by id; `offset` -1: the position before
        it, whose output predicts it, as LISA/GLaMM read [SEG]) and at the image positions.

        image_features: (B, T, hidden) per question; or None with `prefix` (this branch's `Prefix` of
        the questions' images, `Prefix.rows` set): only what follows it runs, and the image states
        are the prefix's (the same values to float tolerance)."""
        batch = self.prompts.encode(questions, answer)
        with self.adapter(adapter):
            hidden, ce = self.language(batch, image_features, inserted=inserted, prefix=prefix)
        ids = batch.input_ids.to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if prefix is not None:
            ids = ids[:, prefix.length :]
            at = self.positions(ids, token) + offset
            if bool((at < 0).any()):
                raise ValueError(f"the state read at {token} (offset {offset}) lies in the shared prefix")
            return StageStates(token=hidden[rows, at], image=prefix.image_states[prefix.index], ce=ce)
        token_states = hidden[rows, self.positions(ids, token) + offset]
        image_states = hidden[ids == self.ids[IMAGE_TOKEN]].view(hidden.shape[0], -1, hidden.shape[-1])
        return StageStates(token=token_states, image=image_states, ce=ce)
