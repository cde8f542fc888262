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
# # Pneumonia on paediatric chest X-rays: fine-tuning MobileNetV2
#
# Notebook 01 trained only a new head on a **frozen** ImageNet backbone. Here the backbone is
# then unfrozen and trained further on X-rays (**fine-tuning**), the standard two-phase recipe:
#
# 1. train the head on the frozen base (features computed once and cached);
# 2. unfreeze the backbone (or its top layers), keep BatchNorm in inference mode, and train on
#    **augmented** images, with augmentation that breaks what differs between hospitals;
# 3. keep whichever of the two models ranks a **new site's** images better: the labelled
#    external validation set when one is found, else the shortcut check on validation images.
#
# Frozen ImageNet features with a trained head rank another collection's images clearly worse
# than a fine-tuned network does (`RESULTS.md`). MobileNetV2 is small enough to fine-tune
# without a GPU.
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
run_name: str = "03_mobilenetv2_finetune"  # file name of the saved model and the metrics JSON
batch_size: int = 32  # images per batch on each replica (device)
strategy: str = "auto"  # tf.distribute strategy: auto, default, mirrored, multiworker or tpu
seed: int = 42  # seeds the split, the initial weights, the shuffling and the augmentation
reports_dir: str = "reports"  # where the metrics JSON is written (relative paths: to the project folder)
models_dir: str = "saved_models"  # where the model, its sidecar and its model card are written
cache_dir: str = ".cache/pneumo"  # where backbone features are cached

# %% tags=["parameters"]
# The story: what a reader varies
task: str = "pneumonia"  # pneumonia, bacterial_vs_viral or three_class (pneumo_utils.data.tasks)
weights = "imagenet"  # type: str|None "imagenet", None (random initialisation) or the path of a weights file
image_size: int = 160  # side of the square input image, in pixels
epochs: int = 20  # most epochs of phase 1 (head on the frozen base)
fine_tune_epochs: int = 4  # most epochs of phase 2 (the backbone fine-tuned on augmented images)
fine_tune_learning_rate: float = 1e-4  # Adam's initial learning rate in phase 2, cosine decay (phase 1: 1e-3)
unfreeze_layers = None  # type: int|None backbone layers trained in phase 2, from the top (None: all; BatchNorm never)
ema_momentum = None  # type: float|None phase 2: weights averaged over steps (EMA, e.g. 0.99; None: the last step's)
stretch: float = 0.2  # phase-2 augmentation: random horizontal stretch of up to this share
images_per_epoch = None  # type: int|None training images per phase-2 epoch, drawn at random (None: all)
max_images_per_class = None  # type: int|None at most this many images per split and class, for quick runs (None: all)
threshold_rule: str = "youden"  # threshold rule on validation: youden, f1, sensitivity:0.95 or fixed:0.5
n_boot: int = 1000  # bootstrap resamples for the 95% confidence intervals
remove_cues: bool = False  # centre crop + histogram equalisation in the model, frame-swapped phase-1 copies
cue_images: int = 300  # validation images in the shortcut check (four forward passes each)

# %%
from pathlib import Path

import keras
import pandas as pd
from IPython.display import display
from sklearn.metrics import roc_auc_score

from pneumo_utils.data import augment, datasets, kermany, pipelines, splits, tasks
from pneumo_utils.evaluation import metrics, shortcuts, site_shift
from pneumo_utils.explain import explorer, gradcam, plots, report
from pneumo_utils.model import backbones, features, inference, input_check, preprocessing
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
# ## 1. Data: a patient-grouped split
# The same split as in notebook 01: the task's images (`task_index`; the subtype tasks read
# bacteria and virus from the file names), validation images drawn from train by patient,
# `test/` as published.

# %%
index = tasks.task_index(kermany.load_kermany(data_dir), task)
index = splits.grouped_split(index, val_fraction=0.15, seed=seed)
index = splits.subsample(index, max_images_per_class, seed=seed)
splits.assert_no_patient_leak(index)
paths, labels = splits.split_files(index)
datasets.summarize(index, CLASS_NAMES)

# %% [markdown]
# The labelled external validation set, when one is found, is another collection's images: it
# will choose between the two phases below and give the external figures. No weights are
# trained on it.

