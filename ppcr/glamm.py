"""`ppcr convert-glamm`: a GLaMM checkpoint (RefSeg, optionally GranD) -> a ppcr checkpoint folder.

GLaMM (mbzuai-oryx/groundingLMM) ships sharded pickles (`pytorch_model-0000K-of-0000N.bin` +
`pytorch_model.bin.index.json`) of plain tensors under original-LLaVA / Llama names, with its LoRA
already merged into `q_proj` / `v_proj`, no vision tower, and a tokenizer that adds 7 tokens
(`<im_start>` … `</p>`, `[SEG]` among them) to Vicuna's 32000. Every GLaMM key goes through
`KEY_MAP` below: mapped onto a ppcr state-dict name (with its shape checked) or dropped for a stated
reason; a key no rule covers, a key the map needs but the index lacks, a mis-shaped tensor or an
unreadable shard is a WeightsError naming the file and the keys.

What each group becomes (docs/glamm.md has the measured exactness and the command sequence):
- `q_proj` / `v_proj` (merged LoRA): rank-r factors (SVD) of W(GLaMM) − W(base), base = the
  llava-hf folder's weight, as LoRA branch A (semantic) from RefSeg and branch B (spatial) from GranD;
  the reconstruction error of base + scale·B·A against GLaMM's merged weight is measured per tensor.
- every other language-model tensor and the mm projector: compared with the llava-hf base, tensor
  by tensor, in GLaMM's dtype. Equal -> nothing to store (the base folder provides it); different ->
  GLaMM's value is stored and the name listed in `model.base_overrides` (so it survives training).
- `embed_tokens` / `lm_head`: Vicuna rows 0..31999 copied; GLaMM's `[SEG]` row -> ppcr's `[SEG]`
  row, `<bbox>` -> `[BOX]`, `<im_start>`/`<im_end>` -> the same tokens when prompt_format is glamm;
  rows of tokens GLaMM does not have (`<image>`, `<pad>`, `<sem>`) keep the llava-hf values.
- `text_hidden_fcs` -> the semantic projection; `grounding_encoder` -> the whole SAM (its image and
  prompt encoders are SAM ViT-H's, frozen by GLaMM; its mask decoder fine-tuned), so the checkpoint
  needs no separate SAM file.
- dropped: `region_encoder` (GLaMM's region-input encoder; PPCR takes no region inputs) and
  `rotary_emb.inv_freq` buffers (recomputed from the config). The vision tower comes from llava-hf.
- the box head (`spatial.*` outside the LoRA) has no GLaMM counterpart: it starts fresh (seeded).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig
from .prompts import BOX_TOKEN, IM_END_TOKEN, IM_START_TOKEN, SEG_TOKEN
from .weights import SHOWN, WeightsError, check_keys

INDEX_FILE = "pytorch_model.bin.index.json"
GLAMM_ADDED_TOKENS = ("<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>")
# ppcr token -> the GLaMM token whose embedding / LM-head rows it takes.
TOKEN_ROWS = {SEG_TOKEN: "[SEG]", BOX_TOKEN: "<bbox>", IM_START_TOKEN: "<im_start>", IM_END_TOKEN: "<im_end>"}

_ROOT = "mllm.peft.base_model.model."
LLM = _ROOT + "model.language_model."
PROJ = _ROOT + "model.multi_modal_projector."
EMBED = LLM + "embed_tokens.weight"
LM_HEAD = _ROOT + "lm_head.weight"

# (pattern on a GLaMM key, kind, ppcr name template or None, why). First match wins.
# kinds: vocab = rows re-laid into ppcr's tokenizer; lora = merged weight factorised into LoRA;
# base = compared with the llava-hf base (stored only if different); copy = stored as is; drop.
KEY_MAP: tuple[tuple[str, str, str | None, str], ...] = (
    (r"model\.embed_tokens\.weight", "vocab", EMBED, "token rows re-laid"),
    (r"lm_head\.weight", "vocab", LM_HEAD, "token rows re-laid"),
    (
        r"model\.layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.weight",
        "lora",
        LLM + r"layers.\1.self_attn.\2.base_layer.weight",
        "merged LoRA -> rank-r factors",
    ),
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "drop", None, "recomputed from the config"),
    (r"model\.(layers\.\d+\.[a-z_.]+\.weight|norm\.weight)", "base", LLM + r"\1", "kept if equal to base"),
    (r"model\.mm_projector\.0\.(weight|bias)", "base", PROJ + r"linear_1.\1", "kept if equal to base"),
    (r"model\.mm_projector\.2\.(weight|bias)", "base", PROJ + r"linear_2.\1", "kept if equal to base"),
    (
        r"model\.text_hidden_fcs\.0\.([02])\.(weight|bias)",
        "copy",
        r"semantic.projection.\1.\2",
        "[SEG] projection",
    ),
    (r"model\.grounding_encoder\.(.+)", "copy", r"segmentation.sam.\1", "SAM"),
    (r"model\.region_encoder\..+", "drop", None, "GLaMM's region-input encoder; PPCR has no region inputs"),
)


def map_key(key: str) -> tuple[str, str | None] | None:
    """GLaMM key -> (kind, ppcr state-dict name or None for a dropped key); None if no rule covers it."""
    for pattern, kind, template, _ in KEY_MAP:
        m = re.fullmatch(pattern, key)
        if m:
            return kind, (m.expand(template) if template else None)
    return None


def glamm_key(name: str) -> str | None:
    """ppcr state-dict name -> the GLaMM key that provides it (inverse of map_key); None if GLaMM has none."""
    if name == EMBED:
        return "model.embed_tokens.weight"
    if name == LM_HEAD:
        return "lm_head.weight"
    if name.startswith(LLM) and ".lora_" not in name:
        return "model." + name[len(LLM) :].replace(".base_layer.", ".")
    if name.startswith(PROJ):
        rest = name[len(PROJ) :]
        return "model.mm_projector." + rest.replace("linear_1.", "0.").replace("linear_2.", "2.")
    if name.startswith("semantic.projection."):
        return "model.text_hidden_fcs.0." + name[len("semantic.projection.") :]
    if name.startswith("segmentation.sam."):
        return "model.grounding_encoder." + name[len("segmentation.sam.") :]
    return None


class GlammShards:
    """A GLaMM folder's sharded `.bin` weights, read shard by shard (torch.load, weights_only=True)."""

    def __init__(self, folder: str | Path, what: str):
        self.folder = Path(folder)
        self.what = what
        self.index = self.folder / INDEX_FILE
        if not self.index.is_file():
            raise FileNotFoundError(f"{what}: no {INDEX_FILE} in {self.folder}")
        try:
            self.weight_map: dict[str, str] = json.loads(self.index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{self.index}: not a sharded-checkpoint index ({exc})") from None

    def shards(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            out.setdefault(shard, []).append(key)
        return dict(sorted(out.items()))

    def read(self, shard: str, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors the index places in `shard`; WeightsError naming the file if it cannot be
        unpickled as plain tensors or lacks a listed key."""
        path = self.folder / shard
        if not path.is_file():
            raise WeightsError(f"{path}: shard listed in {self.index.name} is missing (holds {keys[0]}, ...)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad download
            raise WeightsError(
                f"{path}: cannot be read as a tensor file ({type(exc).__name__}: {exc}); "
                f"re-download it (it should hold {len(keys)} tensors, e.g. {keys[0]})"
            ) from None
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: not a state dict ({type(state).__name__})")
        check_keys(
            path,
            f"the shard {self.index.name} describes",
            missing=set(keys) - set(state),
            unexpected=set(state) - set(keys),
        )
        return state


def read_added_tokens(folder: str | Path) -> dict[str, int]:
    """GLaMM's added tokens and ids from its tokenizer files (added_tokens.json, else
    tokenizer_config.json's added_tokens_decoder, else tokenizer.json's added_tokens). Reading the
    files needs no SentencePiece; WeightsError if [SEG] is not among them."""
    folder = Path(folder)
    found: dict[str, int] = {}
    if (folder / "added_tokens.json").is_file():
        found = {k: int(v) for k, v in json.loads((folder / "added_tokens.json").read_text()).items()}
        source = folder / "added_tokens.json"
    elif (folder / "tokenizer_config.json").is_file() and "added_tokens_decoder" in (
        cfg := json.loads((folder / "tokenizer_config.json").read_text())
    ):
        found = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
        source = folder / "tokenizer_config.json"
    elif (folder / "tokenizer.json").is_file():
        found = {
            t["content"]: int(t["id"])
            for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        }
        source = folder / "tokenizer.json"
    else:
        raise WeightsError(
            f"{folder}: no tokenizer files (added_tokens.json / tokenizer_config.json / tokenizer.json)"
        )
    glamm = {t: found[t] for t in GLAMM_ADDED_TOKENS if t in found}
    if "[SEG]" not in glamm:
        raise WeightsError(
            f"{source}: no [SEG] token among the added tokens {sorted(found)}: not a GLaMM tokenizer"
        )
    return glamm


def check_base_vocabulary(glamm: Path, llava: Path, tokenizer, base_rows: int) -> str:
    """Vicuna rows are copied by id: the two base vocabularies must be the same. Returns how it was
    checked; WeightsError if they differ or cannot be compared."""
    if tokenizer.vocab_size != base_rows:
        raise WeightsError(
            f"{glamm}: GLaMM's added tokens start at id {base_rows} but the base tokenizer of {llava} has "
            f"{tokenizer.vocab_size} ids: the vocabularies differ"
        )
    a, b = glamm / "tokenizer.model", llava / "tokenizer.model"
    if a.is_file() and b.is_file():
        same = hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
        if not same:
            raise WeightsError(f"{a} and {b} differ: GLaMM's base vocabulary is not llava-hf's")
        return "tokenizer.model files identical (sha256)"
    if (glamm / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        theirs = PreTrainedTokenizerFast(tokenizer_file=str(glamm / "tokenizer.json")).get_vocab()
        ours = tokenizer.get_vocab()
        diff = [t for t, i in theirs.items() if i < base_rows and ours.get(t) != i]
        if diff:
            raise WeightsError(
                f"{glamm / 'tokenizer.json'}: {len(diff)} base tokens have other ids than in {llava}, e.g. {diff[:SHOWN]}"
            )
        return "tokenizer.json base vocabularies equal, id by id"
    raise WeightsError(
        f"{glamm}: cannot compare its base vocabulary with {llava} (no tokenizer.model in both, no tokenizer.json)"
    )


def lora_factors(delta: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float32 delta -> (A (r, in), B (out, r)) with scale·B·A the best rank-r approximation
    (Eckart–Young), the singular values split evenly between the factors. Exact SVD up to 1024 wide;
    above, a randomized SVD (q = r + 16, 6 power iterations) — the caller measures the error either way."""
    if min(delta.shape) <= 1024:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(delta, q=min(r + 16, min(delta.shape)), niter=6)
        vh = v.T
    u, s, vh = u[:, :r], s[:r], vh[:r]
    root = (s / scale).sqrt()
    return root[:, None] * vh, u * root[None, :]


@dataclass
class ConversionReport:
    """What the converter did (written to the checkpoint's meta.json and printed by the CLI)."""

    mapped: dict[str, int] = field(default_factory=dict)  # kind -> count of GLaMM keys
    dropped: dict[str, int] = field(default_factory=dict)  # GLaMM key family -> count
    base_equal: int = 0
    base_overrides: dict[str, float] = field(default_factory=dict)  # ppcr name -> max |GLaMM - base|
    token_rows: dict[str, str] = field(default_factory=dict)  # ppcr token (id) <- GLaMM token (id)
    vocabulary_check: str = ""
    lora: dict[str, dict[str, float]] = field(default_factory=dict)  # branch -> max/mean relative error
    lora_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # branch -> tensor -> error
    fresh: list[str] = field(default_factory=list)


def _family(key: str) -> str:
    return (
        re.sub(r"\.\d+\.", ".N.", key).rsplit(".", 1)[0]
        if "region_encoder" not in key
        else "model.region_encoder"
    )


def _lora_branch(
    merged: dict[str, torch.Tensor], params: dict[str, torch.Tensor], cfg: ModelConfig, adapter: str
) -> dict[str, float]:
    """Write LoRA `adapter` from merged q/v weights; returns relative errors per base-layer name:
    ||W_glamm − (W_base + scale·B·A)||_F / ||W_glamm − W_base||_F (0 where GLaMM left W unchanged)."""
    r, scale = cfg.lora.r, cfg.lora.alpha / cfg.lora.r
    errors = {}
    for name, w in merged.items():
        base = params[name].to(w.dtype).float()  # the base as GLaMM's dtype rounds it
        target = w.float()
        delta = target - base
        a, b = lora_factors(delta, r, scale)
        prefix = name[: -len("base_layer.weight")]
        params[f"{prefix}lora_A.{adapter}.weight"].copy_(a)
        params[f"{prefix}lora_B.{adapter}.weight"].copy_(b)
        got = (
            base
            + scale
            * params[f"{prefix}lora_B.{adapter}.weight"].float()
            @ params[f"{prefix}lora_A.{adapter}.weight"].float()
        )
        norm = float(delta.norm())
        errors[name] = float((target - got).norm()) / norm if norm > 0 else 0.0
    return errors


def _required_keys(params: dict[str, torch.Tensor]) -> set[str]:
    return {k for n in params if (k := glamm_key(n)) is not None}


def _check_index(shards: GlammShards, required: set[str]) -> None:
    keys = set(shards.weight_map)
    check_keys(
        shards.index,
        shards.what,
        missing=required - keys,
        unexpected=[k for k in keys if map_key(k) is None],
        hint="every GLaMM key must be mapped or deliberately dropped (ppcr/glamm.py KEY_MAP)",
    )


def _iter_tensors(
    shards: GlammShards, params: dict[str, torch.Tensor], hidden: int
) -> Iterator[tuple[str, str, str | None, torch.Tensor]]:
    """(GLaMM key, kind, ppcr name, tensor), shard by shard, after each shard's shapes are checked."""
    for shard, keys in shards.shards().items():
        state = shards.read(shard, keys)
        wrong = []
        for key in keys:
            kind, name = map_key(key)
            t = state[key]
            if kind == "vocab":
                if t.dim() != 2 or t.shape[1] != hidden:
                    wrong.append((key, tuple(t.shape), ("rows", hidden)))
            elif kind != "drop" and tuple(t.shape) != tuple(params[name].shape):
                wrong.append((key, tuple(t.shape), tuple(params[name].shape)))
        check_keys(shards.folder / shard, shards.what, mismatched=wrong)
        for key in keys:
            kind, name = map_key(key)
            yield key, kind, name, state[key]
        del state


def convert_glamm(
    glamm: str | Path,
    llava: str | Path,
    out: str | Path,
    cfg: ModelConfig,
    grand: str | Path | None = None,
    seed: int = 0,
) -> ConversionReport:
    """Convert GLaMM RefSeg (`glamm`) [+ GranD (`grand`) for LoRA branch B] onto the llava-hf base
    `llava` into a ppcr checkpoint folder `out` of model config `cfg` (its mllm_path / sam.checkpoint
    are set here: base = `llava`, SAM = GLaMM's). Raises WeightsError naming the file and keys."""
    from .checkpoint import save_checkpoint
    from .mllm import special_tokens
    from .model import PPCRModel

    glamm, llava = Path(glamm), Path(llava)
    cfg.mllm_path, cfg.tokenizer_path = str(llava), None
    cfg.sam.checkpoint = None  # SAM comes whole from GLaMM's grounding_encoder
    cfg.base_overrides = []
    refseg = GlammShards(glamm, "a GLaMM checkpoint (--glamm)")
    grand_shards = GlammShards(grand, "a GLaMM checkpoint (--grand)") if grand else None
    added = read_added_tokens(glamm)
    torch.manual_seed(seed)  # the box head has no GLaMM counterpart: a seeded fresh start
    model = PPCRModel(cfg)
    params = model.state_dict()
    required = _required_keys(params)
    _check_index(refseg, required)
    if grand_shards is not None:
        _check_index(grand_shards, required)
    tok = model.mllm.tokenizer
    report = ConversionReport()
    base_rows = min(added.values())
    report.vocabulary_check = check_base_vocabulary(glamm, llava, tok, base_rows)
    rows = {}
    for ours, theirs in TOKEN_ROWS.items():
        if ours in special_tokens(cfg) and theirs in added:
            rows[tok.convert_tokens_to_ids(ours)] = added[theirs]
            report.token_rows[f"{ours} ({tok.convert_tokens_to_ids(ours)})"] = f"{theirs} ({added[theirs]})"
    hidden = cfg.language.hidden_size
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, kind, name, t in _iter_tensors(refseg, params, hidden):
            report.mapped[kind] = report.mapped.get(kind, 0) + 1
            if kind == "drop":
                report.dropped[_family(key)] = report.dropped.get(_family(key), 0) + 1
            elif kind == "vocab":
                if t.shape[0] <= max(added.values()):
                    raise WeightsError(
                        f"{glamm}: {key} has {t.shape[0]} rows; its tokenizer adds id {max(added.values())}"
                    )
                dest = params[name]
                dest[:base_rows].copy_(t[:base_rows])
                for ours, theirs in rows.items():
                    dest[ours].copy_(t[theirs])
            elif kind == "lora":
                merged[name] = t.clone()
            elif kind == "copy":
                params[name].copy_(t)
            else:  # base: GLaMM froze these; store only what actually differs
                base = params[name].to(t.dtype)
                if torch.equal(base, t):
                    report.base_equal += 1
                else:
                    report.base_overrides[name] = float((base.float() - t.float()).abs().max())
                    params[name].copy_(t)
        errors = {"semantic": _lora_branch(merged, params, cfg, "semantic")}
        if grand_shards is not None:
            merged_b = {}
            for _, kind, name, t in _iter_tensors(grand_shards, params, hidden):
                if kind == "lora":
                    merged_b[name] = t.clone()
            errors["spatial"] = _lora_branch(merged_b, params, cfg, "spatial")
        else:
            report.fresh.append("LoRA branch B (spatial): no --grand; peft's init (B = 0: the base weights)")
    report.fresh.append("spatial.* box head (and <sem> input adapter): GLaMM has none; seeded init")
    for branch, errs in errors.items():
        values = list(errs.values())
        report.lora[branch] = {"max": max(values), "mean": sum(values) / len(values), "tensors": len(values)}
        report.lora_errors[branch] = {glamm_key(k): v for k, v in errs.items()}
    cfg.base_overrides = sorted(report.base_overrides)
    save_checkpoint(
        model,
        out,
        extra={
            "converted_from": {
                "glamm": str(glamm),
                "grand": str(grand) if grand else None,
                "llava": str(llava),
            },
            "seed": seed,
            **{k: v for k, v in report.__dict__.items()},
        },
    )
    return report
