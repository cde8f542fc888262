# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Paediatric chest X-rays: transfer learning with DenseNet121 (or another backbone)
#
# A classifier that tells **NORMAL** from **PNEUMONIA** on the Kermany et al. (2018) paediatric
# chest X-rays: an ImageNet backbone, frozen, with a small new head trained on top. Validation
# images are drawn from train by patient, the decision threshold is chosen on validation, and the
# test split is used once, for the final numbers.
#
# Kermany et al. report a second task on the same images, **bacterial vs viral pneumonia**
# (antibiotics or not); the subtype is in every PNEUMONIA file name. The `task` parameter picks
# the question: `"pneumonia"` (normal vs pneumonia), `"bacterial_vs_viral"` (PNEUMONIA images
# only) or `"three_class"` (normal, bacterial, viral: a softmax over three classes). `backbone`
# swaps DenseNet121 for MobileNetV2 or ResNet50, whose ImageNet weights may be at hand when
# DenseNet121's are not.
#
# The training images carry **shortcuts**: NORMAL X-rays in this collection have darker borders
# and true-black backgrounds, so a model can score well without looking at a lung, and then fail
# on images from elsewhere. The model below removes those cues at its input, trains on copies
# whose borders are swapped between classes, and is checked for what is left of them.
#
# > **Not for diagnostic use.** Research and teaching only.

# %% [markdown]
# ## Set-up
# In Colab this installs the `pneumo` package from its repository; anywhere else it is installed
# already and the cell does nothing.

# %%
import sys

if "google.colab" in sys.modules:
    REPOSITORY = "https://github.com/pneumo-ai/pneumo"
    # %pip install -q "pneumo @ git+$REPOSITORY"

# %% tags=["settings"]
# The run: where the data and the outputs are, how it runs (run_all.sh and --set change them)
data_dir = None  # type: str|None Kermany folder with train/, val/, test/ (None: found in data/ or ../shared/data/, else downloaded)
external_dir = None  # type: str|None labelled external validation folder, NORMAL/ and PNEUMONIA/ (None: found if present)
run_name: str = "01_kermany_densenet121"  # file name of the saved model and the metrics JSON
weights_fallback: str = "error"  # "random": go on with random weights when ImageNet weights cannot be found
batch_size: int = 32  # images per batch on each replica (device)
strategy: str = "auto"  # tf.distribute strategy: auto, default, mirrored, multiworker or tpu
seed: int = 42  # seeds the split, the initial weights and the shuffling
reports_dir: str = "reports"  # where the metrics JSON is written (relative paths: to the project folder)
models_dir: str = "saved_models"  # where the model, its sidecar and its model card are written
cache_dir: str = ".cache/pneumo"  # where backbone features are cached

# %% tags=["parameters"]
# The story: what a reader varies
task: str = "pneumonia"  # pneumonia, bacterial_vs_viral or three_class (pneumo_utils.data.tasks)
backbone: str = "densenet121"  # densenet121, mobilenet_v2 or resnet50 (keras.applications)
weights = "imagenet"  # type: str|None "imagenet", None (random initialisation) or the path of a weights file
image_size: int = 224  # side of the square input image, in pixels
epochs: int = 40  # most epochs of head training; early stopping usually ends it sooner
learning_rate: float = 1e-3  # Adam's learning rate for the head
patience: int = 8  # epochs without a better validation AUC before training stops
val_fraction: float = 0.15  # share of the training patients moved to validation
max_images_per_class = None  # type: int|None at most this many images per split and class, for quick runs (None: all)
threshold_rule: str = "youden"  # threshold rule on validation: youden, f1, sensitivity:0.95 or fixed:0.5
n_boot: int = 1000  # bootstrap resamples for the 95% confidence intervals
remove_cues: bool = True  # centre crop + histogram equalisation in the model, frame-swapped training copies
cue_images: int = 300  # validation images in the shortcut check (four forward passes each)

# %%
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from IPython.display import display

from pneumo_utils.data import datasets, kermany, pipelines, splits, tasks
from pneumo_utils.deploy.predict import predict_image
from pneumo_utils.evaluation import metrics, shortcuts, site_shift
from pneumo_utils.explain import explorer, gradcam, plots, report
from pneumo_utils.model import backbones, features, input_check, preprocessing
from pneumo_utils.scale import distribute, session

