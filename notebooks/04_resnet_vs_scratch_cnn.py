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
# # Pneumonia on paediatric chest X-rays: ResNet50 transfer learning against a CNN from scratch
#
# How much does ImageNet pretraining buy on chest X-rays? Two models train on **the same
# patient-grouped split** of the Kermany et al. (2018) paediatric data set:
#
# * a small **CNN trained from scratch** (Conv2D, BatchNormalization, MaxPooling, Dropout),
#   which must learn every feature from a few thousand X-rays;
# * **ResNet50 transfer learning**: ImageNet weights, a new head trained on the frozen base, then
#   (`fine_tune_epochs > 0`, the long profile) the whole backbone fine-tuned on the same
#   augmented images the CNN sees, as notebook 03 fine-tunes MobileNetV2.
#
# With `ensemble_members` (the long profile), ResNet50 is also averaged with notebook 03's
# fine-tuned network, and the ensemble is kept only if it ranks external validation better.
#
# Both are evaluated the same way, side by side. Before that, a **shortcut audit** asks how well
# trivial image statistics (border darkness, grey-level percentiles) predict the label on this
# data set, and afterwards a **shortcut check** asks how much each model's decisions depend on
# those cues: a same-source test split cannot tell a model that reads lungs from one that reads
# borders.
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
batch_size: int = 32  # images per batch on each replica (device)
strategy: str = "auto"  # tf.distribute strategy: auto, default, mirrored, multiworker or tpu
seed: int = 42  # seeds the split, the initial weights, the shuffling and the augmentation
reports_dir: str = "reports"  # where the metrics JSON is written (relative paths: to the project folder)
models_dir: str = "saved_models"  # where the models, their sidecars and model cards are written
cache_dir: str = ".cache/pneumo"  # where backbone features are cached

# %% tags=["parameters"]
# The story: what a reader varies
weights = "imagenet"  # type: str|None ResNet50: "imagenet", None (random initialisation) or the path of a weights file
image_size: int = 224  # ResNet50's input side, in pixels
scratch_image_size: int = 96  # the CNN from scratch's input side, in pixels
epochs: int = 40  # most epochs of ResNet50 head training on cached features
scratch_epochs: int = 3  # most epochs of the CNN from scratch over augmented images
fine_tune_epochs: int = 0  # most epochs of fine-tuning the whole ResNet50 backbone, BatchNorm frozen (0: none)
fine_tune_learning_rate: float = 1e-4  # Adam's initial learning rate when fine-tuning, cosine decay
images_per_epoch = 640  # type: int|None training images per epoch over images, drawn at random (None: all)
ensemble_members = []  # type: list[str] models averaged into one: resnet50, scratch_cnn or names of saved models in models_dir
ensemble_keep: str = "if_better"  # "if_better": kept only if it ranks external validation better than every member; "always"
label_smoothing: float = 0.0  # share of each ResNet50 target moved towards 0.5 (0.1: 0.05/0.95 instead of 0/1)
threshold_rule: str = "youden"  # threshold rule on validation, for both models
remove_cues: bool = True  # centre crop + histogram equalisation in both models, frame-swapped training copies
cue_images: int = 300  # validation images in the shortcut check (four forward passes each, per model)
max_images_per_class = None  # type: int|None at most this many images per split and class, for quick runs (None: all)
n_boot: int = 1000  # bootstrap resamples for the 95% confidence intervals

# %%
from pathlib import Path

import keras
import pandas as pd
from IPython.display import display
from sklearn.metrics import roc_auc_score

from pneumo_utils.data import augment, datasets, explore, kermany, pipelines, splits
from pneumo_utils.evaluation import metrics, shortcuts, site_shift
from pneumo_utils.evaluation.ensemble import against_members
from pneumo_utils.explain import gradcam, plots, report
from pneumo_utils.model import backbones, ensemble, features, inference, input_check, preprocessing
from pneumo_utils.scale import distribute, session

