"""Robust parsing of list answers: numbered, bulleted, one per line, comma-separated, with
explanations, with a chatty preamble, empty, or a refusal. Never raises; reports what it dropped.

Concepts use the defaults; captions (one sentence per item) use
``parse_list(text, max_words=80, split_commas=False, cut_explanations=False)``.

Structured answers: a list request may carry :func:`list_schema` (``ChatRequest.schema``), which
backends with constrained decoding (vLLM structured outputs, OpenAI ``json_schema``) make the answer
follow. :func:`parse_answer` takes the items of such a JSON answer (cleaned by the same rules as a
text item) and falls back to text on anything else (`ParsedList.source` says which it was): JSON
cut off by max_new_tokens keeps its complete items, any other answer (no schema, a backend that
ignored it, other keys) goes to :func:`parse_list`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

# "1.", "1)", "(1)", "1:", "1-", "#1", "###", "-", "*", "•", "–", "+", "a)" at the start of a line
MARKER = re.compile(r"^\s*(?:#?\(?\d{1,4}[.):\]-]|#{1,6}|[-*•·▪‣◦–—+>]|\(?[a-zA-Z][)\]])\s+")
NUMBERED = re.compile(r"^\(?\d{1,4}[.)]\s")
INLINE_NUMBER = re.compile(r"\s+(?=\(?\d{1,4}[.)]\s+\S)")
REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|as an ai|"
                     r"i apologi[sz]e|i'?m unable|i am unable|i'?m not able|i do not have|i don'?t have)",
                     re.IGNORECASE)
# an explanation after the name: "Paella - rice dish", "Paella: rice dish", "Paella — ..."
EXPLANATION = re.compile(r"\s+[-–—]\s+|:\s+|\s+–|\s+—")
MARKDOWN = re.compile(r"\*\*|__|`+|~~")
LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


@dataclass
class ParsedList:
    items: list[str]
    status: str                                # ok | empty | refusal | no_items
    dropped: list[str] = field(default_factory=list)  # candidate lines/pieces rejected (too long, ...)
    source: str = "text"                       # json (a schema-valid structured answer) | text (parse_list)


ITEMS = "items"  # the one property of a list answer: {"items": ["...", ...]}


def list_schema(max_items: int | None = None) -> dict:
    """The JSON schema of a list answer, {"items": [str, ...]} (at most `max_items`), in the subset
    both vLLM's grammar backends and OpenAI's strict mode accept (every property required, no others)."""
    items: dict = {"type": "array", "items": {"type": "string"}}
    if max_items is not None:
        items["maxItems"] = int(max_items)
    return {"type": "object", "properties": {ITEMS: items}, "required": [ITEMS], "additionalProperties": False}


CUT_JSON = re.compile(r'^\s*\{\s*"items"\s*:\s*\[')  # how a list answer starts, before a cut
SPACE = re.compile(r"\s*")  # \s is str.isspace


def _cut_json_items(text: str) -> list[str] | None:
    """The complete string items of a list answer cut off mid-JSON ('{"items": ["a", "b", "ra'), or
    None when the text does not start like one."""
    m = CUT_JSON.match(text)
    if m is None:
        return None
    decoder, pos, items = json.JSONDecoder(), m.end(), []
    while True:
        try:
            item, pos = decoder.raw_decode(text, SPACE.match(text, pos).end())
        except ValueError:   # the cut: an unfinished string (or the end)
            return items
        if not isinstance(item, str):
            return None
        items.append(item)
        pos = SPACE.match(text, pos).end()
        if text[pos:pos + 1] != ",":
            return items
        pos += 1


def structured_items(text: str | None, schema: dict | None) -> list[str] | None:
    """The items of an answer that is a JSON object of `schema`'s shape ({"items": [str, ...]}, no
    more than its maxItems), None for anything else (not JSON, cut off, other keys or types)."""
    if not schema:
        return None
    try:
        obj = json.loads((text or "").strip())
    except ValueError:
        return None
    items = obj.get(ITEMS) if isinstance(obj, dict) and set(obj) == {ITEMS} else None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return None
    limit = ((schema.get("properties") or {}).get(ITEMS) or {}).get("maxItems")
    if isinstance(limit, int) and len(items) > limit:
        return None
    return items


def _clean_item(s: str, cut_explanations: bool) -> str:
    s = MARKDOWN.sub("", s).strip()
    s = MARKER.sub("", s, count=1).strip()
    if cut_explanations:
        s = EXPLANATION.split(s, maxsplit=1)[0]
    s = " ".join(re.sub(r"[\[\]]", " ", s).split())  # "[Dish] 20" → "Dish 20"
    s = s.strip("\"'“”‘’«»*_").strip()
    s = re.sub(r"[\s.,;:!?]+$", "", s)
    return s.strip().strip("\"'“”‘’«»").strip()


def _keep_items(pieces: list[str], max_words: int, max_chars: int, cut_explanations: bool
                ) -> tuple[list[str], list[str]]:
    """(cleaned items, rejected pieces): a piece is rejected when its cleaned form is empty, has no
    letter, or is longer than `max_words` words / `max_chars` characters."""
    items, dropped = [], []
    for p in pieces:
        item = _clean_item(p, cut_explanations)
        if not item or not LETTER.search(item) or len(item.split()) > max_words or len(item) > max_chars:
            dropped.append(p)
            continue
        items.append(item)
    return items, dropped


def _is_header(line: str) -> bool:
    """A preamble line ("Here are 10 dishes:" / "Sure! Here is a list") rather than an item."""
    low = line.lower().strip()
    return low.endswith(":") or bool(re.match(r"^(sure|certainly|of course|here (is|are)|below|okay|ok)\b", low))


def parse_list(text: str | None, *, max_words: int = 8, max_chars: int = 100, split_commas: bool = True,
               cut_explanations: bool = True) -> ParsedList:
    """Split an LLM answer into list items (cleaned, original case, in order, duplicates kept)."""
    text = unicodedata.normalize("NFKC", text or "")
    text = re.sub(r"```[a-zA-Z]*", "\n", text)
    lines = []
    for ln in text.splitlines():
        ln = ln.strip()
        if NUMBERED.match(ln):  # "1. Curry - ... 2. Chinese curry - ..." on one line
            lines += [part.strip() for part in INLINE_NUMBER.split(ln)]
        elif ln:
            lines.append(ln)
    if not lines:
        return ParsedList([], "empty")
    marked = [ln for ln in lines if MARKER.match(ln)]
    dropped: list[str] = []
    if marked:  # a numbered/bulleted list: unmarked lines are preamble/epilogue
        pieces = []
        for ln in marked:  # "3. Beef, Taco, Sausage, Omelette": a list inside an item (≥ 2 commas)
            if split_commas and ln.count(",") >= 2:
                pieces += [p for p in re.split(r"\s*,\s*", MARKER.sub("", ln, count=1)) if p]
            else:
                pieces.append(ln)
        dropped += [ln for ln in lines if not MARKER.match(ln)]
    elif REFUSAL.match(lines[0]):  # "I'm sorry, but I can't ..." is not the list "I'm sorry", "but ..."
        return ParsedList([], "refusal", lines)
    else:
        body = [ln for ln in lines if not _is_header(ln)]
        dropped += [ln for ln in lines if _is_header(ln)]
        if len(body) == 1 and _is_header(lines[0]) is False and ":" in body[0] and split_commas:
            head, _, tail = body[0].partition(":")  # "Some dishes: a, b, c"
            if "," in tail:
                dropped.append(head)
                body = [tail]
        if split_commas and len(body) <= 2 and any(("," in b or ";" in b) for b in body):
            pieces = []
            for b in body:
                parts = re.split(r"\s*[,;]\s*", b)
                parts = [re.sub(r"^(and|or)\s+", "", p.strip(), flags=re.IGNORECASE) for p in parts]
                pieces += [p for p in parts if p]
        else:
            pieces = body
    items, rejected = _keep_items(pieces, max_words, max_chars, cut_explanations)
    dropped += rejected
    if items:
        return ParsedList(items, "ok", dropped)
    if REFUSAL.match(lines[0]):
        return ParsedList([], "refusal", dropped)
    return ParsedList([], "no_items", dropped)


def parse_answer(text: str | None, schema: dict | None = None, *, max_words: int = 8, max_chars: int = 100,
                 split_commas: bool = True, cut_explanations: bool = True) -> ParsedList:
    """The items of an answer to a list request: from its JSON when the request carried `schema` and
    the answer follows it (`source` "json": each item cleaned as :func:`parse_list` cleans a line,
    never split at commas: the model said where items end), else (`source` "text") the complete
    items of a JSON answer cut off by max_new_tokens, or :func:`parse_list` of anything else."""
    pieces, source = structured_items(text, schema), "json"
    if pieces is None and schema:
        try:
            json.loads((text or "").strip())
        except ValueError:   # not JSON: cut off by max_new_tokens?
            pieces, source = _cut_json_items(text or ""), "text"
    if pieces is None:
        return parse_list(text, max_words=max_words, max_chars=max_chars, split_commas=split_commas,
                          cut_explanations=cut_explanations)
    pieces = [unicodedata.normalize("NFKC", p) for p in pieces]
    items, dropped = _keep_items(pieces, max_words, max_chars, cut_explanations)
    status = "ok" if items else ("empty" if not any(p.strip() for p in pieces) else "no_items")
    return ParsedList(items, status, dropped, source=source)
