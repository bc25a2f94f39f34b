"""Prompt templates (paper Figs. 4 and 5) and the LLaVA-1.5 conversation format.

The semantic stage asks one of 16 templates and is answered, teacher-forced, with "It is [SEG].";
the spatial stage asks one of 4 templates in which `<sem>` is a placeholder whose input embedding
is replaced by the semantic prompt, and is answered with "[BOX].". Special tokens are single ids
(checked in `ppcr.mllm.build_tokenizer`), and positions are always found by id.
"""

from __future__ import annotations

import random
import re
import unicodedata

from .config import InputError

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
BOX_TOKEN = "[BOX]"
SEM_TOKEN = "<sem>"  # placeholder replaced by the Semantic Segmentation Prompt embedding
# The tokens every PPCR tokenizer gets (mllm.build_tokenizer adds them, each a single id).
SPECIAL_TOKENS = (IMAGE_TOKEN, SEG_TOKEN, BOX_TOKEN, SEM_TOKEN)
# GLaMM wraps the image in these (model.prompt_format: glamm); added to the tokenizer only then.
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
GLAMM_TOKENS = (IM_START_TOKEN, IM_END_TOKEN)
# Every token ppcr adds to a tokenizer: user text containing one is refused (clean_expression).
RESERVED_TOKENS = SPECIAL_TOKENS + GLAMM_TOKENS

# Paper Fig. 4 (16 variants, collected from LISA/GLaMM and extended). Duplicates are as printed.
SEMANTIC_TEMPLATES: tuple[str, ...] = (
    "Can you segment the {expr} in this image?",
    "Please segment {expr} in this image.",
    "What is {expr} in this image? Please respond with segmentation mask.",
    "What is {expr} in this image? Please output segmentation mask.",
    "Can you segment the {expr} in this image.",
    "Please segment {expr} in this image.",
    "What is {expr} in this image? Please respond with segmentation mask.",
    "What is {expr} in this image? Please output segmentation mask.",
    "Could you provide a segmentation mask for the {expr} in this image.",
    "Please identify and segment the {expr} in this image.",
    "Where is the {expr} in this picture? Please respond with a segmentation mask.",
    "Can you highlight the {expr} in this image with a segmentation mask?",
    "Could you provide a segmentation mask for the {expr} in this image.",
    "Please identify and segment the {expr} in this image.",
    "Where is the {expr} in this picture? Please respond with a segmentation mask.",
    "Can you highlight the {expr} in this image with a segmentation mask.",
)

# Paper Fig. 5: PPCR's spatial templates, conditioned on the semantic prompt only.
SPATIAL_TEMPLATES: tuple[str, ...] = (
    "Given the token {sem} for the segmented region of the object, provide its bounding box.",
    "Using {sem} to refer to the segmented object, output the bounding box coordinates.",
    "For the object marked by {sem}, return its bounding box.",
    "Identify the object in the image marked as {sem}, please predict a bounding box that encloses it.",
)
# Ablation variants (paper §4.4, Table 2).
SPATIAL_TEMPLATE_EXPRESSION = "Where is the target described by {expr}? Please respond with a bounding box."
SPATIAL_TEMPLATE_EXPRESSION_SEMANTIC = (
    "Take the region marked by {sem} for {expr}, and provide its bounding box."
)

SEMANTIC_ANSWER = f"It is {SEG_TOKEN}."
SPATIAL_ANSWER = f"{BOX_TOKEN}."


# Characters that are not text: the control characters (Unicode category Cc) that `str.isspace` does
# not call whitespace, and the surrogates (Cs), which no UTF-8 text can hold (tests/test_prompts.py
# checks this class against unicodedata over every code point).
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")