RUN_NAME = "04_resnet_vs_scratch_cnn"
run = session.setup(  # the data found (the folder given, else data/ or ../shared/data/, else a download),
    data="kermany", data_dir=data_dir, external=True, external_dir=external_dir,  # folders from the project folder,
    reports_dir=reports_dir, models_dir=models_dir, cache_dir=cache_dir,  # the seed set, the strategy chosen
    seed=seed, strategy=strategy, batch_size=batch_size,
)
data_dir, external_dir = run.data_dir, run.external_dir  # external_dir: None when there is none
reports_dir, models_dir, cache_dir = run.reports_dir, run.models_dir, run.cache_dir
strat, batch_size = run.strategy, run.batch_size  # batch_size: per replica -> per step
if ensemble_keep not in ("if_better", "always"):
    raise ValueError(f"ensemble_keep must be 'if_better' or 'always', got {ensemble_keep!r}")
saved_members = ensemble.load_members(ensemble_members, models_dir, own=("resnet50", "scratch_cnn"))  # (model, sidecar)

# %% [markdown]
# ## 1. Explore the data
# A patient-grouped split as in notebook 01; both models train and validate on exactly these
# images, and `test/` is used only for the final numbers.

# %%
index = splits.kermany_split(data_dir, seed=seed, max_images_per_class=max_images_per_class)
paths, labels = splits.split_files(index)
datasets.summarize(index)
external = kermany.load_class_folder(external_dir, split="external") if external_dir else None  # another collection

# %% [markdown]
# PNEUMONIA outnumbers NORMAL about three to one, so accuracy alone says little: the reports lead
# with ROC AUC, sensitivity and specificity, and both models train with balanced class weights.

# %%
plots.class_distribution(index)

# %%
plots.index_samples(index, scratch_image_size, per_class=4)

# %% [markdown]
# Original sizes and colour modes vary (read from the file headers only); every image is resized
# to a square and converted to RGB on loading.

# %%
sizes = explore.image_size_table(index["path"], index["label"])
display(explore.size_summary(sizes))
plots.image_size_histogram(sizes)

# %% [markdown]
# ### Shortcut audit: what trivial statistics know about the label
# A logistic regression on a handful of numbers per image (the mean grey level of each border,
# grey-level percentiles, mean and spread) is fitted on training images and scored on validation.
# None of these numbers looks at a lung. On the Kermany training collection they predict the
# label well, because NORMAL and PNEUMONIA X-rays differ in how they were acquired and processed
# (NORMAL images have true-black backgrounds and darker borders). Any CNN can learn the same
# cues, score well on a test split from the same collection, and fail on another hospital's
# images. Compare these AUCs with the CNNs' validation AUC below.

# %%
audit_train = index[index["split"] == "train"].sample(n=min(1000, int((index["split"] == "train").sum())),
                                                      random_state=seed)
stats_train = shortcuts.image_statistics(pipelines.load_images(audit_train["path"].tolist(), scratch_image_size))
stats_val = shortcuts.image_statistics(pipelines.load_images(paths["val"], scratch_image_size))
audit = shortcuts.audit(stats_train, audit_train["label"].to_numpy(), stats_val, labels["val"])
display(audit)

# %% [markdown]
# ## 2. Augmentation with Keras preprocessing layers
# Small rotations, zooms and shifts (patients are never positioned exactly alike) and small
# brightness and contrast changes (exposure differs between machines), applied to training
# batches only. **No horizontal flip**: a chest X-ray is not left-right symmetric (heart on the
# left, liver on the right, a side marker printed on one side), and a flipped image shows an
# anatomy almost no child has. The first picture is the original.

# %%
augmentation = augment.augmentation(rotation=7, zoom=0.1, shift=0.05, brightness=0.1, contrast=0.1,
                                     horizontal_flip=False, seed=seed)
example = pipelines.load_images(paths["train"][:1], scratch_image_size)[0]
plots.sample_grid(augment.preview(augmentation, example, 8), ["original"] + ["augmented"] * 7)

# %% [markdown]
# ## 3. A CNN from scratch
# Blocks of two 3x3 convolutions, each followed by BatchNormalization and ReLU; every block but
# the last ends with 2x2 max pooling and Dropout. The filters double from block to block
# while the picture shrinks, so later layers see larger regions with more kinds of feature. The
# head is the one of the transfer model, so the two compare directly.

