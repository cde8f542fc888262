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
# # Pneumonia on paediatric chest X-rays: DenseNet121 transfer learning
#
# This notebook trains a classifier that tells **NORMAL** from **PNEUMONIA** chest X-rays of
# the Kermany et al. (2018) paediatric data set, the way a careful practitioner would:
#
# 1. index the images and check the folder layout;
# 2. carve a **patient-grouped** validation split out of train (the official `val/` has 16 images);
# 3. train a classification head on a **frozen** ImageNet backbone, with class weights because
#    PNEUMONIA outnumbers NORMAL about 3 to 1;
# 4. choose the decision threshold on **validation** data only, then report test metrics with
#    bootstrap 95% confidence intervals, ROC/PR and calibration curves;
# 5. look at Grad-CAM maps of right and wrong predictions, predict one image, save the model.
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
# papermill overrides this cell (`run_all.sh` sets them per profile). `weights` is
# `"imagenet"`, `None` (random initialisation) or a path; `"imagenet"` is looked up in
# `$PNEUMO_WEIGHTS_DIR` before any download. `weights_fallback="random"` continues with random
# weights when ImageNet weights cannot be found (the report then says so).

# %% tags=["parameters"]
data_dir = "data/chest_xray"
backbone = "densenet121"
weights = "imagenet"
weights_fallback = "error"
image_size = 224
batch_size = 32
epochs = 30
learning_rate = 1e-3
patience = 5
seed = 42
val_fraction = 0.15
keep_official_val = False
max_images_per_class = None
use_feature_cache = True
threshold_rule = "youden"
n_boot = 1000
reports_dir = "reports"
models_dir = "saved_models"
cache_dir = ".cache/pneumo"
run_name = "01_kermany_densenet121"

# %%
from IPython.display import Markdown, display

from pneumo_utils import CLASS_NAMES, data, datasets, models, plots, report, train, workflow
from pneumo_utils.predict import predict_image

data.set_seed(seed)
for folder in (reports_dir, models_dir):
    Path(folder).mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Index the data set
# One row per image: path, label (0 NORMAL, 1 PNEUMONIA), patient id parsed from the file name,
# and split, as published. Every file is decode-checked now, so a corrupt image is reported here
# and not in the middle of an epoch; stray non-image files (`.DS_Store`) are skipped with a warning.

# %%
index = datasets.load_kermany(data_dir)
datasets.summarize(index)

# %% [markdown]
# ## 2. A patient-grouped validation split
# A patient can have several X-rays. If one of them is in train and another in validation,
# validation scores are optimistic, so the validation split is drawn from train **by patient**
# (stratified by class). The official 16-image `val/` is merged into train unless
# `keep_official_val`. The `test/` split is never used for any choice below.

# %%
index = data.grouped_split(index, val_fraction, seed, keep_official_val=keep_official_val)
index = data.subsample(index, max_images_per_class, seed)
data.assert_no_patient_leak(index)
split_description = report.describe_split(index)
display(datasets.summarize(index))
display(plots.class_distribution(index))

# %%
plots.index_samples(index, image_size, per_class=4)

# %% [markdown]
# ## 3. Model: frozen backbone + small head
# Backbone with ImageNet weights, global average pooling, Dense(128, relu), Dropout(0.5) and
# a sigmoid output. The preprocessing is a layer inside the model, so the saved file takes raw
# pixels and needs nothing else at prediction time.

# %%
weights_file = models.resolve_weights(backbone, weights, fallback=weights_fallback)
weights_used = weights_file or "random initialisation (no ImageNet weights)"
model = models.build_classifier(backbone, image_size, weights_file, seed=seed)
display(Markdown(f"Backbone **{backbone}**, weights: `{weights_used}`, "
                 f"{model.count_params():,} parameters, input {image_size} px."))

# %% [markdown]
# ## 4. Train the head
# With the base frozen and no augmentation, the backbone output for an image never changes,
# so by default (`use_feature_cache=True`) it is computed **once** and cached on disk; the
# head then trains on those features in seconds per epoch. The result is the same model as
# `model.fit` over images (see `python -m pneumo_utils.bench`). Class weights balance the loss;
# early stopping on validation AUC restores the best epoch.

# %%
paths, labels = workflow.split_files(index)
history, proba = train.train_frozen_head(
    model, paths, labels, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
    patience=patience, use_feature_cache=use_feature_cache, cache_dir=f"{cache_dir}/features",
    history_path=f"{models_dir}/{run_name}.history.json",
    checkpoint_path=f"{models_dir}/checkpoints/{run_name}.keras", verbose=2,
)
display(plots.training_curves(history))

# %% [markdown]
# ## 5. Evaluation on the test split
# The threshold is chosen on the validation split (rule `threshold_rule`, Youden's J by
# default) and applied unchanged to test. Test metrics come with 95% bootstrap confidence
# intervals; the 0.5 column shows what the default threshold would have given.

# %%
evaluation = report.show_evaluation(backbone, labels["val"], proba["val"], labels["test"], proba["test"],
                                    threshold_rule, n_boot, seed, datasets.patients_of(index, "test"))

# %% [markdown]
# ## 6. Grad-CAM: where does the model look?
# Heat maps of the last convolutional layer for confidently correct and for wrong test
# predictions. Heat outside the lungs (text markers, borders) hints at shortcuts.

# %%
rows, captions = report.pick_examples(labels["test"], proba["test"], evaluation["threshold"], seed=seed)
_ = report.show_gradcam(model, [paths["test"][i] for i in rows], captions)

# %% [markdown]
# ## 7. Save the model and predict one image
# The model is saved atomically as `.keras` with a JSON sidecar holding the threshold, its
# rule, the data split and the metrics; `python -m pneumo_utils.predict IMAGE --model ...`
# and `python -m pneumo_utils.evaluate` need nothing else.

# %%
model_path = Path(models_dir) / f"{run_name}.keras"
meta = workflow.save_with_card(
    model, model_path, evaluation, backbone=backbone, weights=weights_used,
    data=f"Kermany chest_xray at {data_dir}; {split_description}",
)
result = predict_image(model, meta, paths["test"][0])
display(Markdown(f"`{paths['test'][0]}` (true {CLASS_NAMES[labels['test'][0]]}): "
                 f"**Prediction: {result['label']} ({result['confidence']:.2%} confidence)**"))

# %%
summary = report.write_metrics(
    f"{reports_dir}/{run_name}.metrics.json", run_name, "Kermany: DenseNet121-style transfer learning",
    split_description, [report.model_entry(backbone, evaluation, model_path, weights=weights_used)],
    backbone=backbone,
)
assert 0.0 <= summary["test"]["auc"] <= 1.0 and model_path.is_file()

# %% [markdown]
# ## Summary, data split and threshold

# %%
display(Markdown(f"""
- **Data**: Kermany paediatric chest X-rays from `{data_dir}`. {split_description}.
  Validation was carved from train by patient; `test/` was used only for the final numbers.
- **Model**: {backbone}, weights {weights_used}, frozen base + head.
- **Threshold**: {evaluation['threshold']:.3f}, chosen by {evaluation['threshold_rule']}.
- **Test**: {report.summary_line(evaluation)}.

{report.DISCLAIMER}
"""))