task_spec = tasks.get_task(task)
CLASS_NAMES = task_spec.class_names  # label order: label k is CLASS_NAMES[k]
print(f"task {task}: {task_spec.description}; classes {CLASS_NAMES}")
run = session.setup(  # the data found (the folder given, else data/ or ../shared/data/, else a download),
    data="kermany", data_dir=data_dir, external=True, external_dir=external_dir,  # folders from the project folder,
    reports_dir=reports_dir, models_dir=models_dir, cache_dir=cache_dir,  # the seed set, the strategy chosen
    seed=seed, strategy=strategy, batch_size=batch_size,
)
data_dir, external_dir = run.data_dir, run.external_dir  # external_dir: None when there is none
reports_dir, models_dir, cache_dir = run.reports_dir, run.models_dir, run.cache_dir
strat, batch_size = run.strategy, run.batch_size  # batch_size: per replica -> per step

# %% [markdown]
# ## 1. Data: one row per image, split by patient
# `load_kermany` indexes every image (path, label, patient id from the file name, split) and
# decode-checks it, so a corrupt file is reported now and not in the middle of training, and
# reads the subtype (normal, bacteria, virus) from the file name. `task_index` keeps the images
# the task needs and numbers its classes. The official `val/` holds 16 images, too few to stop
# training on or to choose a threshold with, so it is merged into train and a validation split is
# drawn from train **by patient**, stratified by the task's classes: no child has X-rays on both
# sides. `test/` stays as published.
#
# Patient ids come from the file names (`person1004_bacteria_2935.jpeg` is patient `person1004`).
# About half the PNEUMONIA patient ids carry both bacterial and viral images; whether such an id is
# one child or two numbering schemes that overlap is not documented, so grouping by id, the
# cautious reading, keeps them together.

# %%
index = kermany.load_kermany(data_dir)
index = tasks.task_index(index, task)  # the task's images, label = class number
index = splits.grouped_split(index, val_fraction=val_fraction, seed=seed)
index = splits.subsample(index, max_images_per_class, seed=seed)
splits.assert_no_patient_leak(index)
datasets.summarize(index, CLASS_NAMES)

# %%
plots.class_distribution(index, class_names=CLASS_NAMES)

# %%
plots.index_samples(index, image_size, per_class=4, class_names=CLASS_NAMES)

# %% [markdown]
# ## 2. The model: preprocessing, backbone, head
# The input is raw RGB pixels (0-255). With `remove_cues`, the first layers keep the central 80%
# of the image (borders, side markers and collimation edges go) and equalise its grey-level
# histogram, so exposure and background darkness no longer tell the classes apart
# (`pneumo_utils.model.preprocessing`). The next layer applies the backbone's own scaling (for
# DenseNet121: [0, 1], then ImageNet mean and std), so the saved model needs no preprocessing
# outside it. The backbone comes from `keras.applications` without its ImageNet classifier
# (`include_top=False`), built on that layer's output, and frozen. The head is attached to the
# backbone's last feature map in the same (flat) graph, which is what Grad-CAM needs. Its layers
# are named `head_*`: the feature cache below finds the head by that prefix.
#
# The output layer follows the task: **one sigmoid unit** (the probability of the second class)
# for two classes, a **softmax over three units** (one probability per class, summing to 1) for
# `three_class`.

