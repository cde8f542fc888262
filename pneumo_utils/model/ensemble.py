"""Several trained classifiers as one Keras model that averages their probabilities.

Why: models with different backbones (and seeds) make partly independent errors on a new
site's images, so their mean ranks those images better than most members do alone
(``RESULTS.md``). Built as one functional model with one image input, the ensemble is a
``.keras`` file like any other: ``predict``, ``evaluate``, ``calibrate``, the exports and
Grad-CAM (:func:`pneumo_utils.explain.gradcam.grad_cam` averages the members' maps) take it unchanged.

Each member keeps its own preprocessing (cue removal, backbone scaling) inside it; when its
input size differs from the ensemble's, a ``Resizing`` layer in front of it resizes the
image, as the prediction pipeline would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras

MEAN_LAYER = "ensemble_mean"
"""Name of the layer that averages the members' outputs; :func:`members_of` looks for it."""


def average(
    members: Sequence[keras.Model],
    image_size: int,
    name: str = "ensemble",
    sizes: Sequence[int | None] | None = None,
) -> keras.Model:
    """One model whose output is the mean of ``members``' outputs.

    ``members`` are Keras classifiers with the same output (one sigmoid unit, or the same
    softmax classes) and ``(n, s, s, 3)`` inputs in 0-255; ``image_size`` is the ensemble's
    input side. ``sizes`` gives each member's input side (``None``: read from its input); a
    member that accepts any size (``Input(shape=(None, None, 3))``) needs it, the side it was
    trained at (its sidecar's ``image_size``). Returns a model
    ``(n, image_size, image_size, 3) -> (n, units)``; the members' weights are shared with
    (not copied from) the models given. The members' tasks are not visible here: combine
    models of one task (``pneumo ensemble`` checks their sidecars).
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    units = {int(m.output.shape[-1]) for m in members}
    if len(units) != 1:
        raise ValueError(f"members have different outputs ({sorted(units)} units); average models "
                         "of one task only")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"member names must differ (they name the layers of the ensemble): {names}")
    sizes = list(sizes) if sizes is not None else [None] * len(members)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    outputs = []
    for member, given in zip(members, sizes, strict=True):
        member.trainable = False
        side = member.inputs[0].shape[1]
        if given is None and side is None:
            raise ValueError(
                f"member {member.name} accepts any input size; give the side it was trained at "
                "(its sidecar's image_size) in sizes"
            )
        size = int(given if given is not None else side)
        x = inputs if size == image_size else keras.layers.Resizing(size, size, name=f"{member.name}_resize")(inputs)
        outputs.append(member(x))
    mean = keras.layers.Average(name=MEAN_LAYER)(outputs)
    return keras.Model(inputs, mean, name=name)


def members_of(model: keras.Model) -> list[keras.Model]:
    """The member models of an ensemble made by :func:`average` (empty for any other model)."""
    try:
        model.get_layer(MEAN_LAYER)
    except ValueError:
        return []
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def load_members(names: Sequence[str], models_dir: str | Path, own: Sequence[str] = ()) -> dict[str, tuple]:
    """The saved models an ensemble names, loaded with their sidecars: ``{name: (model, meta)}``
    for each of ``names`` not in ``own`` (the calling run's own models), from
    ``models_dir/NAME.keras``, each renamed ``saved_NAME`` (letters, digits, ``_``) so that
    members' layer names in the ensemble differ.

    Called before a run trains anything, so a missing member stops it at once. Raises
    ``ValueError`` for fewer than two names or a repeated one, and ``FileNotFoundError`` naming
    every missing file and what to do.
    """
    from pneumo_utils.model.saving import load_model

    names = list(names)
    if names and (len(names) < 2 or len(set(names)) != len(names)):
        raise ValueError(f"an ensemble names at least two different members, got {names}")
    wanted = {name: Path(models_dir) / f"{name}.keras" for name in names if name not in own}
    missing = [str(path) for path in wanted.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"ensemble members not found: {', '.join(missing)}; run the notebooks that save them first "
            f"(the long profile runs 03 before 04), or name only {', '.join(own) or 'saved models'} "
            "and saved models in the ensemble"
        )
    loaded = {name: load_model(path) for name, path in wanted.items()}
    for name, (model, _) in loaded.items():
        model.name = "saved_" + "".join(c if c.isalnum() else "_" for c in name)
    return loaded