# %%
external = tasks.task_index(kermany.load_class_folder(external_dir, split="external"), task) if external_dir else None
print(f"external validation: {len(external)} images from {external_dir}" if external is not None
      else "no external validation set: phases are compared by the shortcut check")

# %% [markdown]
# ## 2. MobileNetV2 with a new head
# With `remove_cues`, the first layers remove the acquisition cues as in notebook 01 (centre crop,
# histogram equalisation); then MobileNetV2's own scaling to [-1, 1]. The head is the one of
# notebook 01, its output following the task (one sigmoid unit for two classes, a softmax for
# three). Fine-tuned on raw pixels with the augmentation of section 4, this network ranked
# another collection's images at AUC 0.97; frozen features behind the cue-removing layers
# ranked them at 0.92-0.93 (`RESULTS.md`; fine-tuning behind those layers was not measured), so
# `remove_cues` is off by default here.

# %%
weights_file = backbones.resolve_weights("mobilenet_v2", weights)
with strat.scope():
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocessing.cue_removal(inputs, crop_fraction=0.8) if remove_cues else inputs  # centre 80%, equalised
    x = backbones.preprocessing_layer(x, mode="tf")  # pixels to [-1, 1]
    base = keras.applications.MobileNetV2(include_top=False, weights=weights_file, input_tensor=x)
    base.trainable = False
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(base.output)
    x = keras.layers.Dense(128, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    outputs = keras.layers.Dense(task_spec.output_units, activation=task_spec.activation, name="head_output")(x)
    model = keras.Model(inputs, outputs, name="mobilenet_v2")

# %% [markdown]
# ## 3. Phase 1: the head on the frozen base
# A new head starts from random weights, and its first large gradients would wreck pretrained
# features if the backbone could move. So the base stays frozen while the head learns, on backbone
# features computed once, and on frame-swapped copies of the training images (see notebook 01).

# %%
feats, x_train, y_train = features.extract_with_frame_swaps(
    model, paths, labels, frame_swap=remove_cues, seed=seed, batch_size=batch_size, cache_dir=f"{cache_dir}/features")
with strat.scope():
    head = backbones.head_on_features(model)
if task_spec.binary:
    loss, targets = "binary_crossentropy", (lambda y: y)
else:  # one column per class, like the softmax output
    loss, targets = "categorical_crossentropy", (lambda y: keras.utils.to_categorical(y, task_spec.n_classes))
head.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=[keras.metrics.AUC(name="auc")])
history1 = head.fit(
    x_train, targets(y_train), validation_data=(feats["val"], targets(labels["val"])),
    epochs=epochs, batch_size=batch_size, class_weight=pipelines.class_weights(y_train),
    callbacks=[
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=5, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.3, patience=2, min_lr=1e-6),
    ],
    verbose=2,  # one summary line per epoch, no progress bar
)
frozen_weights = model.get_weights()  # the phase-1 model, kept should fine-tuning not help
p_external = {}  # each phase's external-validation predictions, when there is a set
if external is not None:
    p_external["frozen base"] = inference.predict_paths(model, external["path"].tolist(), batch_size)

# %% [markdown]
# Before fine-tuning, the phase-1 model goes through the shortcut check of notebook 01: validation
# images with the grey-level histogram or the outer frame of an image of the other class, or a
# blank frame, at the model's own threshold. Its worst balanced accuracy is the selection score.

# %%
p_val_frozen = head.predict(feats["val"], verbose=0)
threshold_frozen = (metrics.choose_threshold(labels["val"], p_val_frozen.ravel(), rule=threshold_rule)
                    if task_spec.binary else None)  # three classes: argmax
cue_frozen = shortcuts.validation_cue_test(model, paths["val"], labels["val"], paths["train"], labels["train"],
                                           threshold=threshold_frozen, max_images=cue_images, seed=seed)
cue_frozen.round(3)

