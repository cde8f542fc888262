"""The notebook runner behind ``run_all.sh`` (``python -m pneumo_utils.runner``): notebooks,
profiles and parameters (`plan`), execution and reports (`engine`), the index page
(`index_page`) and the best model of each task (`selection`). Profiles and nbconvert templates
ship beside it as package data."""
