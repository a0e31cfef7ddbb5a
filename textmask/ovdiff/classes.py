"""Which class names are stuff (amorphous regions) and which are things, for OVDiff's background rules.

The built-in stuff list covers COCO-Stuff's 91 stuff classes (suffixes such as "-other" dropped) and the
stuff classes of Pascal Context's 59; any other name is a thing. ``"tree:thing"`` / ``"sky:stuff"`` in a
class list, or ``overrides`` in the API, set it per class.
"""

from __future__ import annotations

STUFF = frozenset("""
banner blanket branch bridge building bush cabinet cage cardboard carpet ceiling ceiling-tile cloth clothes
clouds counter cupboard curtain desk dirt door fence floor marble-floor stone-floor tile-floor wood-floor flower
fog food fruit furniture grass gravel ground hill house leaves light mat metal mirror moss mountain mud napkin
net paper pavement pillow plant plastic platform playingfield railing railroad river road rock roof rug salad
sand sea shelf sky skyscraper snow solid stairs stone straw structural table tent textile towel tree vegetable
wall brick-wall concrete-wall wall-panel stone-wall tile-wall wood-wall water waterdrops window-blind window
wood bedclothes shelves sidewalk track grassland field lake forest
""".split())


def parse_class(spec: str) -> tuple[str, bool | None]:
    """ "sky:stuff" -> ("sky", True), "tree:thing" -> ("tree", False), "cat" -> ("cat", None)."""
    name, _, kind = spec.strip().rpartition(":") if spec.strip().endswith((":stuff", ":thing")) else (spec.strip(), "", "")
    return name.strip(), {"stuff": True, "thing": False}.get(kind)


def is_stuff(name: str, override: bool | None = None) -> bool:
    """Whether a class counts as stuff: the override if given, else the built-in list (the whole name; spaces match hyphens)."""
    if override is not None:
        return override
    key = name.strip().lower()
    return key.replace(" ", "-") in STUFF or key in STUFF
