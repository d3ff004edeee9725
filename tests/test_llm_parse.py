"""List parsing and concept normalisation on nasty real-world answers (several are real SmolLM2 output)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pas.concepts.normalize import normalize_all, normalize_concept
from pas.llm.parse import list_schema, parse_answer, parse_list


@pytest.mark.parametrize("text, items", [
    ("1. Paella\n2. Risotto\n3. Pad Thai", ["Paella", "Risotto", "Pad Thai"]),
    ("1) Paella\n2) Risotto", ["Paella", "Risotto"]),
    ("(1) Paella\n(2) Risotto", ["Paella", "Risotto"]),
    ("- Paella\n* Risotto\n• Pad Thai\n– Ramen", ["Paella", "Risotto", "Pad Thai", "Ramen"]),
    ("Paella, risotto, and pad thai.", ["Paella", "risotto", "pad thai"]),
    ("Paella; Risotto; Ramen", ["Paella", "Risotto", "Ramen"]),
    ("Some dishes: paella, risotto, ramen", ["paella", "risotto", "ramen"]),
    ("Paella\nRisotto\nRamen", ["Paella", "Risotto", "Ramen"]),
    # preamble and epilogue around a numbered list
    ("Sure! Here are some Spanish dishes:\n\n1. Paella\n2. Gazpacho\n\nI hope this helps!", ["Paella", "Gazpacho"]),
    # explanations after the name
    ("1. Paella - a rice dish from Valencia\n2. Gazpacho: a cold soup\n3. Churros — fried dough",
     ["Paella", "Gazpacho", "Churros"]),
    # markdown emphasis (real SmolLM2 style)
    ("1. **Cultural Food**: Examples: Chinese food\n2. **Traditional Japanese Food**: Ramen",
     ["Cultural Food", "Traditional Japanese Food"]),
    # several numbered items on one line (real SmolLM2 output)
    ("1. Curries - A mix of Indian curries. 2. Chinese Curry - a classic dish. 3. Indian Curry - tender",
     ["Curries", "Chinese Curry", "Indian Curry"]),
    # a long rambling sentence is not a concept (real SmolLM2 output, shortened)
    ("1. Food_Adventure: This is a meal\n2. What to eat when you are very hungry and there is nothing in the "
     "fridge at all", ["Food_Adventure"]),
    ("1. [Dish]  20", ["Dish 20"]),
    # real SmolLM2: "2-" numbering, stray single markdown marks, a list inside one numbered item
    ("2- Scarabella\n1- Polenta Frita", ["Scarabella", "Polenta Frita"]),
    ("1. _Amaranth\n2. *Lamb*", ["Amaranth", "Lamb"]),
    ("### Paella\n### Tapas", ["Paella", "Tapas"]),
    ("1. Salad\n2. Bread, Crabmeat, Spaghetti*\n3. Pad Thai, Bangkok style",
     ["Salad", "Bread", "Crabmeat", "Spaghetti", "Pad Thai, Bangkok style"]),
    ("```\n1. Paella\n2. Tapas\n```", ["Paella", "Tapas"]),
    ("1. \"Paella\"\n2. 'Tapas'.", ["Paella", "Tapas"]),
])
def test_parse_list(text, items):
    out = parse_list(text)
    assert out.items == items
    assert out.status == "ok"


@pytest.mark.parametrize("text, status", [
    ("", "empty"), (None, "empty"), ("   \n\n  ", "empty"),
    ("I'm sorry, but I cannot provide a list of that.", "refusal"),
    ("As an AI language model, I can't browse the internet.", "refusal"),
    ("Here are some dishes:", "no_items"),
    ("1. 42\n2. 17", "no_items"),
])
def test_parse_list_no_items(text, status):
    out = parse_list(text)
    assert out.items == [] and out.status == status


def test_parse_list_drops_are_reported():
    out = parse_list("Here you go:\n1. Paella\n2. " + "very " * 20 + "long")
    assert out.items == ["Paella"]
    assert "Here you go:" in out.dropped and len(out.dropped) == 2


def test_parse_captions_mode_keeps_sentences():
    text = "1. A steaming bowl of ramen, topped with egg, on a wooden table.\n2. Paella in a pan: at sunset"
    out = parse_list(text, max_words=80, split_commas=False, cut_explanations=False)
    assert out.items == ["A steaming bowl of ramen, topped with egg, on a wooden table",
                         "Paella in a pan: at sunset"]


@pytest.mark.parametrize("raw, key", [
    ("Pad Thai", "pad thai"), ("  pad   THAI. ", "pad thai"), ("1. Pad Thai", "pad thai"),
    ("- **Pad Thai**!", "pad thai"), ("“Pad Thai”", "pad thai"), ("Pad\tThai\n", "pad thai"),
    ("3) 'Pad Thai'...", "pad thai"), ("Crème Brûlée", "crème brûlée"), ("ＰＡＤ ＴＨＡＩ", "pad thai"),
    ("Sharp-shinned Hawk (Adult)", "sharp-shinned hawk (adult)"), ("STRASSE", "strasse"), ("Straße", "strasse"),
    ("42", None), ("...", None), ("", None), (None, None), ("- ", None),
])
def test_normalize_concept(raw, key):
    assert normalize_concept(raw) == key


def test_normalize_all_dedups_in_order():
    assert normalize_all(["Paella", "1. paella", "Tapas", "PAELLA.", "", "tapas!"]) == ["paella", "tapas"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_normalize_idempotent(s):
    k = normalize_concept(s)
    assert k is None or normalize_concept(k) == k


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=8))
def test_parse_never_raises(lines):
    out = parse_list("\n".join(lines))
    assert out.status in {"ok", "empty", "refusal", "no_items"}
    assert all(i.strip() == i and i for i in out.items)


# --- structured (JSON) answers, text parsing as fallback -----------------------------------------

def test_list_schema_is_strict_mode_json_schema():
    s = list_schema(3)
    assert s == {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"},
                                                            "maxItems": 3}},
                 "required": ["items"], "additionalProperties": False}
    assert "maxItems" not in list_schema()["properties"]["items"]


def test_json_answer_is_read_from_its_items_cleaned_as_text_items():
    text = json.dumps({"items": ["**Paella** - rice dish", "  Tacos al pastor. ", "", "1. Ramen",
                                 "a " + "very " * 20 + "long one", "Beef, Taco, Sausage"]})
    out = parse_answer(text, list_schema())
    assert out.source == "json" and out.status == "ok"
    # same cleaning as a text line (markdown, explanation, punctuation, marker, length); no comma split
    assert out.items == ["Paella", "Tacos al pastor", "Ramen", "Beef, Taco, Sausage"]
    assert len(out.dropped) == 2
    caps = parse_answer('{"items": ["A bowl of ramen: steam rising."]}', list_schema(1), max_words=80,
                        split_commas=False, cut_explanations=False)
    assert caps.items == ["A bowl of ramen: steam rising"] and caps.source == "json"
    assert parse_answer('{"items": []}', list_schema()).status == "empty"


@pytest.mark.parametrize("text", [
    '1. Paella\n2. Ramen',                      # the backend ignored the schema
    '{"items": "Paella, Ramen"}',               # wrong type
    '{"items": ["Paella"], "more": 1}',         # other keys
    '["Paella", "Ramen"]',                      # not the object
])
def test_answer_not_of_the_schema_falls_back_to_text_parsing(text):
    out = parse_answer(text, list_schema())
    assert out.source == "text"
    assert out == dataclasses.replace(parse_list(text), source="text")


@pytest.mark.parametrize("text", ['{"items": ["Paella", "Pad Thai", "Ram', '{"items": ["Paella", "Pad Thai"',
                                  '{\n  "items": [\n    "Paella",\n    "Pad Thai",\n',
                                  '{"items":["Paella","Pad Thai",'])
def test_json_cut_off_by_max_new_tokens_keeps_its_complete_items(text):
    out = parse_answer(text, list_schema())
    assert out.source == "text" and out.items == ["Paella", "Pad Thai"]
    assert parse_answer('{"items": [', list_schema()).status == "empty"


def test_more_items_than_max_items_is_not_schema_valid():
    assert parse_answer('{"items": ["a b", "c d"]}', list_schema(1)).source == "text"
    assert parse_answer('{"items": ["a b", "c d"]}', list_schema(2)).source == "json"


def test_without_a_schema_json_is_just_text():
    text = '{"items": ["Paella"]}'
    assert parse_answer(text, None) == parse_list(text)