# %% [markdown]
# ## 4. Augmentation for phase 2
# Fine-tuning gives the network many more weights to fit a few thousand images with. Augmentation
# shows it a slightly different version of each training image every epoch: a few degrees of
# rotation, a little zoom and shift, brighter or darker, more or less contrast. There is **no
# horizontal flip**: the heart lies on the left, and a flipped X-ray shows an anatomy almost no
# patient has. One more transform targets this data set: the originals differ in aspect ratio by
# class (NORMAL images are wider), and the square resize turned that into a difference of
# shape; a random **horizontal stretch** (`RandomZoom` on the width only) makes shape useless as a
# label (`stretch`). The first picture is the original.

# %%
augmentation = augment.augmentation(rotation=7, zoom=0.1, shift=0.05, brightness=0.2, contrast=0.2,
                                     horizontal_flip=False, stretch=stretch, seed=seed)
example = pipelines.load_images(paths["train"][:1], image_size)[0]
plots.sample_grid(augment.preview(augmentation, example, 8), ["original"] + ["augmented"] * 7)

# %% [markdown]
# ## 5. Phase 2: unfreeze the backbone
# The backbone (or its top `unfreeze_layers` layers) becomes trainable. **BatchNormalization
# layers stay frozen**: a frozen BatchNorm layer runs in inference mode and keeps its ImageNet
# statistics; re-estimated from small batches of X-rays, they would shift the features under the
# trained head. The model is compiled again (trainability changed) with a lower learning rate
# that decays to zero along a cosine, so pretrained weights are adjusted, not overwritten.

# %%
base.trainable = True
for layer in base.layers[: -unfreeze_layers if unfreeze_layers else 0]:
    layer.trainable = False
for layer in base.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.trainable = False
print(sum(layer.trainable for layer in base.layers), "of", len(base.layers), "backbone layers trainable")

# %% [markdown]
# The backbone now changes with every step, so its features cannot be cached: this phase runs the
# whole network over augmented images, which is the expensive part of the notebook. The epoch
# count continues from phase 1, so both phases share one set of curves.
# With `ema_momentum` set, the optimizer also keeps an exponential moving average of the weights
# over the steps (Polyak averaging, Keras's `use_ema`), and validation, the epoch kept and the
# model saved use those averaged weights. On three seeds it did not rank external validation
# better than the last step's weights (RESULTS.md), so it is off by default.

# %%
train_ds, steps = augment.training_dataset(paths["train"], targets(labels["train"]), image_size,
                                           batch_size=batch_size, layers=augmentation, seed=seed,
                                           images_per_epoch=images_per_epoch)
val_ds = pipelines.image_dataset(paths["val"], targets(labels["val"]), image_size, batch_size=batch_size)
schedule = keras.optimizers.schedules.CosineDecay(fine_tune_learning_rate,
                                                  decay_steps=fine_tune_epochs * (steps or len(train_ds)))
optimizer = keras.optimizers.Adam(schedule, use_ema=ema_momentum is not None, ema_momentum=ema_momentum or 0.99)
model.compile(optimizer=optimizer, loss=loss, metrics=[keras.metrics.AUC(name="auc")])
history2 = model.fit(
    train_ds, validation_data=val_ds, steps_per_epoch=steps, shuffle=False,  # the pipeline shuffles
    initial_epoch=len(history1.epoch), epochs=len(history1.epoch) + fine_tune_epochs,
    class_weight=pipelines.class_weights(labels["train"]),
    callbacks=[  # with EMA, validation and the kept epoch use the averaged weights
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema_momentum is not None else []),
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=2, restore_best_weights=True),
    ],
    verbose=2,  # one summary line per epoch, no progress bar
)

# %%
curves = {key: history1.history[key] + history2.history[key] for key in ("loss", "auc", "val_loss", "val_auc")}
curves["phase"] = [1] * len(history1.epoch) + [2] * len(history2.epoch)
plots.training_curves(curves)

# %% [markdown]
# ## 6. Did fine-tuning help? Keep the phase that ranks a new site's images better
# Fine-tuning can overfit a small data set, or learn the cues back. Validation AUC is close to 1
# for both phases and cannot tell them apart. With a labelled external validation set, the phase
# with the higher **AUC on it** is kept (a choice made on external validation, as the runner's
# choice of the best model is); without one, the phase with the higher selection score of the
# shortcut check. The test split plays no part in this.

