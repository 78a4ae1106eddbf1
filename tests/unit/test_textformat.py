from __future__ import annotations

import pytest

from slmflow.textformat import render_example, split_template, template_fields

SEED = "### Text: {phrase}\n### The tone is:\n{tone}"
PHI3 = "<|user|>\n{Question}<|end|>\n<|assistant|>\n{Best Answer}\n<|end|>"


def test_seed_template_renders_prompt_and_answer():
    out = render_example({"phrase": "I lost my keys", "tone": "Sad"}, SEED, "tone")
    assert out["prompt"] == "### Text: I lost my keys\n### The tone is:\n"
    assert out["answer"] == "Sad"
    assert out["text"] == "### Text: I lost my keys\n### The tone is:\nSad"


def test_phi3_chat_template_keeps_suffix_in_answer():
    out = render_example({"Question": "2+2?", "Best Answer": "4"}, PHI3, "Best Answer")
    assert out["prompt"] == "<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    assert out["answer"] == "4\n<|end|>"


def test_template_fields_in_order():
    assert template_fields(SEED) == ["phrase", "tone"]
    assert template_fields(PHI3) == ["Question", "Best Answer"]


@pytest.mark.parametrize("bad, match", [("{} x", "positional"), ("{0}", "positional"), ("{a", "expected")])
def test_bad_templates(bad, match):
    with pytest.raises(ValueError, match=match):
        template_fields(bad)


def test_split_template_needs_label():
    with pytest.raises(ValueError, match=r"no \{tone\}"):
        split_template("{phrase}", "tone")
