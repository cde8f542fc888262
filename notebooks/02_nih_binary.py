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
# # NIH ChestX-ray14: one finding against No Finding, split by patient
#
# The NIH ChestX-ray14 data set (Wang et al. 2017) holds 112,120 frontal chest X-rays of 30,805
# adult patients, each labelled with any of 14 findings (text-mined from radiology reports, so
# the labels are noisy) or `No Finding`. It comes without a train/test split, and many patients
# have several images. This notebook turns it into a **binary** task (the finding `finding`
# against `No Finding`), splits it **by patient**, and trains a frozen ImageNet backbone's head with an L2
# penalty, class weights, a learning-rate schedule and early stopping.
#
# The class names follow the task: with `finding = "Effusion"` the model answers EFFUSION vs
# NO FINDING, and its saved sidecar, model card and metrics say so. With `shards_dir` set, the
# images come from TFRecord shards instead of one file each: the way to train on all 112,120.
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
data_dir = None  # type: str|None NIH folder (images and Data_Entry_2017*.csv) or a path,label CSV (None: found in data/ or ../shared/data/, else the Kaggle sample)
shards_dir = None  # type: str|None TFRecord shards folder to read instead of the image files (pneumo shards writes one; when it holds none yet, this notebook writes it from data_dir). None: read data_dir's files
batch_size: int = 32  # images per batch on each replica (device)
strategy: str = "auto"  # tf.distribute strategy: auto, default, mirrored, multiworker or tpu
seed: int = 42  # seeds the balancing, the split, the initial weights and the shuffling
reports_dir: str = "reports"  # where the metrics JSON is written (relative paths: to the project folder)
models_dir: str = "saved_models"  # where the model, its sidecar and its model card are written
cache_dir: str = ".cache/pneumo"  # where backbone features are cached
run_name: str = "02_nih_binary"  # file name of the saved model and the metrics JSON

# %% tags=["parameters"]
# The story: what a reader varies
finding: str = "Pneumonia"  # the positive finding; its images against No Finding images
backbone: str = "densenet121"  # densenet121 (CheXNet's), mobilenet_v2 or resnet50 (keras.applications)
weights = "imagenet"  # type: str|None "imagenet", None (random initialisation) or the path of a weights file
image_size: int = 224  # side of the square input image, in pixels
epochs: int = 40  # most epochs of head training; early stopping usually ends it sooner
learning_rate: float = 1e-3  # Adam's learning rate for the head (random-weight features need far more)
patience: int = 8  # epochs without a better validation AUC before training stops
val_fraction: float = 0.15  # share of patients in the validation split
test_fraction: float = 0.2  # share of patients in the test split
max_images_per_class = None  # type: int|None at most this many images per split and class, for quick runs (None: all)
threshold_rule: str = "youden"  # threshold rule on validation: youden, f1, sensitivity:0.95 or fixed:0.5
n_boot: int = 1000  # bootstrap resamples (of test patients) for the 95% confidence intervals

# %%
from pathlib import Path

import keras
from IPython.display import display

from pneumo_utils.data import datasets, nih, pipelines, splits
from pneumo_utils.evaluation import metrics
from pneumo_utils.explain import gradcam, plots, report
from pneumo_utils.model import backbones
from pneumo_utils.scale import distribute, session, storage

RUN_NAME = run_name
run = session.setup(  # the data is found below (image files or shards); folders from the project folder,
    data=None, reports_dir=reports_dir, models_dir=models_dir, cache_dir=cache_dir,  # the seed set,
    seed=seed, strategy=strategy, batch_size=batch_size,  # the strategy chosen
)
reports_dir, models_dir, cache_dir = run.reports_dir, run.models_dir, run.cache_dir
strat, batch_size = run.strategy, run.batch_size  # batch_size: per replica -> per step

# %% [markdown]
# ## Input: image files or TFRecord shards
# Read from the folder, every image is one PNG opened from Python: fine for a few thousand, the
# bottleneck for all 112,120 (45 GB), and a set that several hosts cannot each read. TFRecord
# shards pack a few thousand images, decoded once, resized and re-encoded, with their label,
# patient and split, into each file: `tf.data` streams a few large files in parallel and decodes
# in the graph, and under `tf.distribute` with several workers each worker reads its own files
# (the input is split by file). Write them once with
# `pneumo shards --data-root DIR --out DIR` and pass `shards_dir`; when
# `shards_dir` holds no shards yet, the cell below writes them from `data_dir`, with this
# notebook's finding and patient split (a rerun after an interruption resumes). Shards are read as
# they are: after the images or the table change, write them into a new folder. Either way the
# notebook asks one source for its index, images and features.