# %%
p_val_tuned = inference.predict_paths(model, paths["val"], batch_size)
threshold_tuned = metrics.choose_threshold(labels["val"], p_val_tuned, rule=threshold_rule) if task_spec.binary else None
cue_tuned = shortcuts.validation_cue_test(model, paths["val"], labels["val"], paths["train"], labels["train"],
                                          threshold=threshold_tuned, max_images=cue_images, seed=seed)
scores = {"frozen base": shortcuts.selection_score(cue_frozen), "fine-tuned": shortcuts.selection_score(cue_tuned)}
if external is not None:
    p_external["fine-tuned"] = inference.predict_paths(model, external["path"].tolist(), batch_size)
    external_auc = {phase: roc_auc_score(external["label"], p, multi_class="ovr") for phase, p in p_external.items()}
    phase_rule, ranking = "higher AUC on external validation", external_auc
else:
    phase_rule, ranking = "higher selection score", scores
kept = max(ranking, key=ranking.get)
if kept == "frozen base":
    model.set_weights(frozen_weights)
cue_test, selection_score = (cue_frozen if kept == "frozen base" else cue_tuned), scores[kept]
display(pd.DataFrame({"selection score": scores, **({"external AUC": external_auc} if external is not None else {})}))
print(f"kept: {kept} ({phase_rule})")

# %% [markdown]
# ## 7. Threshold on validation, metrics on test
# A binary task decides at a threshold chosen on validation; three classes by the most probable
# class (argmax).

# %%
p_val, looks_val = input_check.predict_with_looks(model, paths["val"], batch_size)  # and what section 9 needs
p_test, looks_test = input_check.predict_with_looks(model, paths["test"], batch_size)
threshold = metrics.choose_threshold(labels["val"], p_val, rule=threshold_rule) if task_spec.binary else None
print(f"threshold {threshold:.3f}: {metrics.describe_rule(threshold_rule)}" if task_spec.binary
      else f"decision: the most probable of {CLASS_NAMES}")

# %%
evaluation = metrics.evaluation_report(
    y_test=labels["test"], proba_test=p_test, y_val=labels["val"], proba_val=p_val,
    rule=threshold_rule, n_boot=n_boot, seed=seed, groups_test=datasets.patients_of(index, "test"),
    class_names=CLASS_NAMES,
)
metrics.metrics_table(evaluation)

# %% [markdown]
# External validation (see notebook 01): the kept model at the threshold chosen on validation,
# on the labelled set from another collection. The set chose the phase, so these figures are not
# quite zero-shot for this model (a choice between two); no weights or thresholds were fitted.

# %%
if external is not None:
    evaluation["external"] = metrics.external_report(
        external["label"].to_numpy(), p_external[kept], threshold=threshold, data=str(external_dir),
        n_boot=n_boot, seed=seed, groups=external["patient"].to_numpy(), class_names=CLASS_NAMES,
        band=evaluation["uncertain"])
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
# ## 8. Grad-CAM: where does the model look?

# %%
rows, captions = report.pick_examples(labels=labels["test"], proba=p_test, threshold=threshold, seed=seed,
                                     class_names=CLASS_NAMES)
images = pipelines.load_images([paths["test"][i] for i in rows], image_size)
heatmaps = gradcam.grad_cam(model, images, threshold=threshold)
plots.gradcam_grid(images, heatmaps, probabilities=p_test[rows], titles=captions, threshold=threshold,
                   class_names=CLASS_NAMES)

# %% [markdown]
# ## 9. What the model does not know
# The network answers every image with a confident class, a holiday photo included. The **input
# check** learns, from the training images, what the fine-tuned network's pooled features and
# the images' grey 8 x 8 layout look like (a Gaussian in each, probabilistic PCA); an image
# further from them than 99.5% of the validation images, in either, is **not assessed**. The
# features of a fine-tuned network cannot be cached, so this pass runs the network over 1,500
# training images (the validation and test images' were kept from section 7). The two-sample test then compares the external
# validation images with the validation images, as a new site would be compared.

# %%
check = input_check.fit(model, paths["train"], paths["val"], val_looks=looks_val, seed=seed, batch_size=batch_size)
screening = site_shift.screen(
    model, check, {"test": looks_test, "external validation": external["path"].tolist() if external is not None else None},
    site="external validation", data=str(external_dir), seed=seed, batch_size=batch_size)
