"""People of the mini world: identity attributes, outfits and how often each value occurs.

A person is an immutable :class:`Person`. Values are drawn from skewed priors (a palette where black,
white and grey dominate and purple or orange are rare) with a few co-occurrence rules (skirts go with
women, shorts with sandals or sneakers, coats with dark colours, grey hair with age), so that many
people in a gallery look alike, as in real surveillance data.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

# ---------------------------------------------------------------------------------------------
# Colours: name -> (RGB in [0, 1], prior weight). The weights are what makes look-alikes common.
PALETTE: dict[str, tuple[tuple[float, float, float], float]] = {
    "black": ((0.10, 0.10, 0.11), 0.22),
    "white": ((0.92, 0.92, 0.90), 0.13),
    "gray": ((0.52, 0.52, 0.54), 0.11),
    "navy": ((0.12, 0.16, 0.38), 0.09),
    "blue": ((0.20, 0.40, 0.80), 0.08),
    "light blue": ((0.55, 0.72, 0.92), 0.04),
    "red": ((0.78, 0.12, 0.14), 0.06),
    "brown": ((0.45, 0.30, 0.16), 0.05),
    "khaki": ((0.76, 0.68, 0.48), 0.05),
    "green": ((0.20, 0.52, 0.26), 0.04),
    "pink": ((0.93, 0.56, 0.70), 0.03),
    "yellow": ((0.93, 0.82, 0.20), 0.03),
    "purple": ((0.48, 0.25, 0.60), 0.02),
    "orange": ((0.95, 0.50, 0.10), 0.02),
}
COLORS = list(PALETTE)
DARK_COLORS = ["black", "gray", "navy", "brown", "khaki"]

HAIR_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.07, 0.06, 0.06),
    "brown": (0.38, 0.24, 0.12),
    "blonde": (0.86, 0.74, 0.42),
    "gray": (0.66, 0.66, 0.66),
    "red": (0.62, 0.22, 0.10),
}
SKIN_TONES: dict[str, tuple[float, float, float]] = {
    "light": (0.96, 0.82, 0.70),
    "medium": (0.80, 0.60, 0.44),
    "dark": (0.45, 0.31, 0.22),
}

# Slot vocabularies. "none" means the item is absent.
GENDERS = ["man", "woman"]
AGES = ["young", "adult", "elderly"]
BUILDS = ["slim", "average", "heavy"]
HAIR_STYLES = ["short", "long", "ponytail", "bald"]
UPPER_TYPES = ["t-shirt", "shirt", "jacket", "coat", "sweater", "hoodie"]
PATTERNS = ["plain", "striped", "checked", "logo"]
LOWER_TYPES = ["trousers", "jeans", "shorts", "skirt"]
SHOE_TYPES = ["sneakers", "boots", "leather shoes", "sandals"]
HATS = ["none", "cap", "beanie", "sun hat"]
BAGS = ["none", "backpack", "shoulder bag", "handbag"]
HELD = ["none", "umbrella", "phone", "paper bag", "bottle"]
ACCESSORIES = ["none", "glasses", "scarf", "face mask"]

#: The outfit slots (what captions, questions, triplets and the recognizer talk about), in a fixed order.
OUTFIT_SLOTS = [
    "hair_style", "hair_color", "upper_type", "upper_color", "upper_pattern", "lower_type",
    "lower_color", "shoes_type", "shoes_color", "hat", "bag", "held", "accessory",
]
IDENTITY_SLOTS = ["gender", "age", "build", "skin"]

#: Every categorical slot with its vocabulary (for recognizers, parsers and tests).
SLOT_VALUES: dict[str, list[str]] = {
    "gender": GENDERS, "age": AGES, "build": BUILDS, "skin": list(SKIN_TONES),
    "hair_style": HAIR_STYLES, "hair_color": list(HAIR_COLORS),
    "upper_type": UPPER_TYPES, "upper_color": COLORS, "upper_pattern": PATTERNS,
    "lower_type": LOWER_TYPES, "lower_color": COLORS,
    "shoes_type": SHOE_TYPES, "shoes_color": COLORS,
    "hat": HATS, "hat_color": COLORS, "bag": BAGS, "bag_color": COLORS, "held": HELD,
    "accessory": ACCESSORIES,
}


@dataclass(frozen=True)
class Person:
    """One identity: who they are and what they wear. ``shade`` nudges every colour a little, so two
    people in "black jackets" are similar but not pixel-identical."""

    pid: int
    gender: str
    age: str
    build: str
    skin: str
    hair_style: str
    hair_color: str
    upper_type: str
    upper_color: str
    upper_pattern: str
    pattern_color: str
    lower_type: str
    lower_color: str
    shoes_type: str
    shoes_color: str
    hat: str
    hat_color: str
    bag: str
    bag_color: str
    held: str
    accessory: str
    shade: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def replace(self, **changes) -> "Person":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def pronoun(self) -> str:
        return "he" if self.gender == "man" else "she"

    @property
    def possessive(self) -> str:
        return "his" if self.gender == "man" else "her"


def _choice(rng: np.random.Generator, values, weights) -> str:
    w = np.asarray(weights, dtype=float)
    return values[int(rng.choice(len(values), p=w / w.sum()))]


def _color(rng, allowed=None, boost: dict[str, float] | None = None) -> str:
    names = allowed or COLORS
    weights = [PALETTE[c][1] * (boost or {}).get(c, 1.0) for c in names]
    return _choice(rng, names, weights)


def sample_person(rng: np.random.Generator, pid: int, rare_boost: float = 1.0) -> Person:
    """Draw one identity. ``rare_boost`` > 1 makes rare colours likelier (a more diverse domain)."""
    boost = {c: rare_boost for c in COLORS if PALETTE[c][1] < 0.05}
    gender = _choice(rng, GENDERS, [0.55, 0.45])
    age = _choice(rng, AGES, [0.40, 0.45, 0.15])
    build = _choice(rng, BUILDS, [0.35, 0.45, 0.20])
    skin = _choice(rng, list(SKIN_TONES), [0.45, 0.35, 0.20])
    if gender == "woman":
        hair_style = _choice(rng, HAIR_STYLES, [0.25, 0.50, 0.24, 0.01])
    else:
        hair_style = _choice(rng, HAIR_STYLES, [0.82, 0.05, 0.03, 0.10 if age == "elderly" else 0.03])
    hair_w = [0.55, 0.22, 0.10, 0.05, 0.03] if age != "elderly" else [0.15, 0.10, 0.05, 0.68, 0.02]
    hair_color = _choice(rng, list(HAIR_COLORS), hair_w)

    upper_type = _choice(rng, UPPER_TYPES, [0.28, 0.18, 0.20, 0.12, 0.12, 0.10])
    if upper_type == "coat":
        upper_color = _color(rng, DARK_COLORS + ["red", "white"], boost)
    else:
        upper_color = _color(rng, boost=boost)
    pat_w = [0.55, 0.18, 0.30 if upper_type == "shirt" else 0.05, 0.22 if upper_type in ("t-shirt", "hoodie") else 0.04]
    upper_pattern = _choice(rng, PATTERNS, pat_w)
    pattern_color = _color(rng, [c for c in COLORS if c != upper_color], boost)

    if gender == "woman":
        lower_type = _choice(rng, LOWER_TYPES, [0.28, 0.32, 0.12, 0.28])
    else:
        lower_type = _choice(rng, LOWER_TYPES, [0.45, 0.40, 0.15, 0.0])
    if lower_type == "jeans":
        lower_color = _choice(rng, ["blue", "navy", "black", "light blue", "gray"], [0.40, 0.25, 0.20, 0.10, 0.05])
    else:
        lower_color = _color(rng, boost={"black": 2.0, "gray": 1.5, "khaki": 2.0, "navy": 1.5, **boost})

    if lower_type == "shorts":
        shoes_type = _choice(rng, SHOE_TYPES, [0.6, 0.0, 0.05, 0.35])
    elif upper_type == "coat" or lower_type == "skirt":
        shoes_type = _choice(rng, SHOE_TYPES, [0.3, 0.35, 0.3, 0.05])
    else:
        shoes_type = _choice(rng, SHOE_TYPES, [0.55, 0.15, 0.27, 0.03])
    shoes_color = _color(rng, ["black", "white", "brown", "gray", "red", "blue", "pink"], boost)

    hat_w = [0.72, 0.12, 0.10 if upper_type in ("coat", "jacket", "sweater") else 0.03, 0.06]
    hat = _choice(rng, HATS, hat_w)
    hat_color = _color(rng, boost=boost)
    bag_w = [0.32, 0.34 if age == "young" else 0.22, 0.20, 0.18 if gender == "woman" else 0.02]
    bag = _choice(rng, BAGS, bag_w)
    bag_color = _color(rng, boost={"black": 1.8, "brown": 1.5, **boost})
    held = _choice(rng, HELD, [0.62, 0.08, 0.14, 0.08, 0.08])
    acc_w = [0.60, 0.25 if age != "young" else 0.15, 0.10 if upper_type in ("coat", "jacket", "sweater") else 0.02, 0.05]
    accessory = _choice(rng, ACCESSORIES, acc_w)
    shade = tuple(float(x) for x in rng.normal(0.0, 0.035, size=3))
    return Person(
        pid=pid, gender=gender, age=age, build=build, skin=skin, hair_style=hair_style,
        hair_color=hair_color, upper_type=upper_type, upper_color=upper_color,
        upper_pattern=upper_pattern, pattern_color=pattern_color, lower_type=lower_type,
        lower_color=lower_color, shoes_type=shoes_type, shoes_color=shoes_color, hat=hat,
        hat_color=hat_color, bag=bag, bag_color=bag_color, held=held, accessory=accessory, shade=shade,
    )


def sample_people(rng: np.random.Generator, n: int, first_pid: int = 0, rare_boost: float = 1.0) -> list[Person]:
    return [sample_person(rng, first_pid + i, rare_boost) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# What a camera can see. A back view hides the face (glasses, mask, logo on the chest) and shows the
# backpack; a side view hides the chest logo.
def visible_slots(person: Person, view: str) -> list[str]:
    """The outfit slots an observer could read off an image taken from ``view``."""
    slots = ["gender", "hair_color", "hair_style", "upper_type", "upper_color", "lower_type",
             "lower_color", "shoes_type", "shoes_color"]
    if person.upper_pattern != "plain" and not (person.upper_pattern == "logo" and view != "front"):
        slots.append("upper_pattern")
    if person.hat != "none":
        slots.append("hat")
    if person.bag != "none":
        slots.append("bag")
    if person.held != "none":
        slots.append("held")
    if person.accessory != "none" and not (view == "back" and person.accessory in ("glasses", "face mask")):
        slots.append("accessory")
    if person.hair_style == "bald":
        slots.remove("hair_color")
    return slots


def attribute_vector(person: Person) -> dict[str, str]:
    """The categorical labels a recognizer is trained to predict (pattern reported as 'plain' when absent)."""
    return {s: getattr(person, s) for s in SLOT_VALUES if hasattr(person, s)}
