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
# # Pneumonia on paediatric chest X-rays: fine-tuning MobileNetV2
#
# Notebook 01 trained only a new classification head on top of a **frozen** ImageNet
# backbone. The backbone's features were learned on photographs, not radiographs; letting
# the top of the backbone adapt to X-rays (**fine-tuning**) usually helps, if it is done
# carefully. This notebook follows the standard two-phase recipe on the Kermany et al.
# (2018) paediatric data set with MobileNetV2, a backbone small enough to fine-tune on a CPU:
#
# 1. index the images and carve a **patient-grouped** validation split out of train;
# 2. **phase 1**: train the head on the frozen base (features computed once and cached);
# 3. **phase 2**: unfreeze the top layers, keep BatchNorm in inference mode, and train on
#    **augmented** images with a learning rate a hundred times lower;
# 4. compare the two phases on **validation** AUC and keep the better model;
# 5. choose the decision threshold on validation, report test metrics with bootstrap 95%
#    confidence intervals, per-class precision/recall/F1 and Grad-CAM maps;
# 6. save the model and predict single images, from Python and from the command line.
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
# papermill overrides this cell (`run_all.sh` sets them per profile; the `full` profile
# holds the CPU settings the reported results come from). `epochs`/`learning_rate` are for
# phase 1 (head only), `fine_tune_*` for phase 2. `fine_tune_images_per_epoch` makes each
# phase-2 epoch a random share of the training images (`None`: every image, every epoch).
# The augmentation ranges are in degrees (rotation) and fractions (the rest); 0 switches a
# transform off.

# %% tags=["parameters"]
data_dir = "data/chest_xray"
backbone = "mobilenet_v2"
weights = "imagenet"
weights_fallback = "error"
image_size = 224
batch_size = 32
epochs = 20
learning_rate = 1e-3
fine_tune_epochs = 5
fine_tune_learning_rate = 1e-5
unfreeze_layers = 30
fine_tune_images_per_epoch = None
patience = 5
seed = 42
val_fraction = 0.15
keep_official_val = False
max_images_per_class = None
use_feature_cache = True
use_augmentation = True
rotation = 7.0
zoom = 0.1
shift = 0.05
brightness = 0.1
contrast = 0.1
horizontal_flip = False
threshold_rule = "youden"
n_boot = 1000
reports_dir = "reports"
models_dir = "saved_models"
cache_dir = ".cache/pneumo"
run_name = "03_mobilenetv2_finetune"

# %%
import shlex

from IPython.display import Image, Markdown, display

from pneumo_utils import (
    CLASS_NAMES,
    augment,
    data,
    datasets,
    finetune,
    models,
    plots,
    report,
    train,
    workflow,
)
from pneumo_utils.predict import predict_image

data.set_seed(seed)
for folder in (reports_dir, models_dir):
    Path(folder).mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Data and a patient-grouped validation split
# One row per image (path, label, patient id from the file name, split). The official
# 16-image `val/` is too small to early-stop on or to choose a threshold with, so validation
# images are drawn from train **by patient**: no child has X-rays on both sides. `test/` is
# untouched and is used only for the final numbers.

# %%
index = workflow.kermany_split(data_dir, val_fraction, seed, keep_official_val, max_images_per_class)
split_description = report.describe_split(index)
paths, labels = workflow.split_files(index)
display(Markdown(split_description))
display(plots.class_distribution(index))

# %% [markdown]
# ## 2. MobileNetV2 with a new head
# MobileNetV2 (Sandler et al. 2018) has 3.5 million parameters, about a seventh of
# ResNet50, which is what makes fine-tuning affordable without a GPU. The head is the same as
# in notebook 01: global average pooling, Dense(128, relu), Dropout(0.5), sigmoid. The input
# scaling to [-1, 1] is a layer inside the model, so the saved file takes raw pixels.

# %%
weights_file = models.resolve_weights(backbone, weights, fallback=weights_fallback)
weights_used = weights_file or "random initialisation (no ImageNet weights)"
model = models.build_classifier(backbone, image_size, weights_file, seed=seed)
n_base = len(models.base_layers(model))
display(Markdown(f"Backbone **{backbone}** ({n_base} layers), weights: `{weights_used}`, "
                 f"{model.count_params():,} parameters, input {image_size} px."))