# %%
spec = backbones.get_backbone(backbone)  # constructor name, scaling mode, weights file
weights_file = backbones.resolve_weights(backbone, weights, fallback=weights_fallback)
with strat.scope():
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocessing.cue_removal(inputs, crop_fraction=0.8) if remove_cues else inputs  # centre 80%, equalised
    x = backbones.preprocessing_layer(x, mode=spec.preprocessing)  # e.g. "torch" for DenseNet121
    application = getattr(keras.applications, spec.constructor)  # e.g. keras.applications.DenseNet121
    base = application(include_top=False, weights=None, input_tensor=x)
    if weights_file:  # by layer name: the preprocessing layers are not in the weights file
        base.load_weights(weights_file, by_name=True)
    base.trainable = False

    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(base.output)
    x = keras.layers.Dense(128, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    outputs = keras.layers.Dense(task_spec.output_units, activation=task_spec.activation, name="head_output")(x)
    model = keras.Model(inputs, outputs, name=spec.name)
print(f"{report.describe_weights(weights_file)}; {model.count_params():,} parameters; trainable layers:",
      [layer.name for layer in model.layers if layer.trainable_weights])

# %% [markdown]
# ## 3. Train the head on cached features
# With the base frozen and no augmentation, the backbone computes the same features for an image
# in every epoch. So they are computed once (and cached on disk under a key of weights, image
# size and files), and the head trains on them: `head_on_features` is a model made of the same
# head layers, fed the pooled features instead of images, so training it trains `model`'s head.
# Class weights balance the loss (PNEUMONIA outnumbers NORMAL about 3 to 1, bacterial images
# outnumber viral ones about 2 to 1); early stopping watches validation ROC AUC and restores the
# best epoch. A softmax output learns from one-hot targets (`to_categorical`) with categorical
# cross-entropy; the AUC metric then averages over the classes' columns.
#
#
# With `remove_cues` the head also trains on a second copy of every training image whose outer
# frame (12% of each side) comes from an image of **another** class: across the two copies the
# frame says nothing about the label, so the head has to use the centre.

# %%
paths, labels = splits.split_files(index)
feats, x_train, y_train = features.extract_with_frame_swaps(
    model, paths, labels, frame_swap=remove_cues, seed=seed, batch_size=batch_size, cache_dir=f"{cache_dir}/features")
with strat.scope():
    head = backbones.head_on_features(model)

# %%
if task_spec.binary:
    loss, y_fit, y_val_fit = "binary_crossentropy", y_train, labels["val"]
else:  # one column per class, like the softmax output
    loss = "categorical_crossentropy"
    y_fit = keras.utils.to_categorical(y_train, task_spec.n_classes)
    y_val_fit = keras.utils.to_categorical(labels["val"], task_spec.n_classes)
head.compile(
    optimizer=keras.optimizers.Adam(learning_rate),
    loss=loss,
    metrics=[keras.metrics.AUC(name="auc")],
)
history = head.fit(
    x_train, y_fit,
    validation_data=(feats["val"], y_val_fit),
    epochs=epochs, batch_size=batch_size,
    class_weight=pipelines.class_weights(y_train),
    callbacks=[
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.3, patience=2, min_lr=1e-6),
    ],
    verbose=2,  # one summary line per epoch, no progress bar
)

# %%
plots.training_curves(history.history)

# %% [markdown]
# ## 4. The decision threshold, chosen on validation
# A binary model outputs the probability of its second class (PNEUMONIA, or VIRAL PNEUMONIA); a
# decision needs a threshold. It is chosen on the validation predictions (by `threshold_rule`)
# and then applied unchanged to the test images. With three classes the most probable class
# wins (argmax): there is no threshold to choose.

# %%
p_val = head.predict(feats["val"], verbose=0)
p_test = head.predict(feats["test"], verbose=0)
if task_spec.binary:
    p_val, p_test = p_val.ravel(), p_test.ravel()  # (n, 1) -> (n,)
    threshold = metrics.choose_threshold(labels["val"], p_val, rule=threshold_rule)
    print(f"threshold {threshold:.3f}: {metrics.describe_rule(threshold_rule)}")
else:
    threshold = None
    print("decision: the most probable of", CLASS_NAMES)

# %% [markdown]
# ## 5. Test metrics with 95% confidence intervals
# Intervals come from resampling test **patients** (a patient's images are correlated). For a
# binary task the "test @ 0.5" column shows what the default threshold would have given; for
# three classes the table has accuracy, balanced accuracy, macro F1 and the macro one-vs-rest
# AUC, and the per-class table below says how each class fares.

# %%
evaluation = metrics.evaluation_report(
    y_test=labels["test"], proba_test=p_test, y_val=labels["val"], proba_val=p_val,
    rule=threshold_rule, n_boot=n_boot, seed=seed, groups_test=datasets.patients_of(index, "test"),
    class_names=CLASS_NAMES,
)
metrics.metrics_table(evaluation)

# %% [markdown]
# ### External validation: images from another collection
# The test split comes from the same collection as the training images and scores almost any
# model near AUC 0.99; it cannot say how the model fares at another site. A **labelled external
# validation set** can (by default half A of Kermany's *official* test split, collected apart from
# the training images). It is scored **zero-shot**: the same weights and the same
# validation-chosen threshold (or argmax); nothing is fitted on it. `python -m
# pneumo_utils.evaluation.calibrate` can later set a site's own threshold from such images.