# %%
with strat.scope():
    inputs = keras.Input((scratch_image_size, scratch_image_size, 3), name="image")
    x = preprocessing.cue_removal(inputs, crop_fraction=0.8) if remove_cues else inputs  # centre 80%, equalised
    x = keras.layers.Rescaling(1 / 255, name="preprocess")(x)  # pixels to [0, 1]
    for block, filters in enumerate([16, 32, 64, 128], start=1):
        for _ in range(2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization(momentum=0.9)(x)
            x = keras.layers.Activation("relu")(x)
        if block < 4:
            x = keras.layers.MaxPooling2D()(x)
            x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    x = keras.layers.Dense(128, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    scratch = keras.Model(inputs, outputs, name="scratch_cnn")
print(f"{scratch.count_params():,} parameters, all trained from random initialisation")

# %% [markdown]
# Every weight starts random, so this model trains over (augmented) images; each epoch is a random
# draw of `images_per_epoch` training images.

# %%
train_ds, steps = augment.training_dataset(paths["train"], labels["train"], scratch_image_size,
                                           batch_size=batch_size, layers=augmentation, seed=seed,
                                           images_per_epoch=images_per_epoch)
val_ds = pipelines.image_dataset(paths["val"], labels["val"], scratch_image_size, batch_size=batch_size)
scratch.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                metrics=[keras.metrics.AUC(name="auc")])
scratch_history = scratch.fit(
    train_ds, validation_data=val_ds, epochs=scratch_epochs, steps_per_epoch=steps, shuffle=False,
    class_weight=pipelines.class_weights(labels["train"]),
    callbacks=[
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=8, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.3, patience=2, min_lr=1e-6),
    ],
    verbose=2,  # one summary line per epoch, no progress bar
)

# %% [markdown]
# ## 4. ResNet50 transfer learning
# The cue-removing layers of notebook 01 come first, then ResNet50's own preprocessing (BGR
# images minus the ImageNet mean). Its ImageNet weights are loaded by layer name (the
# preprocessing layers are not in the weights file). The head trains on cached features of the
# frozen base, on the training images and their frame-swapped copies (see notebook 01);
# `label_smoothing` pulls the targets in from 0 and 1.

# %%
weights_file = backbones.resolve_weights("resnet50", weights)
with strat.scope():
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocessing.cue_removal(inputs, crop_fraction=0.8) if remove_cues else inputs  # centre 80%, equalised
    x = backbones.preprocessing_layer(x, mode="caffe")  # RGB to BGR, minus the ImageNet mean
    base = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x)
    if weights_file:
        base.load_weights(weights_file, by_name=True)
    base.trainable = False
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(base.output)
    x = keras.layers.Dense(128, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    resnet = keras.Model(inputs, outputs, name="resnet50")
print(report.describe_weights(weights_file))

# %%
feats, x_train, y_train = features.extract_with_frame_swaps(
    resnet, paths, labels, frame_swap=remove_cues, seed=seed, batch_size=batch_size, cache_dir=f"{cache_dir}/features")
with strat.scope():
    head = backbones.head_on_features(resnet)
head.compile(optimizer=keras.optimizers.Adam(1e-3),
             loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
             metrics=[keras.metrics.AUC(name="auc")])
resnet_history = head.fit(
    x_train, y_train, validation_data=(feats["val"], labels["val"]),
    epochs=epochs, batch_size=batch_size, class_weight=pipelines.class_weights(y_train),
    callbacks=[
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=8, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.3, patience=2, min_lr=1e-6),
    ],
    verbose=2,  # one summary line per epoch, no progress bar
)

# %% [markdown]
# With `fine_tune_epochs > 0` the whole backbone is then fine-tuned end to end, as notebook 03
# does: every layer trainable but BatchNorm (which keeps its ImageNet statistics), Adam with a
# cosine-decayed learning rate, over the **same augmented images** as the CNN from scratch, so
# the comparison is transfer against scratch with everything else equal. The fine-tuned network is
# kept by notebook 03's rule: only if it ranks the external validation images better (their
# AUC), or, without an external set, only if it raises the validation AUC.

