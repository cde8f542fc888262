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
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # NIH ChestX-ray14: normal vs pneumonia, split by patient
#
# The NIH ChestX-ray14 data set (Wang et al. 2017) holds 112,120 frontal chest X-rays of
# 30,805 adult patients, each labelled with any of 14 findings (text-mined from the
# radiology reports, so the labels are noisy) or `No Finding`. Unlike the Kermany set it
# comes without a train/test split, and many patients have several images taken over the
# years. This notebook builds a **binary** classifier from it:
#
# 1. turn the multi-label table into two classes: `No Finding` -> NORMAL (0), any label list
#    that contains the positive finding (`finding`, default `Pneumonia`) -> PNEUMONIA (1),
#    everything else dropped; downsample the normals (seeded) to balance the classes;
#    count and report images that are listed but not on disk;
# 2. split **by patient** into train, validation and test (stratified), and check that no
#    patient is on two sides: images of one person are strongly correlated, so an
#    image-level split would flatter the test score;
# 3. train a DenseNet121 head with L2 regularisation, class weights and a learning-rate
#    schedule (reduce on plateau) with early stopping;
# 4. choose the decision threshold on validation data only, report test metrics with
#    bootstrap 95% confidence intervals, the classification report, the confusion matrix,
#    ROC/PR curves and Grad-CAM maps; save the model with its metadata and a model card.
#
# If there are too few positive patients for a meaningful split, the notebook **stops** at
# step 2 with an explanation of what to change.
#
# > **Not for diagnostic use.** Everything here is for research and teaching.

# %% [markdown]
# ## Setup
# In Colab (or any kernel without the package) this installs `pneumo_utils` from the
# repository; in JupyterLab from a clone, or under papermill, it is already installed.

# %%
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

if importlib.util.find_spec("pneumo_utils") is None:
    repo = os.environ.get("PNEUMO_GIT_URL", "https://github.com/pneumo-ai/pneumo")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"pneumo @ git+{repo}"], check=True)
if Path.cwd().name == "notebooks":
    os.chdir("..")  # paths below are relative to the repository root

# %% [markdown]
# ## Parameters
# papermill overrides this cell (`run_all.sh` sets them per profile). `data_dir` is a folder
# holding the images (`images/`, or the Kaggle download's `images_0NN/images/`) and the label
# table `Data_Entry_2017*.csv(.gz)`, or the path of a CSV; `labels_csv` names the table when
# it is elsewhere or the folder holds several CSVs. A simple `path,label` CSV (label 0/1 or
# NORMAL/PNEUMONIA, optional `patient` column) works too. `finding` is the positive finding.
# `weights` is `"imagenet"`, `None` (random initialisation) or a path;
# `weights_fallback="random"` continues with random weights when ImageNet weights cannot be
# found (the report then says so). `l2` is the L2 penalty on the head's dense layer.
# `full_table_stats` shows the label rule on the whole table, images or not.

# %% tags=["parameters"]
data_dir = "data/nih"
labels_csv = None
finding = "Pneumonia"
balance = True
backbone = "densenet121"
weights = "imagenet"
weights_fallback = "error"
image_size = 224
batch_size = 32
epochs = 30
learning_rate = 1e-3
l2 = 1e-4
patience = 5
seed = 42
val_fraction = 0.15
test_fraction = 0.2
max_images_per_class = None
use_feature_cache = True
threshold_rule = "youden"
n_boot = 1000
full_table_stats = True
reports_dir = "reports"
models_dir = "saved_models"
cache_dir = ".cache/pneumo"
run_name = "02_nih_binary"

# %%
import pandas as pd
from IPython.display import Markdown, display

from pneumo_utils import CLASS_NAMES, data, datasets, models, plots, report, train, workflow
from pneumo_utils.predict import predict_image

data.set_seed(seed)
for folder in (reports_dir, models_dir):
    Path(folder).mkdir(parents=True, exist_ok=True)
table_path = datasets.find_labels_csv(labels_csv or data_dir)
_, table_format = datasets.read_labels_table(table_path)
is_nih = table_format == "nih"
positive_name = finding if is_nih else CLASS_NAMES[1]
display(Markdown(
    f"Label table: `{table_path}` ({'NIH ChestX-ray14 format' if is_nih else 'simple path,label CSV'}). "
    f"Positive class: **{positive_name}**. Label 1 is called `{CLASS_NAMES[1]}` in the tables "
    f"and figures below (the package's name for the positive class); here it means "
    f"**{positive_name} present**, and label 0 (`{CLASS_NAMES[0]}`) means `No Finding`."
))