# %%
if external_dir is not None:
    external = tasks.task_index(kermany.load_class_folder(external_dir, split="external"), task)
    p_external, looks_external = input_check.predict_with_looks(model, external["path"].tolist(), batch_size)
    evaluation["external"] = metrics.external_report(
        external["label"].to_numpy(), p_external, threshold=threshold, data=str(external_dir), n_boot=n_boot,
        seed=seed, groups=external["patient"].to_numpy(), class_names=CLASS_NAMES, band=evaluation["uncertain"])
    display(metrics.metrics_table(evaluation))
else:
    print("No labelled external validation set was found: every figure in this report is same-source.")

# %%
metrics.classification_table(labels["test"], p_test, threshold, class_names=CLASS_NAMES)

# %%
plots.confusion_matrix(labels["test"], p_test, threshold, class_names=CLASS_NAMES)

# %%
plots.roc_pr_curves({"test": (labels["test"], p_test), "validation": (labels["val"], p_val)}, class_names=CLASS_NAMES)

# %% [markdown]
# Calibration: do predicted probabilities match observed rates? A temperature fitted on
# validation rescales the probabilities without changing the ranking or the decisions.

# %%
temperature = evaluation["temperature"]
rescale = metrics.apply_temperature if task_spec.binary else metrics.apply_softmax_temperature
plots.reliability_diagram({
    "test": (labels["test"], p_test),
    f"test, temperature {temperature:.2f}": (labels["test"], rescale(p_test, temperature)),
}, class_names=CLASS_NAMES)

# %% [markdown]
# ## 6. Shortcut check on validation images
# A same-source test split rewards shortcuts as much as real signal, so it cannot say how the
# model fares on another hospital's images. The check asks the validation images instead: each
# one gets the grey-level histogram or the outer frame of an image of another class, or a
# blank frame. A model that reads the lungs keeps its decisions; one that reads the cue loses
# specificity. The lowest balanced accuracy over the four sets is the **selection score** that
# `run_all.sh` ranks models by (within one task).

# %%
cue_test = shortcuts.validation_cue_test(model, paths["val"], labels["val"], paths["train"], labels["train"],
                                         threshold=threshold, max_images=cue_images, seed=seed)
selection_score = shortcuts.selection_score(cue_test)
cue_test.round(3)

# %% [markdown]
# ## 7. What the model does not know
# The classifier answers every image it is given, a holiday photo included, with a confident
# class. Two additions make it say when it should not be trusted:
#
# - an **input check** learned from the training images: the pooled backbone features of the
#   training images are modelled as a Gaussian (probabilistic PCA, `input_check`), and an image
#   whose features lie further from them than 99.5% of the validation images' is **not
#   assessed**; so is one whose grey 8 x 8 thumbnail lies that far from the training images'
#   (an inverted X-ray). The frozen backbone's cached features save the forward passes;
# - an **"uncertain" band** around the decision, chosen on validation so that the decisions
#   made outside it are at least 97% accurate (`evaluation["uncertain"]`); inside it, `predict`
#   answers "UNCERTAIN: refer to a reader". The curve shows the trade: deciding fewer images,
#   the most confident first, makes fewer errors.
#
# The same features compare the external validation images with the validation images as a
# whole (a two-sample test, `site_shift`): how far a new site is from the training collection.

# %%
check = input_check.fit(model, paths["train"], paths["val"], train_features=feats["train"], val_features=feats["val"],
                        seed=seed)
looks_test = input_check.Looks(feats["test"], input_check.thumbnails_of(paths["test"], image_size))  # cached features
screening = site_shift.screen(model, check, {"test": looks_test, "external validation": looks_external if external_dir else None},
                              site="external validation", data=str(external_dir), seed=seed, batch_size=batch_size)
print(f"input check: limits {check.limits} ({check.limit_rule}); share beyond one: "
      + ", ".join(f"{name} {share:.1%}" for name, share in screening["flagged"].items()))
if "site_shift" in screening:
    print(site_shift.describe(screening["site_shift"]))
plots.risk_coverage({"test": (labels["test"], p_test),
                     **({"external validation": (external["label"].to_numpy(), p_external)} if external_dir else {})},
                    threshold=threshold, band=evaluation["uncertain"])

# %% [markdown]
# ### Explore: thresholds and mistakes
# For a binary task, move the threshold and watch each set's confusion matrix, sensitivity and
# specificity, side by side; the buttons put it on the validation threshold and on the one a
# site calibration on external validation would choose (Youden's J there, in-sample). The
# gallery shows a set's mistakes at the current threshold with Grad-CAM. (A rendered report shows
# the same tables at the validation threshold.)