# %%
kept = "frozen base"
if fine_tune_epochs:
    judge = ((external["path"].tolist(), external["label"], "external validation AUC") if external is not None
             else (paths["val"], labels["val"], "validation AUC"))  # the images that choose the phase
    auc_frozen = roc_auc_score(judge[1], inference.predict_paths(resnet, judge[0], batch_size))
    frozen_weights = resnet.get_weights()
    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    train_ds, steps = augment.training_dataset(paths["train"], labels["train"], image_size, batch_size=batch_size,
                                               layers=augmentation, seed=seed, images_per_epoch=images_per_epoch)
    schedule = keras.optimizers.schedules.CosineDecay(fine_tune_learning_rate,
                                                      decay_steps=fine_tune_epochs * (steps or len(train_ds)))
    resnet.compile(optimizer=keras.optimizers.Adam(schedule),
                   loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
                   metrics=[keras.metrics.AUC(name="auc")])
    val_ds = pipelines.image_dataset(paths["val"], labels["val"], image_size, batch_size=batch_size)
    resnet.fit(train_ds, validation_data=val_ds, epochs=fine_tune_epochs, steps_per_epoch=steps, shuffle=False,
               class_weight=pipelines.class_weights(labels["train"]), verbose=2, callbacks=[
                   keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=2, restore_best_weights=True)])
    auc_tuned = roc_auc_score(judge[1], inference.predict_paths(resnet, judge[0], batch_size))
    kept = "fine-tuned" if auc_tuned > auc_frozen else "frozen base"
    if kept == "frozen base":
        resnet.set_weights(frozen_weights)
    print(f"{judge[2]}: frozen base {auc_frozen:.4f}, fine-tuned {auc_tuned:.4f}; kept: {kept}")

# %% [markdown]
# ### An ensemble, kept only if it ranks the external images better
# With `ensemble_members` set (the long profile: this ResNet50 and notebook 03's fine-tuned
# MobileNetV2), the members' probabilities are averaged in one Keras model. Networks with
# different backbones make partly independent errors, but the mean of a strong model and a
# weaker one can also rank a new site's images worse than the strong one alone. So the ensemble
# joins the comparison below (and may become `best.json`) only if its AUC on external validation
# is higher than every member's; without an external set, validation decides. Saved members come
# from the same split (same `seed`), so no member has seen the validation or test images.

# %%
if ensemble_members:
    own = {"resnet50": resnet, "scratch_cnn": scratch}
    members = {name: own[name] if name in own else saved_members[name][0] for name in ensemble_members}
    sizes = [int(m.inputs[0].shape[1] or saved_members[name][1]["image_size"])  # a free-size input: its sidecar's
             for name, m in members.items()]
    averaged = ensemble.average(list(members.values()), image_size=max(sizes), sizes=sizes, name="ensemble")
    judge_paths, judge_labels, judge_name = (
        (external["path"].tolist(), external["label"].to_numpy(), "external validation") if external is not None
        else (paths["val"], labels["val"], "validation"))
    table, keep_ensemble = against_members(
        judge_labels, {name: inference.predict_paths(m, judge_paths, batch_size) for name, m in members.items()},
        inference.predict_paths(averaged, judge_paths, batch_size))
    display(table.rename(columns={"auc": f"{judge_name} AUC"}).round(4))
    verdict = (f"{judge_name} AUC {table.loc['ensemble', 'auc']:.4f}, best member "
               f"{table['auc'].drop('ensemble').max():.4f}")
    why = "it ranks better than every member" if keep_ensemble else "ensemble_keep='always'"
    keep_ensemble = keep_ensemble or ensemble_keep == "always"
    print(f"ensemble of {', '.join(ensemble_members)}: {'kept' if keep_ensemble else 'not kept'} ({verdict})")
    ensemble_recipe = ("ensemble", "mean of " + "; ".join(
        f"{name}: {saved_members[name][1].get('weights', 'weights not stated')}" if name in saved_members
        else f"{name} of this run" for name in ensemble_members), f"mean of the members' probabilities ({verdict}); kept: {why}")

