"""Grad-CAM (Selvaraju et al. 2017) for the flat classifiers in :mod:`pneumo_utils.model.backbones`.

The heat map weights the last convolutional feature maps by the gradient of the class score,
showing which regions drove a prediction. It explains the model, not the disease: a model
that learned a shortcut (text markers, borders) shows that shortcut.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf

from pneumo_utils.model.backbones import HEAD_PREFIX


def find_last_conv_layer(model: keras.Model) -> str:
    """Name of the last layer before the head whose output is a 4-D feature map."""
    for layer in reversed(model.layers):
        if layer.name.startswith(HEAD_PREFIX):
            continue
        if len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no 4-D convolutional output for Grad-CAM")


def grad_cam(
    model: keras.Model,
    images: np.ndarray,
    layer_name: str | None = None,
    target: str | int = "predicted",
    threshold: float | None = 0.5,
) -> np.ndarray:
    """Grad-CAM heat maps for a batch.

    Parameters
    ----------
    images : ``(n, h, w, 3)`` RGB in 0-255, the model's input size.
    layer_name : the convolutional layer to explain; found automatically when ``None``.
    target : the class whose score is explained. ``"predicted"``: each image's predicted
        class; for a one-unit sigmoid model class 1 when the output is at least
        ``threshold`` (score ``p``) else class 0 (score ``1 - p``), for a softmax model the
        most probable class (score its probability). A class index ``k`` explains class
        ``k`` for every image; ``"pneumonia"`` is class 1 of a binary model.
    threshold : the decision threshold of a sigmoid model for ``target="predicted"``; pass
        the model's own (e.g. the one chosen on validation) so the map explains the decision
        reported. A softmax model decides by argmax and does not use it (``None`` is fine).

    Returns ``(n, h', w')`` float32 maps in [0, 1] at the layer's resolution, each scaled to its
    own peak, covering the whole input image: when the model crops its input first (a
    ``CenterCrop`` layer, see :func:`pneumo_utils.model.preprocessing.cue_removal`), the maps are
    placed in the middle of a zero frame, so they line up with the uncropped image.
    :func:`pneumo_utils.explain.plots.gradcam_grid` draws them with a colour bar.
    """
    units = int(model.output.shape[-1])
    target = _check_target(target, units)
    if units == 1 and target == "predicted" and threshold is None:
        raise ValueError("a sigmoid model's predicted class needs its decision threshold; "
                         "pass threshold= (the one chosen on validation)")
    from pneumo_utils.model.ensemble import members_of

    members = members_of(model)
    if members and layer_name is None:
        return _ensemble_cam(model, members, np.asarray(images, dtype=np.float32), target, threshold)
    layer_name = layer_name or find_last_conv_layer(model)
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    with tf.GradientTape() as tape:
        conv, proba = grad_model(x, training=False)
        score = _class_score(proba, target, threshold)
    grads = tape.gradient(score, conv)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1)).numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return place_on_input((cam / np.maximum(peak, 1e-12)).astype(np.float32), model)


def _ensemble_cam(model: keras.Model, members: list[keras.Model], images: np.ndarray,
                  target: str | int, threshold: float | None) -> np.ndarray:
    """The mean of the members' Grad-CAM maps of the class the *ensemble* explains, each map
    resized to the largest member map (an ensemble averages probabilities, so each member's
    share of the decision is its own gradient-weighted feature map)."""
    if target == "predicted":
        proba = model.predict(images, verbose=0)
        classes = ((proba[:, 0] >= threshold).astype(int) if proba.shape[-1] == 1
                   else proba.argmax(axis=-1))
    else:
        classes = np.full(len(images), int(target))
    maps = []
    for member in members:
        size = int(member.inputs[0].shape[1])
        x = images if images.shape[1] == size else tf.image.resize(images, (size, size)).numpy()
        cam = np.zeros((len(images), 0, 0), dtype=np.float32)
        for k in np.unique(classes):
            part = grad_cam(member, x, target=int(k), threshold=threshold)
            if cam.size == 0:
                cam = np.zeros_like(part)
            cam[classes == k] = part[classes == k]
        maps.append(cam)
    h = max(m.shape[1] for m in maps)
    w = max(m.shape[2] for m in maps)
    resized = [np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in m]) for m in maps]
    mean = np.mean(resized, axis=0)
    peak = mean.reshape(len(mean), -1).max(axis=1).reshape(-1, 1, 1)
    return (mean / np.maximum(peak, 1e-12)).astype(np.float32)


def _check_target(target: str | int, units: int) -> str | int:
    """``target`` as :func:`grad_cam` reads it, or ``ValueError`` naming what the model has."""
    classes = 2 if units == 1 else units
    if target == "pneumonia" and units == 1:
        return 1
    if target == "predicted" or (isinstance(target, int | np.integer) and 0 <= target < classes):
        return target if target == "predicted" else int(target)
    raise ValueError(
        f"target must be 'predicted' or a class index 0..{classes - 1}"
        + (" ('pneumonia' is class 1)" if units == 1 else "") + f", got {target!r}"
    )


def _class_score(proba: tf.Tensor, target: str | int, threshold: float | None) -> tf.Tensor:
    """Score ``(n,)`` of the explained class for model outputs ``(n, units)``."""
    if proba.shape[-1] == 1:
        p = proba[:, 0]
        if target == "predicted":
            return tf.where(p >= threshold, p, 1.0 - p)
        return p if target == 1 else 1.0 - p
    if target == "predicted":
        return tf.reduce_max(proba, axis=-1)
    return proba[:, target]


def place_on_input(cam: np.ndarray, model: keras.Model) -> np.ndarray:
    """Maps ``(n, h, w)`` of a model that centre-crops its input (a ``CenterCrop`` layer),
    placed in a zero frame where the crop came from, so they line up with the whole input
    image; maps of any other model are returned as they are."""
    crops = [layer for layer in model.layers if isinstance(layer, keras.layers.CenterCrop)]
    if not crops:
        return cam
    in_h, in_w = (int(d) for d in model.inputs[0].shape[1:3])
    n, h, w = cam.shape
    full_h, full_w = round(h * in_h / crops[0].height), round(w * in_w / crops[0].width)
    top, left = (full_h - h) // 2, (full_w - w) // 2
    out = np.zeros((n, full_h, full_w), dtype=np.float32)
    out[:, top: top + h, left: left + w] = cam
    return out


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heat map (any size, values in [0, 1]) over an RGB image in 0-255.

    Returns ``(h, w, 3)`` uint8, the heat map resized to the image and coloured with
    OpenCV's JET colour map.
    """
    image = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    heat = cv2.resize(np.asarray(heatmap, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(255 * np.clip(heat, 0, 1)), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colour, alpha, image, 1.0 - alpha, 0.0)
