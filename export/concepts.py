"""What the bundled captioner is trained to say: ImageNet classes, their coarse
groups, and the rule turning what the vision graph sees (the classifier's top-k over the whole
photo and over four regions, and the faces found) into an English sentence: articles, mass
nouns and plurals, hedging when the classifier is unsure, people and their count, the other
objects the regions are sure of.

The rule only writes *training targets*. At run time the trained decoder produces
captions token by token from the encoder's top-k; nothing here ships to the runtime.
"""

import re
from functools import lru_cache

import numpy as np

TOP_K = 5  # classes per whole photo
REGIONS, REGION_TOP_K = 4, 3  # the photo's quadrants (export.encoder.region_logits), classes each
FACES = 3  # face slots (export.faces)
PERSON_P = 0.95  # a face slot at this probability or more is a person; below it, a look-alike
THRESHOLD_FACE = 0.7  # the detector's last stage: weaker faces are zeros (export.faces)
MAIN_SURE = 0.5  # the whole photo's top class (or its group's mass) at this or more is named unhedged
REGION_SURE = 0.7  # a region's top class at this probability or more is an object in the photo
EXTRAS = 2  # objects named besides the main one
WORN_SURE = 0.3  # one person and nothing else named: a worn class at this probability or more is what they wear
# The hedges of `describe` when the main class is unsure: its group's runner-up counts from SECOND_SURE;
# the top two from PAIR_SURE together; the top class alone from MAY_SHOW ("may show"), else "unclear".
SECOND_SURE, PAIR_SURE, MAY_SHOW = 0.1, 0.5, 0.2
# describe's sentence forms, in the order `form` numbers them.
FORMS = ("sure", "group, either", "group, perhaps", "pair", "may show", "unclear")
# What people wear: with a face in the photo, the classifier's answer is the person's clothes.
WORN = frozenset({
    "abaya", "academic gown", "apron", "bow tie", "brassiere", "bulletproof vest", "cardigan", "cowboy hat",
    "feather boa", "fur coat", "gown", "jean", "jersey", "kimono", "lab coat", "tank suit", "maillot",
    "miniskirt", "military uniform", "mortarboard", "overskirt", "pajama", "poncho", "sarong", "sombrero",
    "suit", "sunglasses", "sunglass", "sweatshirt", "swimming trunks", "trench coat", "vestment", "wig",
    "bikini", "bonnet", "crash helmet", "football helmet", "shower cap", "stole", "cloak", "hoopskirt",
    "ski mask", "gasmask", "oxygen mask", "necklace", "hair slide", "lipstick", "windsor tie", "bolo tie",
    "bathing cap", "mask", "neck brace", "chain mail", "breastplate", "cuirass", "pickelhaube",
})

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
    # Where ImageNet splits one kind of thing over siblings that a photo's mass spreads across (a
    # town's houses as monastery 0.23, castle 0.20, bell cote 0.11): the kind is what is sure.
    "building": [425, 442, 449, 483, 497, 498, 500, 538, 580, 624, 663, 668, 698, 727, 743, 762,
                 832, 853, 858],
    "bridge": [821, 839, 888],
    "shop": [415, 424, 454, 467, 509, 582, 788, 860, 865],
    "clock": [409, 530, 892],
    "bottle": [440, 720, 737, 898, 907],
    "chair": [423, 559, 765, 857],
    "telephone": [487, 528, 707],
    "computer": [527, 590, 620, 681],
    "camera": [732, 759],
    "shoe": [502, 514, 630, 770, 774],
    "fence": [489, 716, 912],
    # Hand tools: ImageNet has no pliers, scissors or wrench, and a photo of one spreads its mass over
    # the tools it has (scissors as letter opener 0.37, can opener 0.19, corkscrew 0.05).
    "tool": [473, 477, 491, 512, 587, 596, 600, 623, 726, 740, 769, 784, 792],
    "kitchen utensil": [499, 618, 647, 813, 828, 910],
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
def group_members() -> dict[str, tuple[int, ...]]:
    members: dict[str, list[int]] = {}
    for i, g in enumerate(class_groups()):
        if g:
            members.setdefault(g, []).append(i)
    return {g: tuple(m) for g, m in members.items()}


@lru_cache(maxsize=1)
def worn_ids() -> tuple[int, ...]:
    """The classes of WORN, in id order; by id, as "cardigan" is also a dog (worn things are in no group)."""
    return tuple(i for i, (n, g) in enumerate(zip(class_names(), class_groups())) if n in WORN and g is None)


@lru_cache(maxsize=1)
def _class_pattern() -> re.Pattern:
    names = sorted(set(class_names()), key=len, reverse=True)  # longest first: "tiger cat" before "cat"
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")


