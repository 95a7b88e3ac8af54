"""What a picture of a person shows, as classification targets: every attribute slot, the pattern's colour,
and how the image was taken (view, pose, scene). Shared by the mini MLLM's attribute recognizer and the mini
CLIP's image tower, both trained on rendered people who are in no dataset (the mini world's "ImageNet")."""
from __future__ import annotations

import numpy as np
import torch

from .attributes import SLOT_VALUES, Person, attribute_vector, sample_person
from .render import POSES, SCENES, VIEWS, State, render, sample_state

#: head -> its classes.
HEADS: dict[str, list[str]] = {**SLOT_VALUES, "pattern_color": SLOT_VALUES["upper_color"], "view": VIEWS, "pose": POSES,
                               "scene": SCENES}


def labels(person: Person, state: State) -> dict[str, int]:
    """Training targets for one image: head -> class index, or -1 where the image cannot show it."""
    v = {**attribute_vector(person), "pattern_color": person.pattern_color, "view": state.view, "pose": state.pose,
         "scene": state.scene, "hat_color": person.hat_color, "bag_color": person.bag_color}
    hidden = set()
    if person.hat == "none":
        hidden.add("hat_color")
    if person.bag == "none":
        hidden.add("bag_color")
    if person.hair_style == "bald":
        hidden.add("hair_color")
    if state.view == "back" and person.accessory in ("glasses", "face mask", "none"):
        hidden.add("accessory")
    if state.view != "front" and person.upper_pattern in ("plain", "logo"):
        hidden.add("upper_pattern")
    if person.upper_pattern not in ("striped", "logo") or "upper_pattern" in hidden:
        hidden.add("pattern_color")
    return {h: (-1 if h in hidden else HEADS[h].index(v[h])) for h in HEADS}


def labelled_images(rng: np.random.Generator, n_people: int, height: int, per_person: int = 2):
    """``n_people`` fresh people, ``per_person`` images each in a random dataset style's camera:
    ``(images uint8 [N, 3, H, W], {head: targets [N]}, people, states)``."""
    from .build import PROFILES

    styles = ["cuhk_pedes", "icfg_pedes", "rstpreid"]
    imgs, labs, people, states = [], [], [], []
    for i in range(n_people):
        p = sample_person(rng, i)
        for _ in range(per_person):
            st = sample_state(rng, PROFILES[styles[int(rng.integers(3))]])
            imgs.append(render(p, st, height))
            labs.append(labels(p, st))
            people.append(p)
            states.append(st)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    y = {h: torch.tensor([lab[h] for lab in labs]) for h in HEADS}
    return x, y, people, states