def clean_expression(expression: str, max_chars: int | None = None) -> str:
    """The text rules every entry point applies to a referring expression (docs/inputs.md, "Text").

    Returns the expression with its whitespace collapsed: every run of characters that `str.isspace`
    calls whitespace (space, tab, line breaks, U+0085, U+2028/9, the separators U+001C-U+001F, no-break
    spaces) becomes one space, and the ends are stripped. Raises InputError, naming the problem and the
    character's position, for text that is empty after that, longer than `max_chars` characters (when
    given: servers bound what a client may send), not encodable as UTF-8 (a lone UTF-16 surrogate, as a
    JSON `\\udc00` escape gives), holding a control character (Unicode category Cc: U+0000-U+001F and
    U+007F-U+009F other than the whitespace above) or one of ppcr's reserved tokens (`RESERVED_TOKENS`).
    Format characters (zero-width joiners, bidirectional marks) are text and are kept. TypeError for a
    non-string.

    The tokenizer's own control tokens (`</s>`, `<unk>`, ...) and the prompt's length in tokens are
    checked where the prompt is built, by `ppcr.mllm.PromptTokenizer.check_expression`, which calls this.
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a string; got {type(expression).__name__}")
    bad = _NOT_TEXT.search(expression)  # positions are those of the text as sent
    if bad is not None:
        ch, i = bad.group(), bad.start()
        if unicodedata.category(ch) == "Cs":
            raise InputError(
                f"expression is not valid Unicode text: lone surrogate U+{ord(ch):04X} at character {i}"
            )
        raise InputError(
            f"expression holds the control character U+{ord(ch):04X} at character {i}; "
            "only text and whitespace are accepted"
        )
    text = " ".join(expression.split())
    if not text:
        raise InputError("expression is empty")
    if max_chars is not None and len(text) > max_chars:
        raise InputError(f"expression is {len(text)} characters long; at most {max_chars} are accepted")
    for tok in RESERVED_TOKENS:
        if tok in text:
            raise InputError(f"expression must not contain the reserved token {tok!r}")
    return text


# An expression that opens with an article ("the cup", "a man on the left"): a template's own "the"
# before it would double it ("segment the the cup").
_ARTICLE = re.compile(r"(?:the|a|an)\b", re.IGNORECASE)


def fill_expression(template: str, expression: str) -> str:
    """`template` with `{expr}` replaced by the cleaned `expression` (`clean_expression`); the template's
    "the " before `{expr}` is left out when the expression already opens with an article."""
    text = clean_expression(expression)
    if _ARTICLE.match(text):
        template = template.replace("the {expr}", "{expr}")
    return template.replace("{expr}", text)


def semantic_question(expression: str, rng: random.Random | None = None) -> str:
    """Fill a semantic template: random in training (rng given), the first one in evaluation."""
    template = rng.choice(SEMANTIC_TEMPLATES) if rng is not None else SEMANTIC_TEMPLATES[0]
    return fill_expression(template, expression)


def spatial_question(expression: str, mode: str, rng: random.Random | None = None) -> str:
    """The spatial stage's question for `mode` (ModelConfig.spatial_prompt, not 'none')."""
    if mode == "semantic":
        template = rng.choice(SPATIAL_TEMPLATES) if rng is not None else SPATIAL_TEMPLATES[0]
        return template.format(sem=SEM_TOKEN)
    if mode == "expression+semantic":
        return fill_expression(
            SPATIAL_TEMPLATE_EXPRESSION_SEMANTIC.format(sem=SEM_TOKEN, expr="{expr}"), expression
        )
    if mode == "expression":
        return fill_expression(SPATIAL_TEMPLATE_EXPRESSION, expression)
    raise ValueError(f"spatial prompt mode {mode!r} has no spatial question")


def conversation(
    question: str,
    answer: str,
    system_prompt: str,
    num_image_tokens: int,
    image_first: bool = True,
    prompt_format: str = "ppcr",
) -> tuple[str, str]:
    """LLaVA-1.5 (vicuna_v1) format; returns (prompt, answer) so the answer's tokens can be labelled.

    The `<image>` token is repeated `num_image_tokens` times, as transformers' LLaVA processor does.
    `image_first=False` puts the question before the image: in a causal LM the image tokens can then
    attend to the expression / semantic prompt (see docs/learning.md). prompt_format "glamm": the image
    is wrapped and introduced as GLaMM's training prompts do ("The <im_start><image>…<im_end> provides
    an overview of the picture.\n"), image first.
    """
    head = f"{system_prompt} " if system_prompt else ""
    image = IMAGE_TOKEN * num_image_tokens
    if prompt_format == "glamm":
        image = f"The {IM_START_TOKEN}{image}{IM_END_TOKEN} provides an overview of the picture."
        return f"{head}USER: {image}\n{question} ASSISTANT:", f" {answer}"
    if prompt_format != "ppcr":
        raise ValueError(f"prompt_format must be ppcr or glamm; got {prompt_format!r}")
    body = f"{image}\n{question}" if image_first else f"{question}\n{image}"
    return f"{head}USER: {body} ASSISTANT:", f" {answer}"