# %% [markdown]
# ## 3. Phase 1: train the head on the frozen base
# A new head starts from random weights; if the backbone were trainable right away, the large
# gradients of that random head would wreck the pretrained features. So first the base is
# frozen and only the head learns. The base's output for an image then never changes, so it
# is computed **once** and cached on disk (`use_feature_cache`), and the head trains on the
# cached features in seconds. Class weights balance the loss (PNEUMONIA outnumbers NORMAL
# about 3 to 1); early stopping on validation AUC keeps the best epoch.

# %%
history1, proba1 = train.train_frozen_head(
    model, paths, labels, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
    patience=patience, use_feature_cache=use_feature_cache, cache_dir=f"{cache_dir}/features",
    history_path=f"{models_dir}/{run_name}.phase1.history.json", verbose=2,
)
phase1 = finetune.snapshot(model, "1: frozen base, head only", proba1, len(history1["loss"]))

# %% [markdown]
# ## 4. Augmentation for phase 2
# Fine-tuning gives the network many more weights to fit a few thousand images with, so it
# can start memorising them. Augmentation shows it a slightly different version of every
# image each epoch: a few degrees of rotation, a little zoom and shift, a little brighter or
# darker, a little more or less contrast. The ranges are small because chest X-rays are taken
# in a standard position. **No horizontal flip** by default: chest X-rays are not left-right
# symmetric (the heart lies on the left, the liver on the right), and a flipped image shows
# an anatomy almost no patient has. Augmentation runs in the tf.data input pipeline, on
# training batches only; the first picture below is the original.

# %%
augmentation = (augment.augmentation(rotation, zoom, shift, brightness, contrast, horizontal_flip, seed)
                if use_augmentation else None)
display(Markdown(f"Augmentation: {augment.describe(augmentation)}."))
example = data.load_images(paths["train"][:1], image_size)[0]
plots.sample_grid(augment.preview(augmentation, example, 8), ["original"] + ["augmented"] * 7)

# %% [markdown]
# ## 5. Phase 2: fine-tune the top of the backbone
# Now the top `unfreeze_layers` layers of MobileNetV2 become trainable, the rest stays frozen.
# Two details matter:
#
# * **BatchNorm layers stay frozen, in inference mode.** They keep the ImageNet mean and
#   variance; if they re-estimated them from small batches of X-rays, the features the head
#   was trained on would shift under it, and the first epoch would undo phase 1.
# * **A learning rate about a hundred times lower** than phase 1 (`fine_tune_learning_rate`),
#   so that the pretrained weights are adjusted, not overwritten.
#
# The base now changes with every step, so features can no longer be cached: this phase runs
# the whole network over the (augmented) images and is the expensive part of the notebook.
# After each epoch the model predicts the validation images once, which both scores the
# epoch and keeps the predictions of the best epoch for the comparison below. The epoch
# count continues from phase 1, so both phases share one set of curves; the dashed line
# marks where fine-tuning starts.

# %%
history2, proba2_val = finetune.train_on_images(
    model, paths, labels, fine_tune_epochs, fine_tune_learning_rate, unfreeze_layers,
    initial_epoch=len(history1["loss"]), batch_size=batch_size, augment_layers=augmentation,
    images_per_epoch=fine_tune_images_per_epoch, patience=patience, seed=seed,
    history_path=f"{models_dir}/{run_name}.phase2.history.json",
)
display(Markdown(f"{finetune.trainable_backbone_layers(model)} of {n_base} backbone layers were "
                 f"trainable in phase 2 (the top {unfreeze_layers}, BatchNorm excluded)."))

# %%
history = train.concat_histories(history1, history2)
plots.training_curves(history)

# %% [markdown]
# ## 6. Did fine-tuning help? Phase 1 against phase 2, on validation data
# Fine-tuning does not always pay off: on a small data set it can overfit or, with too high
# a learning rate, forget. So both versions of the model are scored on the **validation**
# split and the one with the higher ROC AUC is kept (the earlier one on a tie). The test
# split plays no part in this choice: only the kept model predicts the test images.

# %%
phase2 = finetune.snapshot(model, f"2: top {unfreeze_layers} layers fine-tuned", {"val": proba2_val},
                           len(history2["loss"]))
kept, phase_table = finetune.keep_best(model, labels["val"], [phase1, phase2], paths, batch_size=batch_size)
proba = kept.proba
display(phase_table)
display(Markdown(f"Kept: **phase {kept.name}**."))

