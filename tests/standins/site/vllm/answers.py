"""Scripted answers of the vLLM stand-in, keyed on the role prompt of the last user turn (matched against
pas's own templates in src/pas/prompts/*.txt, so a reworded prompt is still recognised) and
deterministic in (prompt, seed): L1 lists 30 concepts of the domain (Food-101 class
names, plus one thing that is not food), L2 lists variants of the concept it is asked about, L3
answers Yes, or No for the non-food ones, L4 writes one scene sentence naming the concept."""

from __future__ import annotations

import json
import random
import re
from importlib import resources

NOT_FOOD = ("wooden table", "kitchen sink", "paper napkin", "cookbook shelf")
NOT_FOOD_WORDS = {"table", "sink", "napkin", "shelf", "cookbook"}
VARIANTS = ("{c} with herbs", "spicy {c}", "homemade {c}", "{c} on a plate")


def foods() -> list[str]:
    text = resources.files("pas.resources").joinpath("food101_classes.txt").read_text()
    return [ln.strip().replace("_", " ") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def last_user_turn(prompt: str) -> str:
    """The last user message of a Llama-2 / Mixtral chat prompt (`[INST] ... [/INST]`), else all of it."""
    if "[INST]" in prompt:
        tail = prompt[prompt.rindex("[INST]") + len("[INST]"):]
        return tail.split("[/INST]")[0].strip()
    return prompt.strip()


def _pattern(template: str) -> re.Pattern:
    """A prompt template of pas (`{name}`, `{concept}`, ...) as a regex capturing its fields."""
    out, seen, pos = "", set(), 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()])
        out += f"(?P={m.group(1)})" if m.group(1) in seen else f"(?P<{m.group(1)}>.+?)"
        seen.add(m.group(1))
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]).rstrip() + r"\s*$", re.S)


def roles() -> dict[str, re.Pattern]:
    """The role prompts as pas ships them (src/pas/prompts), so the stand-in follows their wording."""
    files = resources.files("pas.prompts")
    return {role: _pattern(files.joinpath(f"{name}.txt").read_text().strip())
            for role, name in (("l1", "concepts_generate"), ("l2", "concepts_expand"), ("l3", "concepts_validate"),
                               ("l4", "captions")) if files.joinpath(f"{name}.txt").is_file()}


def _role(msg: str) -> tuple[str | None, str | None]:
    for role, pat in roles().items():
        m = pat.match(msg.strip())
        if m:
            return role, m.groupdict().get("concept")
    # wording not shipped (e.g. generate.prompt_file): the phrases of the packaged prompts
    if "List 30 different" in msg:
        return "l1", None
    for role, rx in (("l2", r'similar to "(.+?)"'), ("l3", r'Is "(.+?)" a concept'), ("l4", r"photograph of (.+?)\.\s")):
        m = re.search(rx, msg + "\n")
        if m:
            return role, m.group(1)
    return None, None


def respond(prompt: str, seed: int) -> str:
    msg = last_user_turn(prompt)
    rng = random.Random(f"{seed}|{msg}")
    role, concept = _role(msg)
    if role == "l1":                                                       # concepts_generate.txt
        items = rng.sample(foods(), 29) + [rng.choice(NOT_FOOD)]
        rng.shuffle(items)
        return "\n".join(f"{i}. {c}" for i, c in enumerate(items, 1))
    if role == "l2":                                                       # concepts_expand.txt
        picks = rng.sample(VARIANTS, 3)
        return "\n".join(f"{i}. {v.format(c=concept)}" for i, v in enumerate(picks, 1))
    if role == "l3":                                                       # concepts_validate.txt
        return "No" if NOT_FOOD_WORDS & set(concept.lower().split()) else "Yes"
    if role == "l4":                                                       # captions.txt
        place = rng.choice(("on a wooden table in a small kitchen", "at a busy street market stall",
                            "on a white plate in a quiet restaurant"))
        light = rng.choice(("soft morning light", "warm evening light", "bright window light"))
        return f"A close photograph of {concept} {place}, lit by {light}."
    return "I am not sure what you are asking."


LIST_MARKER = re.compile(r"^\s*\d+[.)]\s+")


def structured(text: str, params) -> str:
    """The scripted answer `text` as a constrained engine would write it for `params`
    (StructuredOutputsParams): for a `json` schema, an object whose array-of-strings properties hold
    the answer's lines (numbering removed, at most maxItems) and whose string properties hold the
    whole answer. Other constraints and schema shapes are not scripted (ValueError)."""
    schema = json.loads(params.json) if isinstance(params.json, str) else params.json
    props = (schema or {}).get("properties") if isinstance(schema, dict) else None
    if params.json is None or schema.get("type") != "object" or not isinstance(props, dict):
        raise ValueError(f"vLLM stand-in: structured outputs {params!r} are not scripted")
    lines = [LIST_MARKER.sub("", ln).strip() for ln in text.splitlines() if ln.strip()]
    out = {}
    for name, prop in props.items():
        if prop.get("type") == "array" and (prop.get("items") or {}).get("type") == "string":
            limit = prop.get("maxItems")
            out[name] = lines if limit is None else lines[:limit]
        elif prop.get("type") == "string":
            out[name] = text
        else:
            raise ValueError(f"vLLM stand-in: schema property {name!r} {prop!r} is not scripted")
    return json.dumps(out, ensure_ascii=False)
