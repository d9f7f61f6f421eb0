"""What the bundled captioner is trained to say: ImageNet classes, their coarse
groups, and the rule turning a classifier's top-k distribution into an English
sentence (articles, mass nouns and plurals, hedging when the classifier is unsure).

The rule only writes *training targets*. At run time the trained decoder produces
captions token by token from the encoder's top-k; nothing here ships to the runtime.
"""

import re
from functools import lru_cache

import numpy as np

TOP_K = 5

# Coarse group noun per ImageNet index range (the class list follows WordNet order).
GROUP_RANGES = [
    (0, 1, "fish"), (2, 4, "shark"), (5, 6, "fish"), (7, 24, "bird"), (25, 29, "amphibian"),
    (30, 32, "frog"), (33, 37, "turtle"), (38, 48, "lizard"), (49, 50, "reptile"),
    (52, 68, "snake"), (72, 77, "spider"), (80, 100, "bird"), (101, 101, "elephant"),
    (118, 126, "crustacean"), (127, 146, "bird"), (147, 148, "whale"), (151, 268, "dog"),
    (269, 272, "wolf"), (273, 275, "wild dog"), (277, 280, "fox"), (281, 285, "cat"),
    (286, 293, "big cat"), (294, 297, "bear"), (300, 320, "insect"), (321, 326, "butterfly"),
    (330, 332, "rabbit"), (333, 338, "rodent"), (341, 343, "pig"), (345, 347, "cattle"),
    (351, 353, "antelope"), (356, 361, "mustelid"), (365, 369, "ape"), (370, 382, "monkey"),
    (383, 384, "lemur"), (385, 386, "elephant"), (387, 388, "panda"), (389, 397, "fish"),
    (924, 935, "dish"), (936, 946, "vegetable"), (948, 957, "fruit"), (959, 965, "dish"),
    (966, 967, "drink"), (969, 969, "drink"), (970, 980, "landscape"), (985, 986, "flower"),
    (991, 997, "mushroom"),
]
GROUP_MEMBERS = {
    "car": [407, 436, 468, 511, 609, 627, 656, 661, 717, 734, 751, 817],
    "bus": [654, 779, 874],
    "truck": [555, 569, 675, 864, 867],
    "boat": [403, 472, 484, 510, 554, 576, 625, 628, 780, 814, 871, 914],
    "aircraft": [404, 405, 895],
    "train": [466, 547, 565, 705, 820, 829],
    "musical instrument": [401, 402, 420, 432, 486, 513, 541, 546, 558, 566, 577, 579, 593,
                           594, 641, 642, 683, 684, 687, 699, 776, 822, 875, 889],
}
# Names read without an article ("a photo of espresso", "a photo of sunglasses").
MASS_NOUNS = {
    "guacamole", "consomme", "hot pot", "trifle", "ice cream", "mashed potato", "broccoli",
    "cauliflower", "hay", "carbonara", "chocolate sauce", "dough", "meat loaf", "red wine",
    "espresso", "eggnog", "toilet tissue", "corn", "rapeseed", "wool", "velvet", "chain mail",
    "brass", "paper towel", "hair spray", "face powder", "lotion", "sunscreen", "honeycomb",
}
PLURAL_NOUNS = {"sunglasses", "binoculars", "parallel bars", "swimming trunks", "jean"}
# "an" before a vowel letter, except where the vowel sounds like "you"/"one".
CONSONANT_SOUNDING = ("eu", "uni", "use", "one", "ukulele")


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """ImageNet class names shipped in torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    names = [n.lower() for n in ResNet50_Weights.IMAGENET1K_V1.meta["categories"]]
    names[639] = "tank suit"  # "maillot" twice in the list: keep the two classes apart
    return tuple(names)


@lru_cache(maxsize=1)
def class_groups() -> tuple[str | None, ...]:
    groups: list[str | None] = [None] * 1000
    for lo, hi, noun in GROUP_RANGES:
        groups[lo : hi + 1] = [noun] * (hi - lo + 1)
    for noun, members in GROUP_MEMBERS.items():
        for i in members:
            groups[i] = noun
    return tuple(groups)


@lru_cache(maxsize=1)
def _class_pattern() -> re.Pattern:
    names = sorted(set(class_names()), key=len, reverse=True)  # longest first: "tiger cat" before "cat"
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")


def primary_concept(caption: str) -> str | None:
    """The first ImageNet class a caption names ("perhaps a malamute or a husky" -> "malamute"):
    what two captions that differ in wording must share to say the same thing."""
    found = _class_pattern().search(caption.lower())
    return found.group(1) if found else None


def with_article(noun: str) -> str:
    if noun in MASS_NOUNS or noun in PLURAL_NOUNS:
        return noun
    vowel = noun[0] in "aeiou" and not noun.startswith(CONSONANT_SOUNDING)
    return ("an " if vowel else "a ") + noun


def describe(ids, probs) -> str:
    """Training target for a top-k classifier output, sorted by probability."""
    names, groups = class_names(), class_groups()
    (c1, c2), (p1, p2) = ids[:2], probs[:2]
    f1, f2, g = names[c1], names[c2], groups[c1]
    group_mass = sum(p for c, p in zip(ids, probs) if groups[c] == g) if g else p1
    if p1 >= 0.5:
        kind = f", a kind of {g}" if g and g not in f1 else ""
        return f"a photo of {with_article(f1)}{kind}"
    if g and group_mass >= 0.5:
        if groups[c2] == g and p2 >= 0.1:
            return f"a photo of {with_article(g)}, either {with_article(f1)} or {with_article(f2)}"
        return f"a photo of {with_article(g)}, perhaps {with_article(f1)}"
    if p1 + p2 >= 0.5:
        return f"a photo of {with_article(f1)} or {with_article(f2)}"
    if p1 >= 0.2:
        return f"a photo that may show {with_article(f1)}"
    return f"an unclear photo, perhaps {with_article(f1)} or {with_article(f2)}"


# A quarter of the training examples are what the classifier says about images that are no
# photos (diagrams, charts, icons, noise): without them the decoder looped on such outputs
# ("a photo of an envelope or an an an ...": a runner-up it had never met in that position).
ODD_SHARE = 0.25


def odd_distribution(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Five unrelated classes, nearly flat. Shaped on EfficientNet-Lite0's outputs for 520 such
    images (benchmarks/odd_images.py): top-1 median 0.08 (10% below 0.012, 10% above 0.5), top-5
    mass median 0.22."""
    ids = rng.choice(1000, TOP_K, replace=False)
    p1 = np.exp(rng.uniform(np.log(0.01), np.log(0.6)))
    probs = np.concatenate([[p1], p1 * np.sort(rng.uniform(0.05, 1.0, TOP_K - 1))[::-1]])
    probs *= min(1.0, 0.98 / probs.sum())
    return ids, probs.astype(np.float32)