def named_classes(caption: str) -> list[str]:
    """The ImageNet classes a caption names, in order ("perhaps a malamute or a husky" -> malamute, husky)."""
    return _class_pattern().findall(caption.lower())


def primary_concept(caption: str) -> str | None:
    """The first ImageNet class a caption names ("perhaps a malamute or a husky" -> "malamute"):
    what two captions that differ in wording must share to say the same thing."""
    return next(iter(named_classes(caption)), None)


def with_article(noun: str) -> str:
    if noun in MASS_NOUNS or noun in PLURAL_NOUNS:
        return noun
    vowel = noun[0] in "aeiou" and not noun.startswith(CONSONANT_SOUNDING)
    return ("an " if vowel else "a ") + noun


def listed(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def people(count: int) -> str:
    return {1: "a person", 2: "two people"}.get(count, "a group of people")


def form(ids, probs) -> int:
    """Which of `describe`'s sentences a top-k classifier output gets, as an index into FORMS."""
    groups = class_groups()
    (p1, p2), g = probs[:2], groups[ids[0]]
    group_mass = sum(p for c, p in zip(ids, probs) if groups[c] == g) if g else p1
    if p1 >= MAIN_SURE:
        return 0
    if g and group_mass >= MAIN_SURE:
        return 1 if groups[ids[1]] == g and p2 >= SECOND_SURE else 2
    if p1 + p2 >= PAIR_SURE:
        return 3
    return 4 if p1 >= MAY_SHOW else 5


def describe(ids, probs) -> str:
    """What a top-k classifier output alone says, sorted by probability."""
    names, groups = class_names(), class_groups()
    f1, g = names[ids[0]], groups[ids[0]]
    a1, a2 = with_article(f1), with_article(names[ids[1]])
    sentence = FORMS[form(ids, probs)]
    if sentence == "sure":
        return f"a photo of {a1}" + (f", a kind of {g}" if g and g not in f1 else "")
    if sentence.startswith("group"):
        hedge = f"either {a1} or {a2}" if sentence == "group, either" else f"perhaps {a1}"
        return f"a photo of {with_article(g)}, {hedge}"
    return {"pair": f"a photo of {a1} or {a2}", "may show": f"a photo that may show {a1}",
            "unclear": f"an unclear photo, perhaps {a1} or {a2}"}[sentence]


def sure_of(ids, probs) -> str | None:
    """The main object when the classifier is sure of it (as `describe` names it without a hedge):
    the class at p >= 0.5, else its group when the group holds half the mass (`form`'s first three)."""
    sentence = form(ids, probs)
    if sentence == 0:
        return class_names()[ids[0]]
    return class_groups()[ids[0]] if sentence <= 2 else None


def scene_objects(ids, probs, region_ids, region_probs, with_people: bool) -> list[str]:
    """The objects a caption names, main first: the whole photo's if sure, then (up to 1 + EXTRAS in all)
    from regions sure of their top class (named by its group, once per group), most sure first.
    With people, what they wear is no object. Without people, one region's object alone is not said:
    the sentence is then what the whole photo's classes say (`describe`)."""
    names, groups = class_names(), class_groups()
    main = sure_of(ids, probs)
    named = [main] if main and not (with_people and ids[0] in worn_ids()) else []
    nouns = {groups[ids[0]] or names[ids[0]]} if main else set()
    for r in np.argsort(-region_probs[:, 0], kind="stable"):
        c, p = region_ids[r, 0], region_probs[r, 0]
        noun = groups[c] or names[c]
        if p < REGION_SURE or len(named) == 1 + EXTRAS:
            break
        if noun in nouns or (with_people and c in worn_ids()):
            continue
        nouns.add(noun)
        named.append(noun)
    return [] if not with_people and not main and len(named) == 1 else named


def wearing(ids, probs, count: int, objects: list[str]) -> bool:
    """Whether the caption says what one person wears: the whole photo's top class, when it is worn
    and nothing else is named."""
    return count == 1 and not objects and ids[0] in worn_ids() and probs[0] >= WORN_SURE


def describe_scene(ids, probs, region_ids, region_probs, faces) -> str:
    """Training target for what the vision graph sees: people first (with what they hold or wear),
    then the objects; a photo with one object and no people gets `describe`'s sentence."""
    count = int((faces[:, 0] >= PERSON_P).sum())
    objects = scene_objects(ids, probs, region_ids, region_probs, count > 0)
    things = [with_article(o) for o in objects]
    if count:
        if things:
            return f"a photo of {people(count)} with {listed(things)}"
        if wearing(ids, probs, count, objects):
            return f"a photo of a person wearing {with_article(class_names()[ids[0]])}"
        return f"a photo of {people(count)}"
    if len(things) < 2:
        return describe(ids, probs)
    return f"a photo of {listed(things)}"


# A quarter of the training examples are what the classifier says about images that are no
# photos (diagrams, charts, icons, noise): without them the decoder looped on such outputs
# ("a photo of an envelope or an an an ...": a runner-up it had never met in that position).
ODD_SHARE = 0.25
# The rest: photos of one object, of several, and of people (with what they wear, hold or stand by).
SCENES = {"one": 0.25, "several": 0.3, "people": 0.2}
Signals = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ids, probs, region ids/probs, faces


def odd_distribution(rng: np.random.Generator, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """k unrelated classes, nearly flat. Shaped on EfficientNet-Lite0's outputs for 520 such
    images (benchmarks/odd_images.py): top-1 median 0.08 (10% below 0.012, 10% above 0.5), top-5
    mass median 0.22."""
    ids = rng.choice(1000, k, replace=False)
    p1 = np.exp(rng.uniform(np.log(0.01), np.log(0.6)))
    probs = np.concatenate([[p1], p1 * np.sort(rng.uniform(0.05, 1.0, k - 1))[::-1]])
    probs *= min(1.0, 0.98 / probs.sum())
    return ids, probs.astype(np.float32)


def class_distribution(rng: np.random.Generator, primary: int, k: int = TOP_K,
                       others: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A top-k output shaped like a real classifier's for a photo of `primary`: runners-up mostly
    from its group or its ImageNet neighbours (similar classes sit together), or the photo's
    `others`; probabilities from confident to nearly flat."""
    group = class_groups()[primary]
    same_group = [i for i in group_members()[group] if i != primary] if group else []
    ids = [primary]
    while len(ids) < k:
        r = rng.random()
        if others and r < 0.3:
            c = int(rng.choice(others))
        elif same_group and r < 0.6:
            c = int(rng.choice(same_group))
        elif r < 0.8:
            c = int(np.clip(primary + rng.integers(-6, 7), 0, 999))
        else:
            c = int(rng.integers(1000))
        if c not in ids:
            ids.append(c)
    # Probabilities: the primary's mass, then the rest split by a random stick-break.
    p1 = rng.beta(1.0, 1.0) * 0.97 + 0.02
    rest = (1 - p1) * rng.beta(2.0, 1.0)
    tail = rng.dirichlet(np.full(k - 1, 0.6)) * rest
    probs = np.concatenate([[p1], np.minimum(np.sort(tail)[::-1], p1)])
    order = np.argsort(-probs, kind="stable")
    return np.asarray(ids)[order], probs[order].astype(np.float32)


def sample_scene(rng: np.random.Generator) -> Signals:
    """What the vision graph could see: a non-photo, one object, several, or people; each region
    shows one of the photo's objects, or background (any class, mostly unsure); faces below
    PERSON_P (look-alikes) in a fifth of the photos."""
    kind = rng.choice(["odd", *SCENES], p=[ODD_SHARE, *SCENES.values()])
    faces = np.zeros((FACES, 2), np.float32)
    if kind == "odd":
        ids, probs = odd_distribution(rng)
        regions = [odd_distribution(rng, REGION_TOP_K) for _ in range(REGIONS)]
    else:
        count = {"one": 1, "several": int(rng.integers(2, 4)), "people": int(rng.integers(0, 3))}[kind]
        objects = tuple(int(c) for c in rng.choice(1000, count, replace=False))
        if kind == "people":
            n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
            faces[:n, 0] = rng.uniform(PERSON_P, 1.0, n)
            faces[:n, 1] = rng.uniform(0.09, 0.6, n)
            objects = (int(rng.choice(worn_ids())), *objects) if rng.random() < 0.5 or not objects else objects
        ids, probs = class_distribution(rng, objects[0], TOP_K, objects[1:])
        regions = []
        for _ in range(REGIONS):
            shown = int(rng.integers(len(objects) + 1))
            if shown < len(objects):
                regions.append(class_distribution(rng, objects[shown], REGION_TOP_K, objects))
            else:
                background = class_distribution(rng, int(rng.integers(1000)), REGION_TOP_K)
                regions.append((background[0], background[1] * rng.uniform(0.2, 1.0)))
    looks_alike = int((faces[:, 0] > 0).sum())
    if looks_alike < FACES and rng.random() < 0.2:
        faces[looks_alike] = rng.uniform(THRESHOLD_FACE, PERSON_P), rng.uniform(0.09, 0.5)
    faces = faces[np.argsort(-faces[:, 0], kind="stable")]
    region_ids, region_probs = (np.stack(x) for x in zip(*regions))
    return ids, probs, region_ids, region_probs.astype(np.float32), faces