# %% [markdown]
# Training curves. The CNN from scratch starts from nothing and its BatchNorm statistics need
# many steps to settle, so its first validation scores are poor; ResNet50's head starts from
# ImageNet features.

# %%
plots.training_curves(scratch_history.history)

# %%
plots.training_curves(resnet_history.history)

# %% [markdown]
# ## 5. Side by side on the test split
# Each model gets its own threshold, chosen by `threshold_rule` on its own validation
# predictions before test is touched.

# %%
candidates = {"CNN from scratch": scratch, "ResNet50 transfer": resnet}
if ensemble_members and keep_ensemble:
    candidates["Ensemble"] = averaged
rules = {name: threshold_rule for name in candidates}
proba, looks = {}, {}  # each model's probabilities, and what its input check sees (section 7)
for name, model in candidates.items():
    for split in ("val", "test"):
        p, seen = input_check.predict_with_looks(model, paths[split], batch_size)
        proba.setdefault(name, {})[split], looks.setdefault(name, {})[split] = p, seen
thresholds = {name: metrics.choose_threshold(labels["val"], p["val"], rule=rules[name]) for name, p in proba.items()}
print({name: round(t, 3) for name, t in thresholds.items()})

# %%
evaluations = {
    name: metrics.evaluation_report(
        y_test=labels["test"], proba_test=p["test"], y_val=labels["val"], proba_val=p["val"],
        rule=rules[name], n_boot=n_boot, seed=seed, groups_test=datasets.patients_of(index, "test"),
    )
    for name, p in proba.items()
}
report.comparison_table(evaluations)

# %% [markdown]
# External validation (see notebook 01): both models, each at its own threshold, on a labelled
# set from another collection when one is found; nothing is fitted on it.

# %%
p_external, looks_external = {}, {}  # each model's external predictions and what its input check sees
if external is not None:
    for name, model in candidates.items():
        p_external[name], looks_external[name] = input_check.predict_with_looks(model, external["path"].tolist(),
                                                                                batch_size)
        evaluations[name]["external"] = metrics.external_report(
            external["label"].to_numpy(), p_external[name], threshold=thresholds[name], data=str(external_dir),
            n_boot=n_boot, seed=seed, groups=external["patient"].to_numpy(), band=evaluations[name]["uncertain"])
    display(report.comparison_table(evaluations))
else:
    print("No labelled external validation set was found: every figure in this report is same-source.")

# %%
plots.roc_pr_curves({name: (labels["test"], p["test"]) for name, p in proba.items()})

# %%
for name, p in proba.items():
    display(plots.confusion_matrix(labels["test"], p["test"], thresholds[name], title=name))

# %% [markdown]
# ### Shortcut check (validation images)
# The same `cue_images` validation images, each with the grey-level histogram or the outer frame
# of a training image of the other class, or with a blank frame; each model keeps its threshold.
# A model that reads the lungs keeps its decisions; one that reads the cues loses specificity
# (the error that grows on a new site). The **selection score**, the lowest balanced accuracy
# over the four sets, is what `run_all.sh` ranks models by; validation AUC cannot rank them, it
# is close to 1 for both and for the trivial statistics above.

# %%
cue_tests = {name: shortcuts.validation_cue_test(model, paths["val"], labels["val"], paths["train"], labels["train"],
                                                 threshold=thresholds[name], max_images=cue_images, seed=seed)
             for name, model in candidates.items()}
selection = {name: shortcuts.selection_score(table) for name, table in cue_tests.items()}
display(pd.concat(cue_tests, axis=1).round(3))
pd.DataFrame({
    "validation AUC": {name: evaluations[name]["validation"]["auc"] for name in candidates},
    "selection score": selection,
    "trivial statistics, validation AUC": audit["validation auc"].max(),
}).round(3)

# %% [markdown]
# ## 6. Grad-CAM: do they look at the same places?
# The same test images for both models: correct and wrong predictions of the model with the higher
# selection score.