# %% [markdown]
# ## 7. Evaluation on the test split
# The threshold is chosen on the validation split (rule `threshold_rule`, Youden's J by
# default) and applied unchanged to test. Test metrics come with 95% bootstrap confidence
# intervals; the 0.5 column shows what the default threshold would have given. The second
# table is the per-class precision, recall and F1.

# %%
evaluation = report.show_evaluation(f"{backbone} fine-tuned", labels["val"], proba["val"], labels["test"],
                                    proba["test"], threshold_rule, n_boot, seed, datasets.patients_of(index, "test"))

# %% [markdown]
# ## 8. Grad-CAM: where does the model look?
# Heat maps of the last convolutional layer for confidently correct and for wrong test
# predictions. Heat outside the lungs (text markers, borders) hints at shortcuts.

# %%
rows, captions = report.pick_examples(labels["test"], proba["test"], evaluation["threshold"], seed=seed)
_ = report.show_gradcam(model, [paths["test"][i] for i in rows], captions)

# %% [markdown]
# ## 9. Save the model
# One `.keras` file (saved atomically) plus a JSON sidecar with the threshold and how it was
# chosen, the data split, the training recipe and the metrics, and a markdown model card.
# Prediction and evaluation need nothing else.

# %%
model_path = Path(models_dir) / f"{run_name}.keras"
training = (f"phase 1: head on frozen base, up to {epochs} epochs at {learning_rate:g}; phase 2: top "
            f"{unfreeze_layers} layers (BatchNorm frozen) at {fine_tune_learning_rate:g}, "
            f"{augment.describe(augmentation)}; kept phase {kept.name} (higher validation AUC)")
meta = workflow.save_with_card(
    model, model_path, evaluation, backbone=backbone, weights=weights_used, training=training,
    data=f"Kermany chest_xray at {data_dir}; {split_description}",
)
display(Markdown(f"Saved `{model_path}` with sidecar `{models.sidecar_path(model_path)}` and "
                 f"model card `{model_path.with_suffix('.md')}`."))

# %% [markdown]
# ## 10. Predict one image
# From Python, `predict_image` takes the model, its metadata and a file of any size or
# format; the decision uses the threshold stored with the model.

# %%
image_path, true_label = paths["test"][0], CLASS_NAMES[labels["test"][0]]
result = predict_image(model, meta, image_path)
display(Markdown(f"`{image_path}` (true {true_label}): "
                 f"**Prediction: {result['label']} ({result['confidence']:.2%} confidence)**"))

# %% [markdown]
# The same from the command line, with a Grad-CAM overlay written beside the report. The
# saved file is all it needs: this runs in a fresh Python process.

# %%
gradcam_png = f"{reports_dir}/{run_name}.gradcam.png"
command = [sys.executable, "-m", "pneumo_utils.predict", image_path, "--model", str(model_path),
           "--gradcam", gradcam_png]
print("$", shlex.join(["python"] + command[1:]))
completed = subprocess.run(command, capture_output=True, text=True)
print(completed.stdout or completed.stderr)
completed.check_returncode()
display(Image(filename=gradcam_png, width=300))

# %%
summary = report.write_metrics(
    f"{reports_dir}/{run_name}.metrics.json", run_name, "Kermany: MobileNetV2 fine-tuning",
    split_description,
    [report.model_entry(backbone, evaluation, model_path, weights=weights_used, kept_phase=kept.name,
                        phase_val_auc=phase_table["validation AUC"].to_dict())],
    backbone=backbone,
)
assert 0.0 <= summary["test"]["auc"] <= 1.0 and model_path.is_file()

# %% [markdown]
# ## Summary, data split and threshold

# %%
display(Markdown(f"""
- **Data**: Kermany paediatric chest X-rays from `{data_dir}`. {split_description}.
  Validation was carved from train by patient; `test/` was used only for the final numbers.
- **Model**: {backbone}, weights {weights_used}. {training}.
- **Phases on validation**: {", ".join(f"phase {p} AUC {a:.3f}" for p, a in phase_table["validation AUC"].items())}.
- **Threshold**: {evaluation['threshold']:.3f}, chosen by {evaluation['threshold_rule']}.
- **Test**: {report.summary_line(evaluation)}.

{report.DISCLAIMER}
"""))