# %% [markdown]
# ## 1. The label rule on the whole table
# NIH labels are lists such as `Effusion|Pneumonia`. The rule: a list that contains the
# positive finding (as a whole label, any case; `Pneumonia` would not match a label
# `Pneumonia_like`) is positive even when other findings come with it; a list that is exactly
# `No Finding` is NORMAL; every other row (other findings only) is left out, because it is
# neither normal nor the finding. Applied to the whole table (no images needed), and with
# the same patient-level split run on it to show that it scales and never leaks:

# %%
if full_table_stats and is_nih:
    display(datasets.label_rule_counts(data_dir, ["Pneumonia", finding], labels_csv=labels_csv))
    whole = datasets.load_nih(data_dir, finding=finding, balance=False, require_images=False,
                              labels_csv=labels_csv)
    try:
        whole = data.patient_split(whole, test_fraction, val_fraction, seed)
        data.assert_no_patient_leak(whole)
        display(Markdown(f"Patient-level split of all {len(whole):,} labelled rows "
                         f"(`No Finding` + {finding}, unbalanced), checked leak-free:"))
        display(datasets.summarize(whole))
    except data.TooFewPositivesError as error:
        display(Markdown(f"The whole table cannot be split either: {error}"))
    del whole
else:
    display(Markdown("_Skipped (`full_table_stats=False`, or the labels are a simple CSV)._"))

# %% [markdown]
# ## 2. Which finding? Counts among the images on disk
# A patient-level train/validation/test split needs positives from a few dozen patients:
# with a handful, the test split holds one or two positive images, its metrics are noise, and
# a threshold chosen on validation means nothing. The table counts each finding among the
# images actually present (a row counts for each of its labels).

# %%
if is_nih:
    on_disk = datasets.finding_counts(data_dir, on_disk_only=True, labels_csv=labels_csv)
    display(on_disk.T)
    by_name = on_disk.rename(index=str.casefold)
    n_pneumonia = tuple(by_name.loc["pneumonia"]) if "pneumonia" in by_name.index else (0, 0)
    n_finding = tuple(by_name.loc[finding.casefold()]) if finding.casefold() in by_name.index else (0, 0)
    if finding.casefold() == "pneumonia":
        choice = f"Positive finding `Pneumonia`: {n_finding[0]} images from {n_finding[1]} patients on disk."
    elif n_pneumonia[1] < 10:
        choice = (
            f"**This run uses `{finding}` as the positive finding, not `Pneumonia`.** Only "
            f"{n_pneumonia[0]} of the images on disk carry `Pneumonia` (from {n_pneumonia[1]} "
            f"patients): too few for a meaningful patient-level split (with `finding='Pneumonia'` "
            f"this notebook stops at step 4 and says so). `{finding}` has {n_finding[0]} images "
            f"from {n_finding[1]} patients, so the model below detects **{finding} vs No Finding**; "
            f"it is the same pipeline, and with the full data set `finding='Pneumonia'` works as is."
        )
    else:
        choice = (f"**This run uses `{finding}` as the positive finding** (parameter `finding`): "
                  f"{n_finding[0]} images from {n_finding[1]} patients on disk; the model below "
                  f"detects {finding} vs No Finding, not pneumonia.")
    if n_finding[1] < 10:
        common = on_disk.drop(index=datasets.NO_FINDING, errors="ignore")["patients"].idxmax()
        choice += (f" **That is too few for a patient-level split: step 4 will stop.** The finding "
                   f"with the most patients here is `{common}` (`--set 02.finding={common}`).")
    display(Markdown(choice))
else:
    choice = "Simple CSV: label 1 is PNEUMONIA as given in the file."
    display(Markdown(choice))

# %% [markdown]
# ## 3. Index the images
# One row per image: path, label, patient id (the table's `Patient ID`, which is also the
# 8-digit prefix of the file name), the original finding labels. The normals are
# downsampled (seeded) to the number of positives. Rows whose image is not on disk are
# **counted and reported** in one warning (pass `on_missing="error"` to `load_nih` to stop
# instead); every image found is decode-checked, so a corrupt file shows up here. The table
# lists what each step kept and dropped.

