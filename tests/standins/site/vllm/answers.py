"""Scripted answers of the vLLM stand-in, keyed on the role prompt (src/pas/prompts/*.txt) of the last
user turn and deterministic in (prompt, seed): L1 lists 30 concepts of the domain (Food-101 class
names, plus one thing that is not food), L2 lists variants of the concept it is asked about, L3
answers Yes, or No for the non-food ones, L4 writes one scene sentence naming the concept."""

from __future__ import annotations

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


def respond(prompt: str, seed: int) -> str:
    msg = last_user_turn(prompt)
    rng = random.Random(f"{seed}|{msg}")
    if "List 30 different" in msg:                                           # L1: concepts_generate.txt
        items = rng.sample(foods(), 29) + [rng.choice(NOT_FOOD)]
        rng.shuffle(items)
        return "\n".join(f"{i}. {c}" for i, c in enumerate(items, 1))
    m = re.search(r'similar to "(.+?)"', msg)                               # L2: concepts_expand.txt
    if m:
        picks = rng.sample(VARIANTS, 3)
        return "\n".join(f"{i}. {v.format(c=m.group(1))}" for i, v in enumerate(picks, 1))
    m = re.search(r'Is "(.+?)" a concept', msg)                             # L3: concepts_validate.txt
    if m:
        return "No" if NOT_FOOD_WORDS & set(m.group(1).lower().split()) else "Yes"
    m = re.search(r"photograph of (.+?)\.\s", msg + "\n")                   # L4: captions.txt
    if m:
        c = m.group(1)
        place = rng.choice(("on a wooden table in a small kitchen", "at a busy street market stall",
                            "on a white plate in a quiet restaurant"))
        light = rng.choice(("soft morning light", "warm evening light", "bright window light"))
        return f"A close photograph of {c} {place}, lit by {light}."
    return "I am not sure what you are asking."
