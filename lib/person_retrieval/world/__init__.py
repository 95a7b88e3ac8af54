"""The mini pedestrian world: people (:mod:`.attributes`), images (:mod:`.render`), language
(:mod:`.language`: captions in three dataset styles, dialogues, relative captions) and datasets written
in the real formats (:mod:`.build`)."""
from .attributes import OUTFIT_SLOTS, SLOT_VALUES, Person, sample_people, sample_person, visible_slots
from .build import FORMAT_NAMES, PROFILES, build_dataset, caption_coverage, dataset_root, read_world_meta, world_dataset
from .language import STYLES, caption, coverage, dialogue, edit_person, tokenize
from .render import CameraProfile, State, render, sample_state

__all__ = [
    "OUTFIT_SLOTS", "SLOT_VALUES", "Person", "sample_people", "sample_person", "visible_slots", "FORMAT_NAMES",
    "PROFILES", "build_dataset", "caption_coverage", "dataset_root", "read_world_meta", "world_dataset", "STYLES", "caption",
    "coverage", "dialogue", "edit_person", "tokenize", "CameraProfile", "State", "render", "sample_state",
]