print(f"input check: limits {check.limits} ({check.limit_rule}); share beyond one: "
      + ", ".join(f"{name} {share:.1%}" for name, share in screening["flagged"].items()))
if "site_shift" in screening:
    print(site_shift.describe(screening["site_shift"]))

# %% [markdown]
# **"Uncertain" as an answer.** Around the threshold, a band chosen on validation so that the
# decisions made outside it are at least 97% accurate: `predict` answers "UNCERTAIN: refer to a
# reader" inside it. The risk-coverage curve shows the trade on each set, deciding the most
# confident images first; the dot is where the band puts it. A band chosen on the same source
# rarely transfers: `calibrate` chooses one on a site's own labelled images.

# %%
band = evaluation["uncertain"]
print(f"band chosen on validation: {band}")
plots.risk_coverage({"test": (labels["test"], p_test),
                     **({"external validation": (external["label"].to_numpy(), p_external[kept])} if external is not None else {})},
                    threshold=threshold, band=band)

# %% [markdown]
# ## 10. Explore: thresholds and mistakes
# Move the threshold and see each set's confusion matrix, sensitivity and specificity change,
# side by side; the buttons put it on the threshold chosen on validation and on the one a site
# calibration on external validation A would choose (Youden's J on A, in-sample). The gallery
# shows a set's mistakes at the current threshold, the most confident first, with Grad-CAM of
# the predicted class. (A rendered report shows the same tables at the validation threshold.)

# %%
if task_spec.binary:
    explore_sets = {"validation": (paths["val"], labels["val"], p_val), "test": (paths["test"], labels["test"], p_test)}
    marks = {}
    if external is not None:
        explore_sets["external validation"] = (external["path"].tolist(), external["label"].to_numpy(), p_external[kept])
        marks["Youden on external A"] = metrics.choose_threshold(external["label"], p_external[kept], rule="youden")
    display(explorer.explorer(explore_sets, threshold=threshold, marks=marks, model=model, class_names=CLASS_NAMES))
else:
    print("The explorer moves a threshold; three classes decide by argmax (see the confusion matrix above).")

# %% [markdown]
# ## 11. Save the model, then predict from the command line
# The saved file and its sidecar (with the input check and the band) are all the command-line
# tool needs; it runs in a fresh process.

# %%
model_path = Path(models_dir) / f"{run_name}.keras"
weights_used = report.describe_weights(weights_file)
split_description = report.describe_split(index, class_names=CLASS_NAMES)
backbone_layers = "every backbone layer" if unfreeze_layers is None else f"the top {unfreeze_layers} backbone layers"
training = (f"phase 1: head on the frozen base, Adam 1e-3; phase 2: {backbone_layers} "
            f"(BatchNorm frozen), Adam {fine_tune_learning_rate:g}"
            f"{f', weights averaged over steps (EMA {ema_momentum:g})' if ema_momentum is not None else ''}, "
            f"{augment.describe(augmentation)}; "
            f"kept: {kept} ({phase_rule}); cue removal: {remove_cues}")
_ = report.save_run(
    [report.TrainedModel(
        model, model_path, name=f"MobileNetV2, {kept}", backbone="mobilenet_v2", weights=weights_used,
        positive_class=task_spec.positive_class or " / ".join(CLASS_NAMES), evaluation=evaluation,
        facts={"training": training, "cue_test": cue_test.round(4).to_dict(orient="index"),
               "selection_score": selection_score, "selection_rule": shortcuts.SELECTION_RULE,
               "selection_score_by_phase": scores},
        input_check=check, screening=screening,
    )],
    metrics_path=Path(reports_dir) / f"{run_name}.metrics.json", run_name=run_name,
    title=f"Kermany, {task_spec.description}: MobileNetV2 fine-tuning",
    data=f"Kermany chest_xray at {data_dir}; {split_description}", task=task, class_names=CLASS_NAMES,
    distribution=distribute.strategy_info(strat),
)
image_path = paths["test"][0]

# %%
# !{sys.executable} -m pneumo_utils predict {image_path} --model {model_path}