# %%
index = datasets.load_nih(data_dir, finding=finding, balance=balance, seed=seed, labels_csv=labels_csv)
loaded = index.attrs["load_summary"]
display(datasets.load_steps(index).T)
n_missing = int(loaded.get("dropped: image not on disk", 0))
display(Markdown(
    f"{n_missing:,} labelled row(s) have no image on disk and were left out"
    + (" (expected when only part of the images is downloaded: the NIH table lists all "
       "112,120)." if n_missing else ".")
    + f" Patient ids from {loaded['patients_from']}."
))

# %% [markdown]
# ## 4. Train / validation / test split by patient
# Patients (not images) are assigned to the splits, stratified by whether they have a
# positive image, seeded by `seed`; every split must hold at least two images of each class
# and ten patients must be positive, otherwise the notebook stops here with the counts and
# what to change. `max_images_per_class` then caps each split and class for quick runs.

# %%
try:
    index = data.patient_split(index, test_fraction, val_fraction, seed)
except data.TooFewPositivesError as error:
    display(Markdown(
        f"### Stopped: too few positives for a meaningful split\n\n{error}\n\n"
        f"Nothing was trained. Rerun with e.g. `--set 02.finding=Effusion` (see the counts in "
        f"section 2), or point `data_dir` at more images."
    ))
    raise
index = data.subsample(index, max_images_per_class, seed)
data.assert_no_patient_leak(index)
split_description = report.describe_split(index)
display(Markdown(f"{split_description}. No patient appears in two splits."))
display(datasets.summarize(index))
display(plots.class_distribution(index))

# %%
plots.index_samples(index, image_size, per_class=4)

# %% [markdown]
# ## 5. Model: DenseNet121, frozen, with an L2-regularised head
# DenseNet121 (Huang et al. 2017; the CheXNet backbone of Rajpurkar et al. 2017) with
# global average pooling, Dense(128, relu) with an **L2 weight penalty** `l2`, Dropout(0.5)
# and a sigmoid output. The penalty keeps the head's weights small, which matters with a few
# hundred training images. Preprocessing is a layer inside the model, so the saved file takes
# raw pixels.

# %%
weights_file = models.resolve_weights(backbone, weights, fallback=weights_fallback)
weights_used = weights_file or "random initialisation (no ImageNet weights)"
model = models.build_classifier(backbone, image_size, weights_file, l2=l2, seed=seed)
display(Markdown(
    f"Backbone **{backbone}**, weights: `{weights_used}`, {model.count_params():,} parameters, "
    f"input {image_size} px, head L2 = {l2:g}."
    + ("" if weights_file else " **Without ImageNet weights the frozen backbone computes random "
       "features, so the scores below show that the pipeline works, not what DenseNet121 can do.** "
       "Random features are also very small in scale (pooled values around 0.02), so such runs need "
       "a much larger `learning_rate` for the head than ImageNet features do (`profiles/full.yaml`).")
))

# %% [markdown]
# ## 6. Train the head: class weights, learning-rate schedule, early stopping
# The inputs come from a tf.data pipeline over the file paths (decoded in parallel, resized,
# batched, prefetched). With the base frozen and no augmentation, the backbone's output per
# image never changes, so by default it is computed once and cached on disk and the head trains
# on the features (`use_feature_cache`). Training uses:
#
# * **class weights** `n / (2 n_c)` from the training labels (balanced here, so close to 1, but
#   they matter with `balance=False`);
# * a **learning-rate schedule**: `ReduceLROnPlateau` from `train.standard_callbacks` multiplies
#   the learning rate by 0.3 when validation AUC has not improved for 2 epochs (down to 1e-6);
# * **early stopping** on validation AUC (`patience` epochs), restoring the best epoch.

# %%
paths, labels = workflow.split_files(index)
display(Markdown(f"Class weights (train): {data.class_weights(labels['train'])}"))
history, proba = train.train_frozen_head(
    model, paths, labels, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
    patience=patience, use_feature_cache=use_feature_cache, cache_dir=f"{cache_dir}/features",
    history_path=f"{models_dir}/{run_name}.history.json",
    checkpoint_path=f"{models_dir}/checkpoints/{run_name}.keras", verbose=2,
)
display(plots.training_curves(history))
if "learning_rate" in history:
    display(pd.DataFrame({"epoch": range(1, len(history["learning_rate"]) + 1),
                          "learning rate": history["learning_rate"],
                          "val AUC": history.get("val_auc")}).set_index("epoch").T)