# %%
source = storage.open_nih(  # the folder given, else data/ or ../shared/data/ of the project, else a download
    data_dir=data_dir, shards_dir=shards_dir, finding=finding, image_size=image_size,
    test_fraction=test_fraction, val_fraction=val_fraction, seed=seed,
)
data_dir = source.data_dir  # None when complete shards are read alone
print(f"input: {source.table}")

# %% [markdown]
# ## 1. The label table and the class names
# NIH labels are lists such as `Effusion|Pneumonia`. A list containing the finding (as a whole
# label) is positive, even with other findings beside it; a list that is exactly `No Finding` is
# negative; every other row is left out, being neither. A simple `path,label` CSV keeps its own
# NORMAL/PNEUMONIA labels.

# %%
CLASS_NAMES = source.class_names
print(f"{source.table} ({source.table_format} format): label 0 = {CLASS_NAMES[0]}, label 1 = {CLASS_NAMES[1]}")

# %% [markdown]
# The rule applied to the whole table, whether the images are on disk or not (shown when the NIH
# folder is read; complete shards are read without it):

# %%
if source.table_format == "nih" and data_dir is not None:
    display(nih.label_rule_counts(data_dir, findings=["Pneumonia", finding]))

# %% [markdown]
# ## 2. Which findings have enough patients on disk?
# A patient-level split needs positives from a few dozen patients: with a handful, the test
# split holds one or two positive images and its metrics are noise. If `finding` has too few, the
# split in section 4 stops and names a more common finding; this table shows the candidates.

# %%
if source.table_format == "nih" and data_dir is not None:
    display(nih.finding_counts(data_dir, on_disk_only=True).T)

# %% [markdown]
# ## 3. Index the images
# One row per image: path, label, patient id (the table's `Patient ID`), split. The negatives
# are downsampled (seeded) to the number of positives. Listed images that are not on disk are
# counted and reported in one warning; every image found is decode-checked. Shards hold such an
# index already (the writer left out, and reported, what it could not read), with its split.

# %%
index = source.index(test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)  # path, label, patient, split
if source.steps is not None:  # a folder: how the table's rows became these images
    display(source.steps.T)
else:
    print(f"split as written into the shards: {source.split_rule}")

# %% [markdown]
# ## 4. Train / validation / test split by patient
# Patients (not images) are assigned to the splits, stratified by whether they have a positive
# image: one patient's images are strongly correlated, so an image-level split would flatter the
# test score. Shards keep the split they were written with (the same rule, made once), so every
# run on them has the same patients in each split.

# %%
index = splits.subsample(index, max_images_per_class, seed=seed)
splits.assert_no_patient_leak(index)
_, labels = splits.split_files(index)  # labels per split, in index order
datasets.summarize(index)

# %% [markdown]
# Figures need a few images as arrays: from the shards when reading them, else from the files.

# %%
load_images = source.images  # a few index rows -> (n, size, size, 3) float32 in 0-255


examples = index[index["split"] == "train"].groupby("label").head(4).sort_values("label", kind="stable")
titles = [f"{CLASS_NAMES[y]} ({p})" for y, p in zip(examples["label"], examples["patient"], strict=True)]
plots.sample_grid(load_images(examples, image_size), titles, ncols=4)

# %% [markdown]
# ## 5. A frozen ImageNet backbone with an L2-regularised head
# DenseNet121 is the backbone of CheXNet (Rajpurkar et al. 2017); MobileNetV2 and ResNet50 are
# the alternatives (`backbone`), loaded by layer name as in notebook 01. Features of a backbone
# with random weights carry little signal, so use ImageNet weights wherever they can be had. The
# head is the one of notebook 01 with an **L2 penalty** on its dense layer, which keeps the
# weights small when only a few hundred training images are available.

# %%
spec = backbones.get_backbone(backbone)  # constructor name, scaling mode, weights file
weights_file = backbones.resolve_weights(backbone, weights)
with strat.scope():
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = backbones.preprocessing_layer(inputs, mode=spec.preprocessing)  # e.g. "torch" for DenseNet121
    base = getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_tensor=x)
    if weights_file:  # by layer name: the preprocessing layer is not in the weights file
        base.load_weights(weights_file, by_name=True)
    base.trainable = False
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(base.output)
    x = keras.layers.Dense(128, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4),
                           name="head_dense")(x)
    x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    model = keras.Model(inputs, outputs, name=spec.name)
