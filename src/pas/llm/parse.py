"""Robust parsing of list answers: numbered, bulleted, one per line, comma-separated, with
explanations, with a chatty preamble, empty, or a refusal. Never raises; reports what it dropped.

Concepts use the defaults; captions (one sentence per item) use
``parse_list(text, max_words=80, split_commas=False, cut_explanations=False)``.
"""

from __future__ import annotations

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


def _clean_item(s: str, cut_explanations: bool) -> str:
    s = MARKDOWN.sub("", s).strip()
    s = MARKER.sub("", s, count=1).strip()
    if cut_explanations:
        s = EXPLANATION.split(s, maxsplit=1)[0]
    s = " ".join(re.sub(r"[\[\]]", " ", s).split())  # "[Dish] 20" → "Dish 20"
    s = s.strip("\"'“”‘’«»*_").strip()
    s = re.sub(r"[\s.,;:!?]+$", "", s)
    return s.strip().strip("\"'“”‘’«»").strip()


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
    items = []
    for p in pieces:
        item = _clean_item(p, cut_explanations)
        if not item or not LETTER.search(item) or len(item.split()) > max_words or len(item) > max_chars:
            dropped.append(p)
            continue
        items.append(item)
    if items:
        return ParsedList(items, "ok", dropped)
    if REFUSAL.match(lines[0]):
        return ParsedList([], "refusal", dropped)
    return ParsedList([], "no_items", dropped)