# %%
best = max(selection, key=selection.get)
rows, _ = report.pick_examples(labels=labels["test"], proba=proba[best]["test"], threshold=thresholds[best], seed=seed)
captions = report.prediction_captions(labels=labels["test"], rows=rows,
                                      predictions={name: (p["test"], thresholds[name]) for name, p in proba.items()})
for name, model in candidates.items():
    images = pipelines.load_images([paths["test"][i] for i in rows], int(model.inputs[0].shape[1]))
    heatmaps = gradcam.grad_cam(model, images)
    display(plots.gradcam_grid(images, heatmaps, probabilities=proba[name]["test"][rows], titles=captions))

# %% [markdown]
# ## 7. What the models do not know
# Each model gets the input check of notebook 01, fitted on its own pooled features (the frozen
# ResNet50's are cached; the CNN's and a fine-tuned network's are computed here), and its
# "uncertain" band chosen on validation. The two-sample test compares the external validation
# images with the validation images in each model's feature space.

# %%
checks, screenings = {}, {}
for name, model in candidates.items():
    cached = {"train_features": feats["train"], "val_features": feats["val"]} if model is resnet and kept == "frozen base" else {}
    checks[name] = input_check.fit(model, paths["train"], paths["val"], val_looks=looks[name]["val"], seed=seed,
                                   batch_size=batch_size, **cached)
    screenings[name] = site_shift.screen(model, checks[name], {"test": looks[name]["test"], "external validation": looks_external.get(name)},
                                         site="external validation", data=str(external_dir), seed=seed,
                                         batch_size=batch_size)
    print(f"{name}: limits {checks[name].limits}; share beyond one: "
          + ", ".join(f"{split} {share:.1%}" for split, share in screenings[name]["flagged"].items()))
    if "site_shift" in screenings[name]:
        print("  " + site_shift.describe(screenings[name]["site_shift"]))

# %%
for name in candidates:
    curves = {"test": (labels["test"], proba[name]["test"])}
    if external is not None:
        curves["external validation"] = (external["label"].to_numpy(), p_external[name])
    display(plots.risk_coverage(curves, threshold=thresholds[name], band=evaluations[name]["uncertain"], title=name))

# %% [markdown]
# ## 8. Save both models
# Each model is saved as `.keras` with a JSON sidecar and a model card; the metrics file lists
# both.

# %%
recipes = {
    "CNN from scratch": ("scratch_cnn", "random initialisation",
                         f"from scratch over augmented images ({augment.describe(augmentation)}), Adam 1e-3"),
    "ResNet50 transfer": ("resnet50", report.describe_weights(weights_file),
                          f"head on the frozen base, label smoothing {label_smoothing:g}, Adam 1e-3; then the whole "
                          f"backbone (BatchNorm frozen) over augmented images, Adam {fine_tune_learning_rate:g} cosine, "
                          f"up to {fine_tune_epochs} epochs of {images_per_epoch or 'all'} images; kept: {kept}; "
                          f"cue removal: {remove_cues}"),
}
if "Ensemble" in candidates:
    recipes["Ensemble"] = ensemble_recipe
split_description = report.describe_split(index)
trained = []
for name, model in candidates.items():
    backbone, weights_used, training = recipes[name]
    trained.append(report.TrainedModel(
        model, Path(models_dir) / f"{RUN_NAME}.{backbone}.keras", name=name, backbone=backbone,
        weights=weights_used, positive_class="PNEUMONIA", evaluation=evaluations[name],
        facts={"training": training, "cue_test": cue_tests[name].round(4).to_dict(orient="index"),
               "selection_score": selection[name], "selection_rule": shortcuts.SELECTION_RULE},
        input_check=checks[name], screening=screenings[name],
    ))
_ = report.save_run(
    trained, metrics_path=Path(reports_dir) / f"{RUN_NAME}.metrics.json", run_name=RUN_NAME,
    title="Kermany: ResNet50 transfer vs CNN from scratch",
    data=f"Kermany chest_xray at {data_dir}; {split_description}", distribution=distribute.strategy_info(strat),
)
