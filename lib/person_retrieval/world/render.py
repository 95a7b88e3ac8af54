"""A fast procedural renderer of pedestrian crops (numpy only, no randomness inside).

Everything random about an image lives in its :class:`State` (pose, viewpoint, scene, lighting, camera
resolution, jitter), drawn once by :func:`sample_state`; :func:`render` is then a pure function of
``(person, state, height)``, so any image can be re-rendered exactly from its record.

Drawing is rectangle and mask slicing on a float32 canvas; the figure is laid out in units of the
image height (crops are 2:1 height:width, as pedestrian crops are).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .attributes import HAIR_COLORS, PALETTE, SKIN_TONES, Person

SCENES = ["street", "campus", "mall", "park", "station", "parking"]
#: Not a dataset scene: the plain, clean backdrop the generators are pretrained on.
STUDIO = "studio"
POSES = ["standing", "walking"]
VIEWS = ["front", "back", "side"]
RES_FACTORS = (1, 2, 4)


@dataclass(frozen=True)
class State:
    """How one image of a person was taken."""

    pose: str = "standing"
    view: str = "front"
    facing: int = 1  # side view: +1 faces right, -1 faces left
    scene: str = "street"
    brightness: float = 1.0
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    res_factor: int = 1  # camera resolution: 1 sharp, 2 or 4 = downsampled then upsampled
    dx: float = 0.0  # horizontal jitter, fraction of width
    bg_offset: float = 0.0  # which part of the scene panorama is behind the person, in [0, 1)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CameraProfile:
    """The distribution of image states in one domain (dataset style)."""

    scenes: tuple[str, ...] = tuple(SCENES)
    view_p: tuple[float, float, float] = (0.45, 0.35, 0.20)
    walk_p: float = 0.5
    res_p: tuple[float, float, float] = (0.5, 0.35, 0.15)
    brightness: tuple[float, float] = (0.75, 1.2)
    cast_sd: float = 0.05


def sample_state(rng: np.random.Generator, profile: CameraProfile = CameraProfile(), view: str | None = None) -> State:
    v = view or VIEWS[int(rng.choice(3, p=np.asarray(profile.view_p) / sum(profile.view_p)))]
    res = RES_FACTORS[int(rng.choice(3, p=np.asarray(profile.res_p) / sum(profile.res_p)))]
    cast = tuple(float(c) for c in np.clip(1.0 + rng.normal(0, profile.cast_sd, 3), 0.8, 1.2))
    return State(
        pose="walking" if rng.random() < profile.walk_p else "standing",
        view=v,
        facing=1 if rng.random() < 0.5 else -1,
        scene=profile.scenes[int(rng.integers(len(profile.scenes)))],
        brightness=float(rng.uniform(*profile.brightness)),
        cast=cast,  # type: ignore[arg-type]
        res_factor=res,
        dx=float(rng.uniform(-0.07, 0.07)),
        bg_offset=float(rng.random()),
    )


# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _rgb(name: str, shade=(0.0, 0.0, 0.0)) -> np.ndarray:
    return np.clip(np.asarray(PALETTE[name][0], np.float32) + np.asarray(shade, np.float32), 0, 1)


@lru_cache(maxsize=64)
def _panorama(scene: str, h: int, w: int) -> np.ndarray:
    """A scene three crops wide, built once per (scene, size) from a fixed seed."""
    W = 3 * w
    img = np.empty((h, W, 3), np.float32)
    if scene == STUDIO:  # a plain backdrop (the generators' pretraining world), not a dataset scene
        img[:] = (0.86, 0.86, 0.84)
        return img
    rng = np.random.default_rng(SCENES.index(scene) + 11)
    horizon = int(h * {"street": 0.55, "campus": 0.6, "mall": 0.62, "park": 0.5, "station": 0.6, "parking": 0.55}[scene])
    top, ground = {
        "street": ((0.62, 0.60, 0.58), (0.36, 0.36, 0.38)),
        "campus": ((0.62, 0.38, 0.30), (0.38, 0.58, 0.30)),
        "mall": ((0.86, 0.84, 0.78), (0.72, 0.70, 0.66)),
        "park": ((0.50, 0.66, 0.84), (0.30, 0.52, 0.24)),
        "station": ((0.48, 0.50, 0.55), (0.30, 0.30, 0.32)),
        "parking": ((0.70, 0.72, 0.74), (0.44, 0.44, 0.44)),
    }[scene]
    img[:horizon] = top
    img[horizon:] = ground
    # Structure: windows, trees, pillars or parked cars, so backgrounds are not flat.
    n = 10
    for i in range(n):
        x0 = int(rng.integers(0, W - 4))
        bw = int(rng.integers(max(2, w // 12), max(3, w // 4)))
        y1 = horizon
        y0 = int(rng.integers(0, max(1, horizon - h // 8)))
        col = np.clip(np.asarray(top) + rng.normal(0, 0.12, 3), 0, 1)
        if scene == "park":
            col = np.array([0.15, 0.40 + 0.2 * rng.random(), 0.15])
        img[y0:y1, x0:x0 + bw] = col
    # Ground texture: tiles or lane marks.
    step = max(2, h // 16)
    img[horizon::step, :] *= 0.9
    return img


@lru_cache(maxsize=16)
def _noise(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(7).normal(0, 0.025, size=(h, 3 * w, 3)).astype(np.float32)


@lru_cache(maxsize=64)
def _ellipse(hh: int, ww: int) -> np.ndarray:
    y, x = np.ogrid[:hh, :ww]
    cy, cx = (hh - 1) / 2, (ww - 1) / 2
    return ((y - cy) / max(hh / 2, 0.5)) ** 2 + ((x - cx) / max(ww / 2, 0.5)) ** 2 <= 1.0


class _Canvas:
    """Drawing helpers in units of the image height (y and x both measured in H)."""

    def __init__(self, img: np.ndarray, cx: float):
        self.img = img
        self.h, self.w = img.shape[:2]
        self.cx = cx

    def box(self, x0, y0, x1, y1, color, step_y: int = 0, step_x: int = 0):
        h = self.h
        x0, x1 = min(x0, x1), max(x0, x1)
        a, b = int(round(y0 * h)), int(round(y1 * h))
        c, d = int(round(self.cx + x0 * h)), int(round(self.cx + x1 * h))
        a, c = max(a, 0), max(c, 0)
        b, d = min(max(b, a + 1), h), min(max(d, c + 1), self.w)
        if a >= h or c >= self.w:
            return
        if step_y:
            self.img[a:b:step_y, c:d] = color
        if step_x:
            self.img[a:b, c:d:step_x] = color
        if not step_y and not step_x:
            self.img[a:b, c:d] = color

    def oval(self, x0, y0, x1, y1, color, lower_half_only=False):
        h = self.h
        a, b = int(round(y0 * h)), int(round(y1 * h))
        c, d = int(round(self.cx + x0 * h)), int(round(self.cx + x1 * h))
        b, d = max(b, a + 1), max(d, c + 1)
        m = _ellipse(b - a, d - c)
        if lower_half_only:
            m = m.copy()
            m[: (b - a) // 2] = False
        # clip to canvas
        ya, yb, xa, xb = max(a, 0), min(b, h), max(c, 0), min(d, self.w)
        if ya >= yb or xa >= xb:
            return
        sub = m[ya - a: yb - a, xa - c: xb - c]
        self.img[ya:yb, xa:xb][sub] = color


_BUILD_HALF = {"slim": 0.070, "average": 0.085, "heavy": 0.105}


def camera_resolution(img: np.ndarray, r: int) -> np.ndarray:
    """A camera ``r`` times coarser: each ``r x r`` block of the float image ``(H, W, 3)`` averaged (the
    sensor's pixel), stored back at full size with a 2-tap smoothing (the camera's upscaler). ``r = 1``
    returns a copy."""
    h, w = img.shape[:2]
    if r < 1 or h % r or w % r:
        raise ValueError(f"a camera factor must divide the image size {h}x{w}, got {r}")
    img = np.asarray(img, np.float32)
    if r == 1:
        return img.copy()
    # Block mean by strided adds (much faster than ndarray.mean over the small axes).
    blocks = img.reshape(h // r, r, w // r, r, 3)
    rows = blocks[:, 0].copy()
    for k in range(1, r):
        rows += blocks[:, k]
    small = rows[:, :, 0].copy()
    for k in range(1, r):
        small += rows[:, :, k]
    small *= np.float32(1.0 / (r * r))
    out = np.repeat(np.repeat(small, r, axis=0), r, axis=1)
    out[1:] = (out[1:] + out[:-1]) * 0.5
    out[:, 1:] = (out[:, 1:] + out[:, :-1]) * 0.5
    return out


def render(person: Person, state: State, height: int = 128, backdrop: np.ndarray | None = None) -> np.ndarray:
    """Render one crop as uint8 ``(height, height // 2, 3)``. ``backdrop`` (float ``(height, height // 2,
    3)`` in [0, 1]) replaces the scene behind the person: the generators' studio uses plain ones."""
    h, w = height, height // 2
    if backdrop is not None:
        if backdrop.shape != (h, w, 3):
            raise ValueError(f"a backdrop must be {(h, w, 3)} for height {height}, got {backdrop.shape}")
        img = np.asarray(backdrop, np.float32).copy()
    else:
        pano = _panorama(state.scene, h, w)
        off = int(state.bg_offset * 2 * w)
        img = pano[:, off: off + w].copy()
    cv = _Canvas(img, cx=w / 2 + state.dx * w)
    view, walking = state.view, state.pose == "walking"
    side = view == "side"
    f = state.facing
    sh = person.shade
    skin = np.asarray(SKIN_TONES[person.skin], np.float32)
    hair = np.asarray(HAIR_COLORS[person.hair_color], np.float32)
    up = _rgb(person.upper_color, sh)
    pat = _rgb(person.pattern_color, sh)
    lo = _rgb(person.lower_color, sh)
    shoe = _rgb(person.shoes_color, sh)
    half = _BUILD_HALF[person.build] * (0.62 if side else 1.0)
    torso_bottom = 0.62 if person.upper_type == "coat" else 0.53

    # Backpack seen from the side sits behind the torso: draw it first.
    if person.bag == "backpack" and side:
        cv.box(-f * (half + 0.05), 0.22, -f * half, 0.45, _rgb(person.bag_color, sh))
    # Long hair behind the shoulders (front view).
    if person.hair_style == "long" and view == "front":
        cv.box(-0.055, 0.08, 0.055, 0.27, hair)

    # Legs.
    leg_w = half * 0.55
    spread = 0.03 if walking else 0.0
    if side:
        legs = [(-leg_w / 2 + spread * f, -leg_w / 2 + spread * f + leg_w), (-leg_w / 2 - spread * f, -leg_w / 2 - spread * f + leg_w)]
    else:
        gap = 0.008 + spread * 0.5
        legs = [(-gap - leg_w, -gap), (gap, gap + leg_w)]
    lower_end = {"trousers": 0.90, "jeans": 0.90, "shorts": 0.68, "skirt": 0.70}[person.lower_type]
    for x0, x1 in legs:
        cv.box(x0, 0.52, x1, 0.91, skin)
        if person.lower_type in ("trousers", "jeans"):
            cv.box(x0, 0.52, x1, lower_end, lo)
            if person.lower_type == "jeans":
                cv.box(x0 + leg_w * 0.45, 0.55, x0 + leg_w * 0.55, lower_end, lo * 0.75)
        elif person.lower_type == "shorts":
            cv.box(x0, 0.52, x1, lower_end, lo)
        # Shoes.
        toe = 0.02 * f if side else 0.0
        top = 0.84 if person.shoes_type == "boots" else 0.90
        if person.shoes_type == "sandals":
            cv.box(x0 + min(toe, 0), 0.90, x1 + max(toe, 0), 0.95, skin)
            cv.box(x0 + min(toe, 0), 0.91, x1 + max(toe, 0), 0.95, shoe, step_y=2)
        else:
            cv.box(x0 + min(toe, 0) - 0.004, top, x1 + max(toe, 0) + 0.004, 0.95, shoe)
            if person.shoes_type == "leather shoes":
                cv.box(x0, 0.90, x1, 0.915, shoe * 0.6)
    if person.lower_type == "skirt":
        for i, (y0, y1) in enumerate(((0.52, 0.58), (0.58, 0.64), (0.64, 0.70))):
            grow = 0.012 * (i + 1)
            cv.box(-half - grow * 0.5, y0, half + grow * 0.5, y1, lo)

    # Torso and sleeves.
    arm_w = 0.028
    short_sleeve = person.upper_type == "t-shirt"
    arm_xs = [(-half - arm_w, -half), (half, half + arm_w)] if not side else [(-arm_w / 2 + 0.01 * f, arm_w / 2 + 0.01 * f)]
    swing = 0.03 if walking else 0.0
    for i, (x0, x1) in enumerate(arm_xs):
        dy = swing if i == 0 else -swing
        cv.box(x0, 0.20, x1, 0.50 + dy * 0.3, skin)
        cv.box(x0, 0.20, x1, (0.30 if short_sleeve else 0.48) + dy * 0.3, up)
    cv.box(-half, 0.195, half, torso_bottom, up)
    if side:  # the near arm over the torso
        x0, x1 = arm_xs[0]
        cv.box(x0, 0.21, x1, 0.30 if short_sleeve else 0.48, up * 0.85)
        cv.box(x0, 0.30 if short_sleeve else 0.48, x1, 0.50, skin)
    # Patterns.
    step = max(2, h // 24)
    if person.upper_pattern == "striped":
        cv.box(-half, 0.21, half, torso_bottom, pat, step_y=step)
    elif person.upper_pattern == "checked":
        cv.box(-half, 0.21, half, torso_bottom, pat, step_y=step, step_x=step)
    elif person.upper_pattern == "logo" and view == "front":
        cv.box(-0.03, 0.27, 0.03, 0.33, pat)
    # Garment details.
    if person.upper_type == "jacket" and view == "front":
        cv.box(-0.004, 0.20, 0.004, torso_bottom, up * 0.5)
    elif person.upper_type == "shirt" and view == "front":
        cv.box(-0.02, 0.195, 0.02, 0.215, np.minimum(up * 1.3, 1.0))
    elif person.upper_type == "hoodie" and view == "back":
        cv.box(-0.05, 0.18, 0.05, 0.24, up * 0.8)
    elif person.upper_type == "coat":
        cv.box(-half, 0.195, half, 0.215, up * 0.7)
    elif person.upper_type == "sweater":
        cv.box(-half, torso_bottom - 0.02, half, torso_bottom, up * 0.8)

    # Bags.
    bagc = _rgb(person.bag_color, sh)
    if person.bag == "backpack":
        if view == "back":
            cv.box(-half * 0.8, 0.22, half * 0.8, 0.45, bagc)
            cv.box(-half * 0.8, 0.30, half * 0.8, 0.31, bagc * 0.6)
        elif view == "front":
            cv.box(-half * 0.75, 0.195, -half * 0.55, 0.36, bagc)
            cv.box(half * 0.55, 0.195, half * 0.75, 0.36, bagc)
    elif person.bag == "shoulder bag":
        s = 1 if view != "side" else -f
        cv.box(s * (half - 0.004), 0.20, s * (half + 0.004), 0.44, bagc * 0.8)
        cv.box(s * half, 0.42, s * (half + 0.06), 0.52, bagc)
    elif person.bag == "handbag":
        x = -half - arm_w if not side else 0.0
        cv.box(x - 0.035, 0.47, x + 0.01, 0.55, bagc)

    # Held items (right hand from the viewer, or the near hand in side view).
    hx = half + arm_w / 2 if not side else 0.02 * f
    if person.held == "umbrella":
        cv.box(hx - 0.006, 0.36, hx + 0.006, 0.80, _rgb("black"))
        cv.box(hx - 0.012, 0.36, hx + 0.012, 0.66, _rgb(person.hat_color if person.hat == "none" else "navy", sh))
    elif person.held == "phone":
        cv.box(-0.02 if not side else hx - 0.015, 0.40, 0.005 if not side else hx + 0.01, 0.45, _rgb("black"))
    elif person.held == "paper bag":
        cv.box(hx - 0.025, 0.48, hx + 0.035, 0.60, _rgb("khaki") * 0.9)
    elif person.held == "bottle":
        cv.box(hx - 0.01, 0.45, hx + 0.012, 0.53, np.array([0.5, 0.75, 0.95], np.float32))

    # Neck, head, hair, face.
    cv.box(-0.015, 0.17, 0.015, 0.20, skin)
    if person.accessory == "scarf":
        cv.box(-0.04, 0.175, 0.04, 0.215, pat)
    hx0 = -0.045 if not side else -0.04
    hx1 = 0.045 if not side else 0.04
    if view == "back" and person.hair_style != "bald":
        cv.oval(hx0, 0.055, hx1, 0.185, hair)
        if person.hair_style == "long":
            cv.box(-0.05, 0.11, 0.05, 0.27, hair)
        elif person.hair_style == "ponytail":
            cv.box(-0.012, 0.12, 0.012, 0.24, hair)
    else:
        cv.oval(hx0, 0.055, hx1, 0.185, skin)
        if person.hair_style in ("short", "long", "ponytail"):
            cv.oval(hx0, 0.050, hx1, 0.13, hair)
            cv.oval(hx0 + 0.01, 0.085, hx1 - 0.01, 0.135, skin, lower_half_only=True)
            if side:
                cv.box(-f * 0.045, 0.07, -f * 0.02, 0.14 if person.hair_style == "short" else 0.22, hair)
                if person.hair_style == "ponytail":
                    cv.box(-f * 0.06, 0.09, -f * 0.04, 0.20, hair)
        eye = np.array([0.05, 0.05, 0.05], np.float32)
        ex = [-0.018, 0.018] if not side else [0.02 * f]
        for x in ex:
            cv.box(x - 0.005, 0.115, x + 0.005, 0.125, eye)
        if person.accessory == "glasses":
            cv.box(min(ex) - 0.012, 0.110, max(ex) + 0.012, 0.128, np.array([0.02, 0.02, 0.02], np.float32))
        elif person.accessory == "face mask":
            mask = np.array([0.82, 0.90, 0.96], np.float32)
            cv.box(*((-0.035, 0.135, 0.035, 0.17) if not side else (0.0, 0.135, f * 0.04, 0.17)), mask)

    # Hats.
    hat = _rgb(person.hat_color, sh)
    if person.hat == "cap":
        cv.box(-0.047, 0.045, 0.047, 0.085, hat)
        if side:
            cv.box(0.0, 0.075, f * 0.07, 0.088, hat * 0.8)
        elif view == "front":
            cv.box(-0.05, 0.078, 0.05, 0.09, hat * 0.8)
    elif person.hat == "beanie":
        cv.oval(-0.05, 0.035, 0.05, 0.13, hat)
        cv.box(-0.05, 0.075, 0.05, 0.095, hat * 0.85)
    elif person.hat == "sun hat":
        cv.box(-0.035, 0.035, 0.035, 0.08, hat)
        cv.box(-0.085, 0.075, 0.085, 0.09, hat)

    # Light, sensor noise and camera resolution.
    nz = _noise(h, w)
    noff = int(state.bg_offset * 997) % (2 * w)
    gain = np.asarray(state.cast, np.float32) * np.float32(state.brightness)
    img *= gain
    if state.scene != STUDIO:  # the studio camera has no sensor noise
        img += nz[:, noff: noff + w]
    if state.res_factor > 1:
        img = camera_resolution(img, state.res_factor)
    np.clip(img, 0.0, 1.0, out=img)
    return (img * 255.0 + 0.5).astype(np.uint8)