print(report.describe_weights(weights_file))

# %% [markdown]
# ## 6. Train the head: class weights, learning-rate schedule, early stopping
# Backbone features are computed once and cached (see notebook 01). `ReduceLROnPlateau`
# lowers the learning rate whenever validation AUC stops improving (the `lr` column below shows
# it); early stopping restores the best epoch. From shards, the replicas share each split's
# batches (`strategy.run`), the cache key holds the shards' checksums, and the features of the rows
# kept above are taken in index order.

# %%
feats = source.split_features(model, index, strat, batch_size=batch_size, cache_dir=f"{cache_dir}/features")
with strat.scope():
    head = backbones.head_on_features(model)
head.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy",
             metrics=[keras.metrics.AUC(name="auc")])
history = head.fit(
    feats["train"], labels["train"], validation_data=(feats["val"], labels["val"]),
    epochs=epochs, batch_size=batch_size, class_weight=pipelines.class_weights(labels["train"]),
    callbacks=[
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.3, patience=2, min_lr=1e-6),
    ],
    verbose=2,  # one summary line per epoch, no progress bar
)

# %%
plots.training_curves(history.history)

# %% [markdown]
# ## 7. Threshold on validation, metrics on test
# The bootstrap resamples whole test patients: NIH patients often contribute several images.

# %%
p_val = head.predict(feats["val"], verbose=0).ravel()
p_test = head.predict(feats["test"], verbose=0).ravel()
threshold = metrics.choose_threshold(labels["val"], p_val, rule=threshold_rule)
print(f"threshold {threshold:.3f}: {metrics.describe_rule(threshold_rule)}")

# %%
evaluation = metrics.evaluation_report(
    y_test=labels["test"], proba_test=p_test, y_val=labels["val"], proba_val=p_val,
    rule=threshold_rule, n_boot=n_boot, seed=seed, groups_test=datasets.patients_of(index, "test"),
)
metrics.metrics_table(evaluation)

# %%
plots.confusion_matrix(labels["test"], p_test, threshold, class_names=CLASS_NAMES)

# %%
plots.roc_pr_curves({"test": (labels["test"], p_test), "validation": (labels["val"], p_val)})

# %% [markdown]
# ## 8. Grad-CAM: where does the model look?
# NIH images carry burnt-in markers and many show tubes and lines: heat on those rather than on
# the lungs is a shortcut.

# %%
rows, captions = report.pick_examples(labels=labels["test"], proba=p_test, threshold=threshold, seed=seed,
                                      class_names=CLASS_NAMES)
images = load_images(index[index["split"] == "test"].iloc[rows], image_size)
heatmaps = gradcam.grad_cam(model, images)
plots.gradcam_grid(images, heatmaps, probabilities=p_test[rows], titles=captions, class_names=CLASS_NAMES)

# %% [markdown]
# ## 9. Save the model with its class names

# %%
model_path = Path(models_dir) / f"{RUN_NAME}.keras"
weights_used = report.describe_weights(weights_file)
split_description = report.describe_split(index, class_names=CLASS_NAMES)
balanced = "balanced" if source.balanced else "not balanced"
data_line = f"{source.table}: {CLASS_NAMES[1]} vs {CLASS_NAMES[0]}, {balanced}, split by patient; {split_description}"
_ = report.save_run(
    [report.TrainedModel(
        model, model_path, name=f"{spec.constructor}: {CLASS_NAMES[1]} vs {CLASS_NAMES[0]}", backbone=backbone,
        weights=weights_used, positive_class=CLASS_NAMES[1], evaluation=evaluation,
        facts={"training": f"frozen base; head with L2 1e-4 trained on cached features, Adam {learning_rate:g}, "
                           f"class weights, ReduceLROnPlateau, early stopping on validation AUC (patience {patience})"},
    )],
    metrics_path=Path(reports_dir) / f"{RUN_NAME}.metrics.json", run_name=RUN_NAME,
    title=f"NIH ChestX-ray14: {CLASS_NAMES[1]} vs {CLASS_NAMES[0]}", data=data_line, task=None,
    class_names=CLASS_NAMES, data_set=f"nih:{CLASS_NAMES[1]}", distribution=distribute.strategy_info(strat),
    missing_images=source.missing_images,
)