# %% [markdown]
# ## 7. Evaluation on the test split
# The threshold is chosen on the validation split (rule `threshold_rule`, Youden's J by
# default) and applied unchanged to the test patients. Test metrics come with 95% bootstrap
# confidence intervals; the 0.5 column shows what the default threshold would have given.
# Then the classification report (per-class precision, recall, F1), the confusion matrix, ROC
# and precision-recall curves and the reliability diagram. NIH patients often contribute
# several images, and one patient's images are correlated, so the bootstrap resamples whole
# test *patients* (images alone would give intervals that are too narrow).

# %%
evaluation = report.show_evaluation(f"{backbone}: {positive_name} vs No Finding", labels["val"], proba["val"],
                                    labels["test"], proba["test"], threshold_rule, n_boot, seed,
                                    datasets.patients_of(index, "test"))

# %% [markdown]
# ## 8. Grad-CAM: where does the model look?
# Heat maps of the last convolutional layer for confidently correct and for wrong test
# predictions. Heat outside the lungs (text markers, borders, devices) hints at shortcuts;
# NIH images carry burnt-in markers and many show tubes and lines.

# %%
rows, captions = report.pick_examples(labels["test"], proba["test"], evaluation["threshold"], seed=seed)
_ = report.show_gradcam(model, [paths["test"][i] for i in rows], captions)

# %% [markdown]
# ## 9. Save the model and predict one image
# One `.keras` file (saved atomically) plus a JSON sidecar with the threshold and how it was
# chosen, the positive finding, the data split and the metrics, and a markdown model card;
# `python -m pneumo_utils.predict IMAGE --model ...` needs nothing else.

# %%
model_path = Path(models_dir) / f"{run_name}.keras"
data_line = (f"NIH ChestX-ray14 ({table_path}), positive finding {positive_name} (label 1, named "
             f"{CLASS_NAMES[1]}) vs No Finding, normals downsampled to balance: {balance}; "
             f"patient-level split: {split_description}")
training = (f"frozen base, head Dense(128, L2 {l2:g}) trained up to {epochs} epochs at {learning_rate:g} "
            f"with class weights, ReduceLROnPlateau (x0.3 after 2 epochs) and early stopping on "
            f"validation AUC (patience {patience})")
meta = workflow.save_with_card(
    model, model_path, evaluation, backbone=backbone, weights=weights_used, data=data_line,
    training=training, positive_finding=positive_name,
)
image_path, true_label = paths["test"][0], CLASS_NAMES[labels["test"][0]]
result = predict_image(model, meta, image_path)
display(Markdown(f"Saved `{model_path}` with sidecar `{models.sidecar_path(model_path)}` and model card "
                 f"`{model_path.with_suffix('.md')}`.\n\n`{image_path}` (true {true_label}): "
                 f"**Prediction: {result['label']} ({result['confidence']:.2%} confidence)**"))

# %%
summary = report.write_metrics(
    f"{reports_dir}/{run_name}.metrics.json", run_name,
    f"NIH ChestX-ray14: {positive_name} vs No Finding (DenseNet121 head, L2)", data_line,
    [report.model_entry(backbone, evaluation, model_path, weights=weights_used, finding=positive_name)],
    task=f"nih:{positive_name}", backbone=backbone, finding=positive_name, missing_images=n_missing,
)
assert 0.0 <= summary["test"]["auc"] <= 1.0 and model_path.is_file()

# %% [markdown]
# ## Summary, data split and threshold

# %%
random_note = ("" if weights_file else " With random backbone weights these scores show that the "
               "pipeline works, not what DenseNet121 with ImageNet weights can do.")
display(Markdown(f"""
- **Data**: NIH ChestX-ray14 label table `{table_path}` with images under `{data_dir}`.
  {loaded['in the index']} images after the label rule and balancing; {n_missing:,} listed image(s) were not on disk and were left out.
- **Finding**: {choice}
- **Split** (by patient, stratified, leak-checked): {split_description}.
- **Model**: {backbone}, weights {weights_used}; {training}.{random_note}
- **Threshold**: {evaluation['threshold']:.3f}, chosen by {evaluation['threshold_rule']}.
- **Test**: {report.summary_line(evaluation)}.

{report.DISCLAIMER}
"""))
