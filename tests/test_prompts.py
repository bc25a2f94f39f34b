"""Prompt templates (paper Figs. 4–5), expression cleaning and the LLaVA-1.5 conversation format."""

from __future__ import annotations

import random
import re
import string
import unicodedata

import pytest

from ppcr.prompts import (
    _NOT_TEXT,
    BOX_TOKEN,
    IMAGE_TOKEN,
    SEG_TOKEN,
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

EXPR = "the red circle on the left"


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def test_template_counts():
    assert len(SEMANTIC_TEMPLATES) == 16
    assert len(SPATIAL_TEMPLATES) == 4


@pytest.mark.parametrize("template", SEMANTIC_TEMPLATES)
def test_semantic_template_has_one_expr_placeholder(template):
    assert _fields(template) == ["expr"]


@pytest.mark.parametrize("template", SPATIAL_TEMPLATES)
def test_spatial_template_has_one_sem_placeholder(template):
    assert _fields(template) == ["sem"]


def test_ablation_templates_placeholders():
    assert _fields(SPATIAL_TEMPLATE_EXPRESSION) == ["expr"]
    assert sorted(_fields(SPATIAL_TEMPLATE_EXPRESSION_SEMANTIC)) == ["expr", "sem"]


def test_answers_contain_their_token_once():
    assert SEMANTIC_ANSWER.count(SEG_TOKEN) == 1 and BOX_TOKEN not in SEMANTIC_ANSWER
    assert SPATIAL_ANSWER.count(BOX_TOKEN) == 1 and SEG_TOKEN not in SPATIAL_ANSWER
    assert set(SPECIAL_TOKENS) == {IMAGE_TOKEN, SEG_TOKEN, BOX_TOKEN, SEM_TOKEN}


def test_clean_expression_collapses_whitespace():
    assert clean_expression("  the   red\tcircle \n on\u00a0left ") == "the red circle on left"
    assert clean_expression("dog") == "dog"


@pytest.mark.parametrize("bad", ["", "   ", "\t\n "])
def test_clean_expression_rejects_empty(bad):
    with pytest.raises(ValueError, match="empty"):
        clean_expression(bad)


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_clean_expression_rejects_reserved_tokens(token):
    with pytest.raises(ValueError, match="reserved token"):
        clean_expression(f"the dog {token} on the left")


def test_clean_expression_max_chars_counts_collapsed_text():
    assert clean_expression("a  " * 5 + "b", max_chars=11) == "a a a a a b"
    with pytest.raises(ValueError, match="12 characters long; at most 11"):
        clean_expression("the red dog!", max_chars=11)


@pytest.mark.parametrize("token", ["<im_start>", "<im_end>"])
def test_clean_expression_rejects_glamm_image_wrappers(token):
    with pytest.raises(ValueError, match="reserved token"):
        clean_expression(f"the {token} cat")


@pytest.mark.parametrize(
    "text,problem",
    [
        ("the cup \udc00", "lone surrogate U+DC00 at character 8"),  # a JSON "\udc00" escape
        ("\ud83d the dog", "lone surrogate U+D83D at character 0"),  # half an emoji
        ("the\x00dog", "control character U+0000 at character 3"),
        ("the  dog\x1b[31m", "control character U+001B at character 8"),  # a terminal colour code
        ("dog\x7f", "control character U+007F at character 3"),
        ("\x9bdog", "control character U+009B at character 0"),  # a C1 control
    ],
)
def test_clean_expression_refuses_text_that_is_not_text(text, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        clean_expression(text)


def test_clean_expression_keeps_whitespace_and_format_characters_as_documented():
    # Whitespace controls (str.isspace) collapse to one space, as every other whitespace does.
    assert clean_expression("the\tred\r\ncup\x0b\x0c\x1c\x85\u2028on the left") == "the red cup on the left"
    # Format characters are text: a zero-width joiner in an emoji, a right-to-left mark, Persian ZWNJ.
    for text in (
        "the \U0001f468\u200d\U0001f469 family",
        "\u05d4\u05db\u05dc\u05d1 \u200f",
        "\u0645\u06cc\u200c\u0631\u0648\u062f",
    ):
        assert clean_expression(text) == text
    assert clean_expression("the cup").encode("utf-8")


def test_not_text_class_is_exactly_non_whitespace_controls_and_surrogates():
    """The regex clean_expression searches with equals its definition, over every code point."""
    for cp in range(0x110000):
        ch = chr(cp)
        want = unicodedata.category(ch) in ("Cc", "Cs") and not ch.isspace()
        assert (_NOT_TEXT.match(ch) is not None) == want, hex(cp)


def test_clean_expression_rejects_non_string():
    with pytest.raises(TypeError):
        clean_expression(None)  # type: ignore[arg-type]


def _filled(template: str, expr: str) -> str:
    """What a template reads with `expr` (which opens with an article) in place: one "the", not two."""
    return template.replace("the {expr}", "{expr}").format(expr=expr)


def test_semantic_question_fixed_without_rng():
    q = semantic_question(EXPR)
    assert q == "Can you segment the red circle on the left in this image?"
    assert q == _filled(SEMANTIC_TEMPLATES[0], EXPR)
    assert all(semantic_question(EXPR) == q for _ in range(5))
    # The expression is cleaned before it is inserted.
    assert semantic_question("  the   dog ") == _filled(SEMANTIC_TEMPLATES[0], "the dog")


@pytest.mark.parametrize(
    "expr, want",
    [
        ("the big blue square", "Can you segment the big blue square in this image?"),
        ("The cup", "Can you segment The cup in this image?"),
        ("a man on the left", "Can you segment a man on the left in this image?"),
        ("an apple", "Can you segment an apple in this image?"),
        ("big blue square", "Can you segment the big blue square in this image?"),
        ("theater seat", "Can you segment the theater seat in this image?"),
    ],
)
def test_prompts_never_double_the_article(expr, want):
    assert semantic_question(expr) == want
    rng = random.Random(0)
    for q in [semantic_question(expr, rng) for _ in range(100)] + [
        spatial_question(expr, "expression"),
        spatial_question(expr, "expression+semantic"),
    ]:
        assert not re.search(r"\bthe (the|a|an) ", q, re.IGNORECASE), q


def test_semantic_question_random_covers_templates():
    rng = random.Random(0)
    seen = {semantic_question(EXPR, rng) for _ in range(600)}
    expected = {_filled(t, EXPR) for t in SEMANTIC_TEMPLATES}
    assert seen == expected  # every distinct template is drawn (the list has printed duplicates)
    assert len(expected) >= 8


def test_semantic_question_seeded_is_reproducible():
    a = [semantic_question(EXPR, random.Random(5)) for _ in range(3)]
    r1, r2 = random.Random(7), random.Random(7)
    assert [semantic_question(EXPR, r1) for _ in range(20)] == [
        semantic_question(EXPR, r2) for _ in range(20)
    ]
    assert len(set(a)) == 1


def test_spatial_semantic_mode():
    q = spatial_question(EXPR, "semantic")
    assert q == SPATIAL_TEMPLATES[0].format(sem=SEM_TOKEN)
    assert q.count(SEM_TOKEN) == 1
    assert "red circle" not in q


def test_spatial_semantic_mode_random_covers_all_four():
    rng = random.Random(1)
    seen = {spatial_question(EXPR, "semantic", rng) for _ in range(200)}
    assert seen == {t.format(sem=SEM_TOKEN) for t in SPATIAL_TEMPLATES}
    assert all(q.count(SEM_TOKEN) == 1 and EXPR not in q for q in seen)


def test_spatial_expression_mode():
    q = spatial_question(EXPR, "expression")
    assert EXPR in q
    assert SEM_TOKEN not in q


def test_spatial_expression_semantic_mode():
    q = spatial_question(EXPR, "expression+semantic")
    assert EXPR in q
    assert q.count(SEM_TOKEN) == 1


def test_spatial_none_and_unknown_raise():
    with pytest.raises(ValueError, match="none"):
        spatial_question(EXPR, "none")
    with pytest.raises(ValueError):
        spatial_question(EXPR, "bogus")


def test_spatial_question_validates_expression():
    with pytest.raises(ValueError):
        spatial_question("  ", "expression")
    with pytest.raises(ValueError):
        spatial_question(f"a {SEM_TOKEN}", "expression+semantic")


def test_conversation_image_first():
    prompt, answer = conversation("Q?", "It is [SEG].", "SYS", 3)
    assert prompt == f"SYS USER: {IMAGE_TOKEN * 3}\nQ? ASSISTANT:"
    assert answer == " It is [SEG]."
    assert prompt.count(IMAGE_TOKEN) == 3


def test_conversation_question_first_and_no_system():
    prompt, _ = conversation("Q?", "A", "", 2, image_first=False)
    assert prompt == f"USER: Q?\n{IMAGE_TOKEN * 2} ASSISTANT:"
    assert prompt.index("Q?") < prompt.index(IMAGE_TOKEN)
