"""Text <-> attribute claims, with the world's lexicon: what the mini assistants read and write.

* :func:`parse_claims` reads a free-form description ("a woman with long black hair in a red striped
  shirt, no hat") into slot claims ``{"gender": "woman", "hair_style": "long", ..., "hat": "none"}``.
  It knows the world's words and their synonyms, not the world's grammar, so it also reads the papers'
  phrasings and other people's sentences that use those words.
* :func:`question_groups` maps a question to the attribute groups it asks about (CECA's Q1-Q5, CTGI's
  pool, DiaNA's instructions, free variations).
* :func:`render_claims` writes claims back as one fluent sentence (summaries, rephrasings, merges).
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from ..world.language import (
    ACCESSORY_WORDS, AGE_WORDS, BAG_WORDS, COLOR_WORDS, GENDER_WORDS, GROUP_SLOTS, HAIR_COLOR_WORDS, HAT_WORDS, HELD_WORDS,
    LOWER_WORDS, PATTERN_WORDS, PLURAL_NOUNS, SHOE_WORDS, UPPER_WORDS,
)

#: Noun phrases -> (group, value); value None = the group's generic noun ("top", "shoes", "hair").
_NOUNS: dict[str, tuple[str, str | None]] = {}
for _group, _lexicon in (("upper", UPPER_WORDS), ("lower", LOWER_WORDS), ("shoes", SHOE_WORDS), ("hat", HAT_WORDS),
                       ("bag", BAG_WORDS), ("held", HELD_WORDS), ("accessory", ACCESSORY_WORDS)):
    for _value, _forms in _lexicon.items():
        for _f in _forms:
            _NOUNS[_f] = (_group, _value)
for _f, _g in (("top", "upper"), ("upper garment", "upper"), ("bottoms", "lower"), ("shoes", "shoes"), ("footwear", "shoes"),
               ("hair", "hair"), ("hat", "hat"), ("bag", "bag"), ("stripes", "stripes"), ("logo", "logo"), ("print", "logo")):
    _NOUNS.setdefault(_f, (_g, None))
_COLORS = {f: v for v, forms in COLOR_WORDS.items() for f in forms}
_HAIR_COLORS = {f: v for v, forms in HAIR_COLOR_WORDS.items() for f in forms}
_PATTERNS = {f: v for v, forms in PATTERN_WORDS.items() for f in forms if f not in ("logo", "print")}
_GENDERS = {f: v for v, forms in GENDER_WORDS.items() for f in forms}
_GENDERS.update({"boy": "man", "girl": "woman", "he": "man", "his": "man", "him": "man", "she": "woman", "her": "woman"})
_AGES = {f: v for v, forms in AGE_WORDS.items() for f in forms}
_HAIR_STYLES = {"short": "short", "long": "long", "ponytail": "ponytail", "bald": "bald"}
_NEGATIONS = {"no", "not", "without", "nothing", "none", "never", "empty"}
_BREAKS = {"and", "with", "in", "on", "is", "are", "has", "have", "wears", "wearing", "carrying", "holding", "over", "a", "an"}

_PHRASES = sorted(set(_NOUNS) | set(_COLORS) | set(_HAIR_COLORS) | set(_PATTERNS) | set(_AGES), key=lambda s: -len(s.split()))
_MAX_WORDS = max(len(p.split()) for p in _PHRASES)
_PHRASE_SET = set(_PHRASES)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*|[.,;!?]", text.lower())


def _chunks(words: list[str]) -> list[str]:
    """Greedy longest match of known multi-word phrases ("light blue", "leather shoes", "paper bag")."""
    out, i = [], 0
    while i < len(words):
        for n in range(min(_MAX_WORDS, len(words) - i), 0, -1):
            cand = " ".join(words[i:i + n])
            if n == 1 or cand in _PHRASE_SET:
                out.append(cand)
                i += n
                break
    return out


def parse_claims(text: str) -> dict[str, str]:
    """The attribute claims a text makes (later claims win). Absence ("no hat", "without a bag", "hands
    are empty") is the claim ``"none"``; hidden ("cannot see") claims nothing."""
    return dict(_parse_claims(text))  # a fresh dict each call: callers may edit it


@lru_cache(maxsize=65536)  # re-ranking asks about the same query text again and again
def _parse_claims(text: str) -> tuple:
    return tuple(_parse_claims_uncached(text).items())


def _parse_claims_uncached(text: str) -> dict[str, str]:
    toks = _chunks(_words(text))
    claims: dict[str, str] = {}
    clause_start = 0
    for i, t in enumerate(toks):
        if t in ".;!?":
            clause_start = i + 1
            continue
        if t in _GENDERS and "gender" not in claims:
            claims["gender"] = _GENDERS[t]
        elif t in ("man", "woman", "boy", "girl", "male", "female", "lady", "guy", "gentleman"):
            claims["gender"] = _GENDERS[t]
        if t in _AGES and not (t == "old" and i + 1 < len(toks) and toks[i + 1] in ("shoes", "jeans")):
            claims["age"] = _AGES[t]
        if t in ("bald", "ponytail"):
            claims["hair_style"] = t
        if t not in _NOUNS:
            continue
        group, value = _NOUNS[t]
        back = toks[max(clause_start, i - 4):i]
        # modifiers: walk back from the noun until a break word or another noun
        mods: list[str] = []
        for w in reversed(back):
            if w in _NOUNS or w in (",",) or (w in _BREAKS and mods):
                break
            if w in _BREAKS:
                continue
            mods.append(w)
        negated = any(w in _NEGATIONS for w in toks[max(clause_start, i - 4):i])
        if group in ("stripes", "logo"):
            claims["upper_pattern"] = "striped" if group == "stripes" else "logo"
            continue
        if group == "hair":
            for w in mods:
                if w in _HAIR_COLORS:
                    claims["hair_color"] = _HAIR_COLORS[w]
                elif w in _HAIR_STYLES:
                    claims["hair_style"] = _HAIR_STYLES[w]
            continue
        if negated and group in ("hat", "bag", "held", "accessory"):
            claims[group] = "none"
            continue
        if group in ("hat", "bag", "held", "accessory"):
            if value is not None:
                claims[group] = value
            color_slot = {"hat": "hat_color", "bag": "bag_color"}.get(group)
        else:
            if value is not None:
                claims[f"{group}_type"] = value
            color_slot = f"{group}_color"
        for w in mods:
            if w in _COLORS and color_slot:
                claims[color_slot] = _COLORS[w]
            elif w in _PATTERNS and group == "upper":
                claims["upper_pattern"] = _PATTERNS[w]
    low = text.lower()
    if re.search(r"hands? (are|is) empty|empty[- ]handed|not holding|holding nothing", low):
        claims["held"] = "none"
    if re.search(r"\bno bag\b|not carrying (a|any) bag|has no bag", low):
        claims["bag"] = "none"
    if re.search(r"\bno hat\b|not wearing a hat|without a hat|no headwear", low):
        claims["hat"] = "none"
    return claims


# ---------------------------------------------------------------------------------------------
_GROUP_KEYWORDS = {
    "gender": ["gender", "sex", "male or female", "man or a woman", "man or woman"],
    "age": [" age", "how old", "young or old"],
    "hair": ["hair", "bald", "ponytail"],
    "upper": ["upper body", "upper-body", "top", "shirt", "jacket", "coat", "sweater", "hoodie", "t-shirt", "upper garment"],
    "lower": ["lower body", "lower-body", "pants", "trousers", "skirt", "jeans", "shorts", "bottoms", "legs"],
    "shoes": ["shoe", "footwear", "feet", "sneaker", "boot", "sandal"],
    "hat": ["hat", "cap", "head"],
    "bag": ["bag", "backpack", "carrying"],
    "held": ["holding", "in hand", "in his hand", "in her hand", "hands", "in hand?"],
    "accessory": ["glasses", "accessory", "accessories", "scarf", "mask", "face or neck"],
}
for _g, _lex in (("upper", UPPER_WORDS), ("lower", LOWER_WORDS), ("shoes", SHOE_WORDS), ("hat", HAT_WORDS), ("bag", BAG_WORDS),
                 ("held", HELD_WORDS), ("accessory", ACCESSORY_WORDS)):
    _GROUP_KEYWORDS[_g] += [f for forms in _lex.values() for f in forms if f not in _GROUP_KEYWORDS[_g]]
_KW_RE = {g: [re.compile(r"\b" + re.escape(k.strip()) + r"(e?s)?\b") for k in kws] for g, kws in _GROUP_KEYWORDS.items()}
_GENERIC = ["wearing", "outfit", "attire", "clothing", "clothes", "dressed"]
_DESCRIBE = ["describe the person", "description of the person", "describe the appearance", "describe the individual",
             "look like", "describe the attire", "notable features", "details about the person"]


def question_groups(question: str) -> list[str]:
    """The attribute groups a question asks about, in the order asked (empty: not about a person's
    attributes). "What is the person wearing?" asks about the whole outfit; "describe the person" about
    everything (``["describe"]``)."""
    return list(_question_groups(question))


@lru_cache(maxsize=4096)
def _question_groups(question: str) -> tuple:
    return tuple(_question_groups_uncached(question))


def _question_groups_uncached(question: str) -> list[str]:
    q = " " + question.lower() + " "
    hits = []
    for g, pats in _KW_RE.items():
        pos = [m.start() for pat in pats for m in [pat.search(q)] if m]
        if pos:
            hits.append((min(pos), g))
    if "bag" in [g for _, g in hits] and "held" in [g for _, g in hits] and "carrying" in q and "holding" not in q:
        hits = [h for h in hits if h[1] != "held"]
    groups = [g for _, g in sorted(hits)]
    if not groups and any(k in q for k in _DESCRIBE):
        return ["describe"]
    outfit_words = [k for k in _GENERIC if k != "wearing"]  # "wearing a hat?" asks about the hat alone
    if (any(k in q for k in outfit_words) and set(groups) <= {"accessory", "hat", "bag", "held"}) or (not groups and "wearing" in q):
        return ["upper", "lower", "shoes"] + groups
    if groups == ["hat"] and "head" in q and "hat" not in q and "cap" not in q:
        return ["hat"]
    return groups


# ---------------------------------------------------------------------------------------------
def _a(phrase: str) -> str:
    first = phrase.split()[0]
    if phrase in PLURAL_NOUNS or any(phrase.endswith(" " + n) for n in PLURAL_NOUNS):
        return phrase
    return ("an " if first[0] in "aeiou" else "a ") + phrase


def _form(words: dict, value: str, rng) -> str:
    forms = words[value]
    return forms[int(rng.integers(len(forms)))] if rng is not None else forms[0]


def render_claims(claims: dict[str, str], rng: np.random.Generator | None = None) -> str:
    """One sentence saying exactly ``claims`` (``rng`` picks synonyms; None = canonical words)."""
    c = claims
    noun = _form(GENDER_WORDS, c["gender"], rng) if c.get("gender") in GENDER_WORDS else "person"
    if c.get("age") in AGE_WORDS:
        noun = f"{_form(AGE_WORDS, c['age'], rng)} {noun}"
    lead = _a(noun)
    hair = []
    if c.get("hair_style") == "bald":
        lead += " who is bald"
    elif c.get("hair_style") or c.get("hair_color"):
        col = _form(HAIR_COLOR_WORDS, c["hair_color"], rng) + " " if c.get("hair_color") in HAIR_COLOR_WORDS else ""
        st = c.get("hair_style")
        hair = [f"{col}hair in a ponytail" if st == "ponytail" else f"{st + ' ' if st else ''}{col}hair"]
        lead += " with " + hair[0]
    wear = []
    if c.get("upper_type") or c.get("upper_color"):
        col = _form(COLOR_WORDS, c["upper_color"], rng) + " " if c.get("upper_color") in COLOR_WORDS else ""
        pat = c.get("upper_pattern")
        pat_w = {"striped": "striped ", "checked": "checked "}.get(pat, "")
        n = _form(UPPER_WORDS, c["upper_type"], rng) if c.get("upper_type") in UPPER_WORDS else "top"
        wear.append(_a(f"{col}{pat_w}{n}") + (" with a logo" if pat == "logo" else ""))
    if c.get("lower_type") or c.get("lower_color"):
        col = _form(COLOR_WORDS, c["lower_color"], rng) + " " if c.get("lower_color") in COLOR_WORDS else ""
        n = _form(LOWER_WORDS, c["lower_type"], rng) if c.get("lower_type") in LOWER_WORDS else "bottoms"
        wear.append(_a(f"{col}{n}") if n != "bottoms" else f"{col}bottoms")
    if c.get("shoes_type") or c.get("shoes_color"):
        col = _form(COLOR_WORDS, c["shoes_color"], rng) + " " if c.get("shoes_color") in COLOR_WORDS else ""
        wear.append(f"{col}{_form(SHOE_WORDS, c['shoes_type'], rng) if c.get('shoes_type') in SHOE_WORDS else 'shoes'}")
    extra = []
    if c.get("hat") in HAT_WORDS:
        col = _form(COLOR_WORDS, c["hat_color"], rng) + " " if c.get("hat_color") in COLOR_WORDS else ""
        extra.append("wearing " + _a(col + _form(HAT_WORDS, c["hat"], rng)))
    elif c.get("hat") == "none":
        extra.append("wearing no hat")
    if c.get("bag") in BAG_WORDS:
        col = _form(COLOR_WORDS, c["bag_color"], rng) + " " if c.get("bag_color") in COLOR_WORDS else ""
        extra.append("carrying " + _a(col + _form(BAG_WORDS, c["bag"], rng)))
    elif c.get("bag") == "none":
        extra.append("carrying no bag")
    if c.get("held") in HELD_WORDS:
        extra.append("holding " + _a(_form(HELD_WORDS, c["held"], rng)))
    elif c.get("held") == "none":
        extra.append("with empty hands")
    if c.get("accessory") in ACCESSORY_WORDS:
        w = _form(ACCESSORY_WORDS, c["accessory"], rng)
        extra.append("wearing " + (w if w in PLURAL_NOUNS else _a(w)))
    s = lead + (" is wearing " + _join(wear) if wear else "")
    if extra:
        s += (", " if wear else " ") + _join(extra)
    return s[0].upper() + s[1:] + "."


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


#: Attribute groups and the slots each one covers (for missing-attribute questions and dialogue checks).
GROUPS = {**GROUP_SLOTS, "hat": ["hat", "hat_color"], "bag": ["bag", "bag_color"]}


def claimed_groups(claims: dict[str, str]) -> set[str]:
    return {g for g, slots in GROUPS.items() if any(s in claims for s in slots)}