def sample_distribution(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A top-k output shaped like a real classifier's: one primary class, runners-up
    mostly from its group or its ImageNet neighbours (similar classes sit together),
    probabilities from confident to nearly flat; or, ODD_SHARE of the time, a non-photo's."""
    if rng.random() < ODD_SHARE:
        return odd_distribution(rng)
    groups = class_groups()
    primary = int(rng.integers(1000))
    same_group = [i for i in range(1000) if groups[i] == groups[primary] and i != primary] if groups[primary] else []
    ids = [primary]
    while len(ids) < TOP_K:
        r = rng.random()
        if same_group and r < 0.5:
            c = int(rng.choice(same_group))
        elif r < 0.75:
            c = int(np.clip(primary + rng.integers(-6, 7), 0, 999))
        else:
            c = int(rng.integers(1000))
        if c not in ids:
            ids.append(c)
    # Probabilities: the primary's mass, then the rest split by a random stick-break.
    p1 = rng.beta(1.0, 1.0) * 0.97 + 0.02
    rest = (1 - p1) * rng.beta(2.0, 1.0)
    tail = rng.dirichlet(np.full(TOP_K - 1, 0.6)) * rest
    probs = np.concatenate([[p1], np.minimum(np.sort(tail)[::-1], p1)])
    order = np.argsort(-probs, kind="stable")
    return np.asarray(ids)[order], probs[order].astype(np.float32)