# %%
if task_spec.binary:
    explore_sets = {"validation": (paths["val"], labels["val"], p_val), "test": (paths["test"], labels["test"], p_test)}
    marks = {}
    if external_dir is not None:
        explore_sets["external validation"] = (external["path"].tolist(), external["label"].to_numpy(), p_external)
        marks["Youden on external validation"] = metrics.choose_threshold(external["label"], p_external, rule="youden")
    display(explorer.explorer(explore_sets, threshold=threshold, marks=marks, model=model, class_names=CLASS_NAMES))

# %% [markdown]
# ## 8. Grad-CAM: where does the model look?
# For two correct and two wrong test predictions, Grad-CAM (Selvaraju et al. 2017) asks which
# regions of the last convolutional feature map raised the score of the predicted class: the
# gradient of that score with respect to each channel of the map, averaged over the map, says
# how much the channel matters; the channels weighted by it and summed (negative parts dropped)
# give the heat map. Heat over the lungs is what we hope for; heat on text markers, borders or
# outside the body points to a shortcut.

# %%
rows, captions = report.pick_examples(labels=labels["test"], proba=p_test, threshold=threshold, seed=seed,
                                     class_names=CLASS_NAMES)
images = pipelines.load_images([paths["test"][i] for i in rows], image_size)

last_conv = gradcam.find_last_conv_layer(model)  # the last 4-D feature map before the head
grad_model = keras.Model(model.inputs, [model.get_layer(last_conv).output, model.output])
with tf.GradientTape() as tape:
    feature_map, proba = grad_model(images, training=False)
    if task_spec.binary:  # the score of the predicted class: p, or 1 - p below the threshold
        score = tf.where(proba[:, 0] >= threshold, proba[:, 0], 1.0 - proba[:, 0])
    else:  # the probability of the most probable class
        score = tf.reduce_max(proba, axis=-1)
grads = tape.gradient(score, feature_map)
channel_weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel
heatmaps = tf.nn.relu(tf.reduce_sum(channel_weights * feature_map, axis=-1)).numpy()
heatmaps /= np.maximum(heatmaps.max(axis=(1, 2), keepdims=True), 1e-12)  # each map to its own peak
heatmaps = gradcam.place_on_input(heatmaps, model)  # the cropped centre's map, placed on the whole image
plots.gradcam_grid(images, heatmaps, probabilities=p_test[rows], titles=captions, threshold=threshold,
                   class_names=CLASS_NAMES)

# %% [markdown]
# ## 9. Save the model and predict one image
# One call saves the `.keras` file (atomically) with a JSON sidecar (task and class names,
# threshold and rule, the input check and the uncertain band, data split, weights, metrics) and
# a markdown model card, and writes the
# run's metrics JSON, which the index page of `run_all.sh` reads;
# `pneumo predict IMAGE --model saved_models/01_kermany_densenet121.keras` needs
# nothing else.

# %%
model_path = Path(models_dir) / f"{run_name}.keras"
weights_used = report.describe_weights(weights_file)
split_description = report.describe_split(index, class_names=CLASS_NAMES)
(meta,) = report.save_run(
    [report.TrainedModel(
        model, model_path, name=f"{spec.constructor}, frozen base", backbone=backbone, weights=weights_used,
        positive_class=task_spec.positive_class or " / ".join(CLASS_NAMES), evaluation=evaluation,
        facts={"training": f"frozen base; head trained on cached features, Adam {learning_rate:g}, class "
                           f"weights, early stopping on validation AUC (patience {patience}); cue removal: {remove_cues}",
               "cue_test": cue_test.round(4).to_dict(orient="index"), "selection_score": selection_score,
               "selection_rule": shortcuts.SELECTION_RULE},
        input_check=check, screening=screening,
    )],
    metrics_path=Path(reports_dir) / f"{run_name}.metrics.json", run_name=run_name,
    title=f"Kermany, {task_spec.description}: {spec.constructor} transfer learning",
    data=f"Kermany chest_xray at {data_dir}; {split_description}", task=task, class_names=CLASS_NAMES,
    distribution=distribute.strategy_info(strat),
)
result = predict_image(model, meta, paths["test"][0])
print(f"{paths['test'][0]} (true {meta['class_names'][labels['test'][0]]}): "
      f"{result['label']}, {result['confidence']:.1%} confidence")
